"""The one-GPU check: everything this project can verify on a single CUDA GPU, in one command.

    bash bench/gpu_check.sh --out "$OUT"          # installs the project offline, then this
    python -m dist_ortho.testing.gpu_check --out DIR      # the checks (project installed)
    python -m dist_ortho.testing.gpu_check --dry-run      # what it would do, and nothing else

Without a CUDA GPU it prints one line and exits 0 having run nothing. With one, it runs the checks
of `CHECKS` in order, each in its own process with its own time budget (the sum stays under 8
minutes), so a failure, hang or crash of one leaves the others running; every check writes its log
to `<out>/logs/<check>.log` and, where it measures something, `<out>/<check>.json`. At the end
`summary.json` and `summary.md` say what passed, and the exit status is 1 if anything failed or
ran out of time. `--out` defaults to `results/gpu/<date>-<gpu>/`.

Torch: the GPU machine brings its own CUDA build of torch (or installs the project's version, the
`torch==` line of constraints-cpu.txt, from the CUDA wheel index); the environment check records
both. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dist_ortho import strategies
from dist_ortho.core.io import atomic_write_text
from dist_ortho.core.newton_schulz import ns_flops
from dist_ortho.models import matrix_shapes
from dist_ortho.profiling.calibration import (fit_elementwise, fit_ns_rate, measure_elementwise,
                                              measure_ns)
from dist_ortho.profiling.device import DeviceOps
from dist_ortho.profiling.env import environment
from dist_ortho.profiling.hardware import get_preset
from dist_ortho.studies.jobs import REPO_ROOT, first_error, stop_tree
from dist_ortho.testing.gpu_step import step_cuda_graph, step_stream_overlap

__all__ = ["Check", "CHECKS", "plan_checks", "run_checks", "main"]

# the checks' budgets add up to this: 445 s of the 8 minutes a GPU is lent, leaving time to
# install the project and start (a timed-out check's tree gets 5 s more to stop)
TOTAL_BUDGET_S = 445.0
FAMILIES = ("llama-1b", "llama-8b", "llama-70b")
NS_DTYPES = ("bfloat16", "float32")
PRESET = "h200"  # the data-sheet figures the measurements are set beside
RUN_CONFIG = "launch/configs/gpu_check.yaml"
# single-process test files: under DIST_ORTHO_TEST_DEVICE=cuda their tensors live on the GPU and
# their multi-rank tests skip (they run in tests_gloo_multirank)
CUDA_TEST_FILES = ("tests/optimizer/test_newton_schulz_and_reference_update.py",
                   "tests/optimizer/test_optimizer_api.py", "tests/studies/test_model_presets.py",
                   "tests/studies/test_data_loaders.py")
MULTIRANK_TESTS = ("tests/strategies/test_every_strategy_matches_the_reference.py",)


@dataclass(frozen=True)
class Check:
    name: str
    budget_s: float
    what: str
    command: tuple[str, ...]  # run from the repository root; "{out}" is the output folder
    env: tuple[tuple[str, str], ...] = ()

    def argv(self, out: Path) -> list[str]:
        return [a.replace("{out}", str(out)) for a in self.command]


def _pytest(*args: str, junit: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=120",
            f"--junitxml={{out}}/{junit}.xml", *args)


def _step(name: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "dist_ortho.testing.gpu_check", "--step", name, "--out", "{out}")


def plan_checks() -> tuple[Check, ...]:
    """Every check, in the order it runs: the GPU-specific ones first, so that a slow machine
    spends its time on them; the multi-rank tests on CPU tensors last."""
    names = ", ".join(strategies.available_exact())
    return (
        Check("environment", 15, "GPU name, driver, CUDA, torch (next to the project's pin), NCCL, "
              "memory, compute capability -> environment.json", _step("environment")),
        Check("nccl_strategies", 65, f"tests/optimizer/test_gpu_readiness.py on the GPU: an NCCL P=1 FSDP2 step of "
              f"every strategy ({names}) against the reference, ns_dtype auto = bfloat16, the "
              f"host-sync count of a CUDA step, meta/fake-cuda dry runs",
              _pytest("tests/optimizer/test_gpu_readiness.py", junit="nccl_strategies")),
        Check("stream_overlap", 25, "a profiler trace of one backward of a 3-unit FSDP2 model "
              "(NCCL P=1, strategy overlapped, schedule backward): a later unit's reduce-scatter "
              "starts before an earlier unit's NS ends (NS on the optimizer's own stream, not "
              "FSDP2's), the hooks run on the autograd device thread, and the weights equal "
              "schedule step's -> stream_overlap.json and its trace", _step("stream_overlap")),
        Check("cuda_graph", 20, "a nonfinite='mask', capturable NorMuon step with a 0-d tensor lr "
              "captured in a CUDA graph and replayed on new gradients against eager steps; a NaN "
              "replay keeps the weights -> cuda_graph.json", _step("cuda_graph")),
        Check("profiled_run", 60, f"one profiled GPT training run, `dist-ortho run "
              f"{RUN_CONFIG}` (gpt-125m, NCCL P=1, ns_dtype auto = bfloat16 NS), with CUDA "
              f"memory peaks, phase times and a trace -> run/ and profiled_run.json",
              _step("profiled_run")),
        Check("calibrate_ns", 55, f"the cost model's NS rate on the GPU in {' and '.join(NS_DTYPES)}"
              f" for the matrix shapes of {', '.join(FAMILIES)}, and its element-wise rate, next "
              f"to the {PRESET} preset's -> calibrate_ns.json", _step("calibrate_ns")),
        Check("hbm_compute", 30, f"HBM copy bandwidth and dense matmul FLOP/s (bfloat16, float32, "
              f"tf32) next to the {PRESET} preset's data-sheet figures -> hbm_compute.json",
              _step("hbm_compute")),
        Check("tests_cuda", 85, "single-process and P=1 tests with DIST_ORTHO_TEST_DEVICE=cuda "
              "(every tensor and module on the GPU): " + " ".join(CUDA_TEST_FILES),
              _pytest(*CUDA_TEST_FILES, junit="tests_cuda"),
              (("DIST_ORTHO_TEST_DEVICE", "cuda"),)),
        Check("tests_gloo_multirank", 90, "multi-rank tests on gloo with CPU tensors (one GPU "
              "cannot host two NCCL ranks; CUDA hidden): " + " ".join(MULTIRANK_TESTS),
              _pytest(*MULTIRANK_TESTS, junit="tests_gloo_multirank"),
              (("CUDA_VISIBLE_DEVICES", ""),)),
    )


CHECKS = plan_checks()
assert sum(c.budget_s for c in CHECKS) <= TOTAL_BUDGET_S


# --- running the checks -------------------------------------------------------------------------

def _run_one(check: Check, out: Path, timeout_s: float) -> dict:
    log_path = out / "logs" / f"{check.name}.log"
    argv = check.argv(out)
    env = {**os.environ, **dict(check.env), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO_ROOT, start_new_session=True, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop_tree(proc, grace_s=5.0)
            rc, status = proc.returncode, "timeout"
    seconds = time.perf_counter() - started
    row = {"check": check.name, "status": status, "seconds": round(seconds, 1),
           "budget_s": check.budget_s, "returncode": rc, "log": str(log_path)}
    if status == "timeout":
        row["error"] = f"stopped after its {timeout_s:.0f} s budget"
    elif status == "failed":
        row["error"] = _failure_line(log_path, rc)
    return row


def _failure_line(log: Path, rc: int) -> str:
    """pytest's last summary line when there is one, else the first error of the log."""
    lines = log.read_text(errors="replace").splitlines()
    summary = [line for line in lines if re.match(r"^=*\s*\d+ (failed|passed|error)", line)
               or re.match(r"^=+ .*(failed|error).* =+$", line)]
    return summary[-1].strip("= ") if summary else first_error(log, rc)


def run_checks(out: Path, names: list[str] | None = None,
               total_budget_s: float = TOTAL_BUDGET_S) -> list[dict]:
    """Run the checks (all, or those named) in order; each gets its budget, cut to what is left of
    the total, so the whole never exceeds it. Returns one row per check."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + total_budget_s
    rows = []
    for check in CHECKS:
        if names and check.name not in names:
            continue
        left = deadline - time.perf_counter()
        if left < 5:
            rows.append({"check": check.name, "status": "timeout", "seconds": 0.0,
                         "budget_s": check.budget_s, "error": "not started: no time left"})
        else:
            print(f"gpu_check: {check.name} (budget {min(check.budget_s, left):.0f} s) ...",
                  flush=True)
            rows.append(_run_one(check, out, min(check.budget_s, left)))
        print(f"gpu_check: {check.name}: {rows[-1]['status']} in {rows[-1]['seconds']} s"
              + (f" -- {rows[-1]['error']}" if "error" in rows[-1] else ""), flush=True)
    return rows


# --- the measuring steps (each runs in its own process: --step NAME) --------------------------

def _project_pin() -> str | None:
    path = REPO_ROOT / "constraints-cpu.txt"
    text = path.read_text() if path.is_file() else ""
    match = re.search(r"^torch==(\S+)", text, re.M)
    return match.group(1) if match else None


def _nvidia_smi() -> dict:
    query = "name,driver_version,memory.total,power.limit,clocks.max.sm"
    try:
        text = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"nvidia_smi_error": f"{type(exc).__name__}: {exc}"}
    first = text.strip().splitlines()[0] if text.strip() else ""
    return {f"smi_{k.replace('.', '_')}": v.strip()
            for k, v in zip(query.split(","), first.split(","))}


def step_environment(out: Path) -> dict:
    device = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(device)
    env = environment("nccl", device, 1)
    env.update(_nvidia_smi())
    env.update({"gpu_count": torch.cuda.device_count(),
                "gpu_memory_bytes": props.total_memory,
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "project_torch_pin": _project_pin(),
                "torch_matches_pin": torch.__version__.split("+")[0] == _project_pin(),
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "float32_matmul_precision": torch.get_float32_matmul_precision()})
    return env


def _distinct_shapes(family) -> list[tuple[int, int]]:
    """The distinct matrix shapes of a shape preset (a name or a models.ShapeConfig)."""
    return sorted({shape for _, shape in matrix_shapes(family)})


def step_calibrate_ns(out: Path, device: torch.device | str = "cuda", families=FAMILIES,
                      dtypes=NS_DTYPES, elementwise_sets=None) -> dict:
    """The NS rate fitted per (dtype, family) over the family's distinct matrix shapes, and the
    element-wise rate, each next to the preset's (tests run it on the CPU with small shapes)."""
    device = torch.device(device)
    preset = get_preset(PRESET)
    result: dict = {"preset": PRESET, "device": str(device),
                    "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                    else device.type),
                    "float32_matmul_precision": torch.get_float32_matmul_precision(), "ns": []}
    failed = []
    for dtype in dtypes:
        for family in families:
            label = family if isinstance(family, str) else repr(family)
            shapes = _distinct_shapes(family)
            alone, _ = measure_ns(None, shapes, ns_dtype=dtype, repeats=3, device=device)
            entry = {"family": label, "ns_dtype": dtype, "shapes": [list(s) for s in shapes],
                     "seconds": [s.seconds for s in alone],
                     "flops": [ns_flops(s, 5) for s in shapes],
                     "preset_flops_per_s": preset.ns_flops_per_s(dtype),
                     "preset_peak_flops_per_s": preset.peak_flops[dtype]}
            try:
                rate, call_s = fit_ns_rate(alone)
            except ValueError as exc:  # timings that do not grow with FLOPs: keep them, go on
                entry["error"] = str(exc)
                failed.append(f"{label} {dtype}: {exc}")
            else:
                entry.update(fitted_flops_per_s=rate, fitted_call_s=call_s,
                             measured_over_preset=rate / preset.ns_flops_per_s(dtype))
            result["ns"].append(entry)
    kwargs = {} if elementwise_sets is None else {"param_sets": elementwise_sets}
    ew = measure_elementwise(None, ns_dtype=dtypes[0], device=device, **kwargs)
    per_param, per_element = fit_elementwise(ew)
    preset_per_element = preset.elementwise_bytes_per_element / preset.hbm_bytes_per_s
    result["elementwise"] = {"s_per_param": per_param, "s_per_element": per_element,
                             "preset_s_per_element": preset_per_element,
                             "measured_over_preset": per_element / preset_per_element,
                             "samples": [asdict(s) for s in ew]}
    if failed:  # keep what was measured for the summary, then fail the check
        atomic_write_text(out / "calibrate_ns.json", json.dumps(result, indent=2) + "\n")
        raise RuntimeError("NS rate not fitted for " + "; ".join(failed))
    return result


def _best_seconds(ops: DeviceOps, fn: Callable[[], object], repeats: int) -> float:
    """Best of `repeats` device-timed calls (after one warm-up): other work only adds time."""
    fn()
    ops.synchronize()
    times = []
    for _ in range(repeats):
        start = ops.mark()
        fn()
        end = ops.mark()
        ops.synchronize()
        times.append(ops.elapsed_s(start, end))
    return min(times)


def step_hbm_compute(out: Path, device: torch.device | str = "cuda", copy_numel: int = 2**30,
                     matmul_n: int = 8192) -> dict:
    """Copy bandwidth (4 GiB float32 buffers: far beyond any cache) and dense matmul FLOP/s,
    each next to the preset's data-sheet figure."""
    ops = DeviceOps.for_device(device)
    preset = get_preset(PRESET)
    src = torch.ones(copy_numel, device=ops.device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(ops, lambda: dst.copy_(src), 5)
    hbm = 2 * src.numel() * src.element_size() / copy_s  # read + write
    del src, dst
    result: dict = {"preset": PRESET, "device": str(ops.device), "hbm_bytes_per_s": hbm,
                    "preset_hbm_bytes_per_s": preset.hbm_bytes_per_s,
                    "hbm_measured_over_preset": hbm / preset.hbm_bytes_per_s, "matmul": []}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for label, dtype, allow_tf32 in (("bfloat16", torch.bfloat16, False),
                                         ("float32", torch.float32, False),
                                         ("tf32", torch.float32, True)):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            a = torch.randn(matmul_n, matmul_n, device=ops.device, dtype=dtype)
            b = torch.randn(matmul_n, matmul_n, device=ops.device, dtype=dtype)
            seconds = _best_seconds(ops, lambda: a @ b, 5)
            rate = 2 * matmul_n**3 / seconds
            peak = preset.peak_flops.get(label)
            result["matmul"].append({"dtype": label, "n": matmul_n, "seconds": seconds,
                                     "flops_per_s": rate, "preset_peak_flops_per_s": peak,
                                     "measured_over_peak": rate / peak if peak else None})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return result


def step_profiled_run(out: Path, overrides: tuple[str, ...] = (),
                      expect: tuple[str, str, str] = ("cuda", "nccl", "bfloat16")) -> dict:
    """`dist-ortho run` of RUN_CONFIG (plus `overrides`) into <out>/run, then checks that it ran
    on the expected (device type, backend, resolved ns_dtype), wrote a trace, a memory peak and
    DONE; raises RuntimeError naming what is wrong."""
    run_root = out / "run"
    cmd = [sys.executable, "-m", "dist_ortho", "run", str(REPO_ROOT / RUN_CONFIG), "-o",
           str(run_root), *(arg for o in overrides for arg in ("--set", o))]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    run_dir = run_root / "gpt125m-profiled"
    config = (run_dir / "config.yaml").read_text()
    env = json.loads((run_dir / "environment.json").read_text())
    facts = {"run_dir": str(run_dir), "device_type": env.get("device_type"),
             "backend": env.get("backend"), "device_name": env.get("device_name"),
             "ns_dtype": re.search(r"ns_dtype: (\w+)", config).group(1),
             "traces": sorted(p.name for p in run_dir.glob("trace_rank*")),
             **_metrics_summary(run_dir / "metrics.csv")}
    facts["problems"] = run_problems(facts, run_dir, expect)
    if facts["problems"]:  # keep what was measured for the summary, then fail the check
        atomic_write_text(out / "profiled_run.json", json.dumps(facts, indent=2) + "\n")
        raise RuntimeError("profiled run: " + "; ".join(facts["problems"]))
    return facts


def run_problems(facts: dict, run_dir: Path, expect: tuple[str, str, str]) -> list[str]:
    """What is wrong with a profiled run, given what `step_profiled_run` read from it."""
    problems = []
    if (facts["device_type"], facts["backend"]) != expect[:2]:
        problems.append(f"ran on {facts['device_type']}/{facts['backend']}, not "
                        f"{expect[0]}/{expect[1]}")
    if facts["ns_dtype"] != expect[2]:
        problems.append(f"ns_dtype auto resolved to {facts['ns_dtype']}, not {expect[2]}")
    if not facts["traces"]:
        problems.append("no trace file")
    if not facts.get("step_mem_peak_bytes"):
        problems.append("no memory peak recorded")
    if not (run_dir / "DONE").is_file():
        problems.append("no DONE marker")
    return problems


def _metrics_summary(path: Path) -> dict:
    """Peak memory, median step time and mean phase times of the measured (non-warm-up) steps."""
    steps: dict[int, float] = {}
    phases: dict[str, list[float]] = {}
    peak = 0.0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["warmup"] in ("True", "1", "true"):
                continue
            value = float(row["value"])
            if row["metric"] == "mem_peak_bytes" and row["phase"] == "step":
                peak = max(peak, value)
            elif row["metric"] == "time_s":
                if row["phase"] == "step":
                    steps[int(row["step"])] = value
                else:
                    phases.setdefault(row["phase"], []).append(value)
    times = sorted(steps.values())
    return {"measured_steps": len(times), "step_mem_peak_bytes": peak,
            "median_step_s": times[len(times) // 2] if times else None,
            "phase_mean_s": {k: sum(v) / len(v) for k, v in sorted(phases.items())}}


STEPS: dict[str, Callable[[Path], dict]] = {
    "environment": step_environment, "calibrate_ns": step_calibrate_ns,
    "hbm_compute": step_hbm_compute, "profiled_run": step_profiled_run,
    "stream_overlap": step_stream_overlap, "cuda_graph": step_cuda_graph}


# --- summary and command line -------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def summary_markdown(out: Path, rows: list[dict]) -> str:
    env = _read_json(out / "environment.json")
    lines = ["# GPU check", "",
             f"{env.get('device_name', '?')} (driver {env.get('smi_driver_version', '?')}, CUDA "
             f"{env.get('cuda', '?')}, torch {env.get('torch', '?')}, project pin "
             f"{env.get('project_torch_pin', '?')}, NCCL {env.get('nccl', '?')}), "
             f"git {env.get('git_commit', '?')}", "",
             "| check | status | seconds | budget | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']} | {r['budget_s']:.0f} | "
                     f"{r.get('error', '')} |")
    for name, section in (("calibrate_ns", _calibration_lines), ("hbm_compute", _hbm_lines),
                          ("profiled_run", _run_lines)):
        data = _read_json(out / f"{name}.json")
        if not data:
            continue
        try:
            lines += [""] + section(data)
        except (KeyError, TypeError, ValueError) as exc:  # a partial file: say so, keep the rest
            lines += ["", f"{name}.json could not be summarized: {type(exc).__name__}: {exc}"]
    return "\n".join(lines) + "\n"


def _calibration_lines(cal: dict) -> list[str]:
    return ([f"NS rate (5 steps, fitted over each family's shapes) vs the {PRESET} preset "
             "(data-sheet peak x assumed efficiency):", "",
             "| family | dtype | measured TFLOP/s | preset TFLOP/s | ratio |",
             "|---|---|---|---|---|"]
            + [f"| {n['family']} | {n['ns_dtype']} | {n['fitted_flops_per_s'] / 1e12:.1f} | "
               f"{n['preset_flops_per_s'] / 1e12:.1f} | {n['measured_over_preset']:.2f} |"
               if "error" not in n else f"| {n['family']} | {n['ns_dtype']} | {n['error']} | | |"
               for n in cal["ns"]]
            + ["", f"Element-wise (momentum, normalize, apply): "
                   f"{cal['elementwise']['s_per_element'] * 1e12:.2f} ps/element, preset "
                   f"{cal['elementwise']['preset_s_per_element'] * 1e12:.2f}"])


def _hbm_lines(hw: dict) -> list[str]:
    matmuls = ", ".join(f"{m['dtype']} {m['flops_per_s'] / 1e12:.0f} TFLOP/s"
                        + (f" ({m['measured_over_peak']:.0%} of the data sheet's peak)"
                           if m["measured_over_peak"] else "") for m in hw["matmul"])
    return [f"HBM copy {hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s vs data sheet "
            f"{hw['preset_hbm_bytes_per_s'] / 1e12:.2f} TB/s; matmul {hw['matmul'][0]['n']}^3: "
            f"{matmuls}"]


def _run_lines(run: dict) -> list[str]:
    return [f"Profiled run: median step {run.get('median_step_s')} s, peak "
            f"{(run.get('step_mem_peak_bytes') or 0) / 2**30:.2f} GiB, ns_dtype "
            f"{run.get('ns_dtype')}, traces {run.get('traces')} in {run.get('run_dir')}"
            + (f"; problems: {'; '.join(run['problems'])}" if run.get("problems") else "")]


def _default_out() -> Path:
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return REPO_ROOT / "results" / "gpu" / f"{time.strftime('%Y-%m-%d')}-{name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_ortho.testing.gpu_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default results/gpu/<date>-<gpu>/)")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and exit")
    parser.add_argument("--only", nargs="+", default=None, metavar="CHECK",
                        help="run only these checks")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    known = [c.name for c in CHECKS]
    if args.only and set(args.only) - set(known):
        parser.error(f"--only: unknown check(s) {sorted(set(args.only) - set(known))}; "
                     f"known: {known}")
    if args.dry_run:
        for c in CHECKS:
            if args.only and c.name not in args.only:
                continue
            env = " ".join(f"{k}={v!r}" for k, v in c.env)
            print(f"{c.name} (budget {c.budget_s:.0f} s): {c.what}\n    $ "
                  f"{env + ' ' if env else ''}{' '.join(c.argv(args.out or Path('<out>')))}")
        print(f"total budget {TOTAL_BUDGET_S:.0f} s")
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU visible to torch {torch.__version__}; nothing to check "
              f"(exit 0)")
        return 0
    out = (args.out or _default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.step:  # one measuring step, in its own process
        atomic_write_text(out / f"{args.step}.json",
                          json.dumps(STEPS[args.step](out), indent=2, default=str) + "\n")
        return 0
    rows = run_checks(out, args.only)
    atomic_write_text(out / "summary.json", json.dumps({"checks": rows}, indent=2) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(out, rows))
    failed = [r["check"] for r in rows if r["status"] != "ok"]
    print(f"gpu_check: {len(rows) - len(failed)}/{len(rows)} checks ok"
          + (f", failed: {', '.join(failed)}" if failed else "") + f"; summary: {out}/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
