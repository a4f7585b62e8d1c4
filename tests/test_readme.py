"""The README's and docs' code blocks run as written: the README's Python script under torchrun on
2 gloo ranks, every `dist-ortho` command line of a bash block (README and docs/) parses, and the
sample error message of docs/cli.md is what the sweep prints for the grid it describes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_ortho.cli import build_parser
from dist_ortho.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)


def test_readme_python_script_trains_under_torchrun(tmp_path):
    (script,) = blocks("python")
    path = tmp_path / "train_tiny.py"
    path.write_text(script)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+ loss ([\d.]+)$", proc.stdout, re.M)]
    assert len(losses) == 2 and losses[1] < losses[0] / 10, proc.stdout
    # repr(opt) names the optimizers, their groups and the strategy, not an object address
    assert "CombinedOptimizer(" in proc.stdout and "strategy=balanced" in proc.stdout
    assert "object at 0x" not in proc.stdout
    # describe(): the embedding and the head went to AdamW by their role
    assert re.search(r"^embed\.weight .*-> adamw +\(embedding\)", proc.stdout, re.M)
    assert re.search(r"^head\.weight .*-> adamw +\(output head\)", proc.stdout, re.M)


def command_lines() -> list[list[str]]:
    lines = []
    for block in [b for text in [README, *(d.read_text() for d in DOCS)]
                  for b in blocks("bash", text)]:
        for line in block.splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv and argv[0].endswith("dist-ortho"):
                    lines.append(argv[1:])
    return lines


@pytest.mark.parametrize("argv", command_lines(), ids=lambda a: " ".join(a)[:60])
def test_readme_commands_parse(argv):
    build_parser(only=argv[0]).parse_args(argv)


def test_readme_sample_error_is_what_the_sweep_prints(tmp_path, capsys):
    sample = re.search(r"^\$ dist-ortho sweep study.yaml.*?\n(dist-ortho sweep: error: .*?)\n```",
                       (ROOT / "docs" / "cli.md").read_text(), re.S | re.M).group(1)
    study = {"name": "s", "base": str(ROOT / "launch" / "configs" / "tiny.yaml"),
             "output_dir": str(tmp_path / "results"),
             "grid": {"strategies": [{"name": "bucketed_async", "label": "b64",
                                      "options": {"bucket_bytes": 64}}], "world_sizes": [1]}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert cli_main(["sweep", str(path)]) == 2
    assert capsys.readouterr().err.strip() == " ".join(sample.split())


def test_readme_links_every_docs_page_and_every_link_resolves():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    assert {d.name for d in DOCS} - {"index.md"} <= linked, "a docs page the README does not link"
    for page in [ROOT / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_readme_is_a_product_page_of_at_most_200_lines():
    assert len(README.splitlines()) <= 200
