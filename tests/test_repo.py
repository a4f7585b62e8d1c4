"""The README's commands and CI stay in sync; the CPU torch pin lives in exactly one file; the
installed package has one top-level name."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

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


def test_commands_write_where_git_ignores_and_examples_are_apart():
    """The main command runs fresh into an ignored folder; committed examples live apart."""
    import subprocess

    import yaml

    from dist_ortho.studies.config import OutputConfig
    from dist_ortho.studies.convergence.config import ConvergenceConfig
    from dist_ortho.studies.project import DEFAULT_OUT

    study = yaml.safe_load((ROOT / "launch" / "configs" / "default_study.yaml").read_text())
    written = [f"{study['output_dir']}/default_study/report.md", f"{DEFAULT_OUT}/x.csv",
               f"{ConvergenceConfig().out_dir}/summary.md", f"{OutputConfig().dir}/run/DONE"]
    if not (ROOT / ".git").exists():
        return  # not a git checkout (e.g. an unpacked sdist)
    ignored = subprocess.run(["git", "check-ignore", *written], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == written
    assert (ROOT / "results" / "examples" / "default_study" / "report.md").is_file()


def test_no_import_cycles_between_modules():
    """Top-level imports only (by the project's rule), so this static graph is the real one."""
    import ast

    roots = {"dist_ortho": ROOT / "dist_ortho", "dist_ortho.strategies": ROOT / "strategies",
             "dist_ortho.profiling": ROOT / "profiling"}
    graph = {}
    for pkg, folder in roots.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").as_posix().replace("/", ".")
            name = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
            deps = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dist_ortho"):
                    deps |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.startswith("dist_ortho")}
            graph[name] = deps
    for name, deps in graph.items():  # an import of a module's own package is not a cycle
        graph[name] = {d for d in deps if d in graph and d != name and not name.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [node, dep])}"
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_installed_wheel_adds_one_top_level_package_and_the_console_script(tmp_path):
    """`pip install .` puts one package, dist_ortho, into site-packages: the strategies/ and
    profiling/ folders stay at the top of the repository but install as dist_ortho.*."""
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the checkout
    for folder in ("dist_ortho", "strategies", "profiling"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dist_ortho-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"dist_ortho"}
    # every module ships (a new subpackage must be listed in pyproject's packages)
    sources = {f"dist_ortho/{p.relative_to(ROOT / 'dist_ortho').as_posix()}"
               for p in (ROOT / "dist_ortho").rglob("*.py")}
    sources |= {f"dist_ortho/{folder}/{p.name}" for folder in ("strategies", "profiling")
                for p in (ROOT / folder).glob("*.py")}
    assert sources - set(names) == set()
    assert re.search(r"^dist-ortho = dist_ortho\.cli:main$", entry_points, re.M), entry_points
