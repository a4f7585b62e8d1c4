"""The README's commands and CI stay in sync; the CPU torch pin lives in exactly one file."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "dist-ortho study" in main_job and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci


def test_cpu_torch_pin_lives_in_one_file():
    pinned = [p for p in ROOT.rglob("*")
              if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts
              and p.suffix in (".txt", ".toml", ".cfg", ".sh", "") and p.stat().st_size < 1e6
              and "torch==2.13.0" in p.read_text(errors="ignore")]
    assert [p.name for p in pinned] == ["constraints-cpu.txt"], pinned
