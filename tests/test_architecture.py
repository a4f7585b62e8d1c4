"""The layers of ARCHITECTURE.md hold: no import cycle (imports inside functions included), every
import points down or sideways, low layers import without the optimizer, modules stay small."""

from __future__ import annotations

import ast
import pathlib
import random
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The package's folders, bottom to top: a module may import its own folder and the folders below
# it, never one above. Each folder is one layer; the package root (`dist_ortho/__init__.py`, its
# lazy public names) and the command line sit on top.
FOLDER_LAYERS = [
    "core",           # NS math, shard and mesh arithmetic, plan types, config schema, I/O
    "strategies",     # who orthogonalizes what and how rows travel
    "rules",          # update rules (Muon, NorMuon)
    "optim",          # the optimizers, parameter split, backward overlap, mesh step, reference
    "profiling",      # measuring and predicting steps
    "models",         # trainable GPTs and shape-only presets
    "checkpointing",  # verified, retained, background checkpoints
    "integrations",   # dist_ortho inside other trainers (torchtitan)
    "reporting",      # what a study's numbers say, reports and plots
    "studies",        # runs, sweeps, interleaved studies, projections, convergence
    "testing",        # aids for tests and hardware checks; the product never imports it
]
TOP = len(FOLDER_LAYERS)  # dist_ortho/__init__.py, __main__.py, cli.py
MAX_TOP_LEVEL_MODULES = 15

# imports inside functions that are lazy on purpose (a heavy optional dependency, torch's private
# modules, or a PEP 562 re-export), each with its reason beside it: module -> imported names
FUNCTION_IMPORTS_ALLOWED = {
    "dist_ortho": {"importlib"},
    "dist_ortho.profiling": {"dist_ortho.profiling.summary"},
    "dist_ortho.profiling.memory": {"torch.distributed._tools.mem_tracker",
                                    "torch.distributed.tensor", "torch._guards",
                                    "torch.utils._pytree"},
    "dist_ortho.profiling.tables": {"pyarrow", "pandas"},
    # torchtitan is an optional extra: its container class is built on first use
    "dist_ortho.integrations.torchtitan": {"torchtitan.components.checkpointer.utils",
                                           "torchtitan.components.optimizer"},
}
MAX_LINES = 600


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((ROOT / "dist_ortho").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for sub in ("strategies", "profiling"):
        for path in sorted((ROOT / sub).glob("*.py")):
            name = f"dist_ortho.{sub}" + ("" if path.stem == "__init__" else f".{path.stem}")
            out[name] = path
    return out


MODULES = modules()


def imports(name: str, path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in in_function) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else base, id(node) in in_function))
    return out


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports(name, path) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def folder(name: str) -> str | None:
    """The layer folder of a module (`dist_ortho.core.plan` -> `core`), None at the top level."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FOLDER_LAYERS) else None


def layer(name: str) -> int:
    f = folder(name)
    return TOP if f is None else FOLDER_LAYERS.index(f)


def test_every_subpackage_is_a_known_layer_and_the_top_level_is_small():
    package = ROOT / "dist_ortho"
    folders = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert folders | {"strategies", "profiling"} == set(FOLDER_LAYERS)
    top = sorted(p.name for p in package.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """A core module importing the optimizer is reported (the check is not vacuous)."""
    module = tmp_path / "bad.py"
    module.write_text("from dist_ortho.optim.optimizer import NorMuon\n")
    deps = [m for m, _ in imports("dist_ortho.core.bad", module) if m in MODULES]
    assert deps and [d for d in deps if layer(d) > layer("dist_ortho.core.bad")]


def test_no_import_cycle_including_imports_inside_functions():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_point_down_the_layers():
    wrong = [(name, dep) for name, deps in graph().items() for dep in deps
             if layer(dep) > layer(name)]
    assert MODULES and graph()
    assert wrong == []


def test_no_imports_inside_functions_but_justified_ones():
    found = []
    for name, path in MODULES.items():
        allowed = FUNCTION_IMPORTS_ALLOWED.get(name, set())
        found += [(name, m) for m, inside in imports(name, path) if inside and m not in allowed]
    assert found == []


def test_no_module_over_600_lines():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout


def test_strategies_import_without_the_optimizer():
    out = _run("import sys, dist_ortho.strategies, dist_ortho.core.plan, dist_ortho.core.timing\n"
               "print(sorted(m for m in sys.modules if m.startswith('dist_ortho.')))")
    loaded = eval(out)
    assert "dist_ortho.strategies.base" in loaded
    assert not [m for m in loaded if m.split(".")[1] in ("optimizer", "param_groups", "rules",
                                                         "profiling", "reference")]


def test_every_module_imports_in_a_fresh_interpreter_in_random_order():
    names = [n for n in MODULES if not n.endswith("__main__")]
    random.Random(0).shuffle(names)
    code = ("import importlib\n"
            f"for n in {names!r}:\n"
            "    importlib.import_module(n)\n"
            "print('ok')\n")
    assert _run(code).strip() == "ok"
    for n in names[:2]:  # and two of them first, alone
        assert _run(f"import {n}; print('ok')").strip() == "ok", n


def test_the_architecture_walk_through_strategy_plugs_in_everywhere():
    """ARCHITECTURE.md's example strategy file, run as written: registered, built by name, used by
    the optimizer and by the cost model (bytes and time) with no other change."""
    import re

    import torch

    from dist_ortho import NorMuon, strategies
    from dist_ortho.profiling import costmodel
    from dist_ortho.profiling.hardware import HARDWARE_PRESETS
    from dist_ortho.strategies import registry

    text = (ROOT / "ARCHITECTURE.md").read_text()
    code = re.search(r"```python\n# strategies/mirrored.py\n(.*?)```", text, re.S).group(1)
    try:
        exec(compile(code, "strategies/mirrored.py", "exec"), {"__name__": "mirrored"})
        assert "mirrored" in strategies.available()
        w = torch.nn.Parameter(torch.randn(8, 6))
        opt = NorMuon([w], strategy="mirrored", ns_dtype="float32")
        w.grad = torch.randn(8, 6)
        opt.step()
        shapes = [(64, 32), (32, 64), (48, 48), (16, 80)]
        preset = next(iter(HARDWARE_PRESETS.values()))
        pred = costmodel.predict(shapes, 4, "mirrored", constants=preset)
        ref = costmodel.predict(shapes, 4, "balanced", constants=preset)
        # LPT's owners mirrored: the same bytes and work on other ranks; two buckets, priced
        assert pred.max_bytes_per_rank == ref.max_bytes_per_rank
        assert sorted(r.ns_flops for r in pred.ranks) == sorted(r.ns_flops for r in ref.ranks)
        assert pred.time.total_s > 0 and len(pred.plan.buckets) == 2
    finally:
        registry._REGISTRY.pop("mirrored", None)
