"""Reliability, end to end through real torchrun subprocesses on gloo.

- Checkpoint/resume through the run entry: 4 uninterrupted steps against 2 steps then `--resume`
  to 4, bitwise, for every strategy, for a GPT preset (training, data loader) and a shape-only
  one (synthetic gradients); resuming at a different world size gives the same losses; resuming
  with nothing saved starts from scratch and says so.
- Faults: a rank killed mid-step (through a sweep, which records the point as failed), a rank
  killed as it enters a checkpoint save, and a hung rank each end the job non-zero within the
  collective timeout, leaving no DONE, no metrics.csv and no checkpoint `latest_step` would pick
  that is not complete.
- A NaN in one rank's gradient: skipped on every rank and counted, or raised.
- Config errors of these features, raised before any collective.

Launches, kept few for a 2-core machine: one P=2 torchrun runs every strategy's uninterrupted and
first-half runs plus the NaN runs, one P=2 torchrun runs the second halves, one P=3 torchrun the
resharded resumes (tests/end_to_end/rel_cases.py puts several runs in one launch); then one torchrun
per fault.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from dist_ortho import strategies
from dist_ortho.checkpointing import checkpoint
from dist_ortho.studies.config import ConfigError, config_hash, load_config
from dist_ortho.studies.faults import from_sources
from dist_ortho.studies.jobs import stop_tree

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
TINY = ROOT / "launch" / "configs" / "tiny.yaml"
STRATEGIES = strategies.available_exact()
MODELS = ("gpt", "shape")
K, STEPS = 2, 4  # save after K steps, resume to STEPS

COMMON = ["train.warmup_steps=1", "train.log_every=1", "profiling.memory=false",
          "profiling.instrument_every=100", "dist.timeout_s=60"]
MODEL_SETS = {"gpt": ["model.preset=gpt-tiny", "train.data=synthetic", "train.seq_len=32",
                      "train.batch_size=6"],  # global batch 12 at P=2, and 4 x 3 at P=3
              "shape": ["model.preset=llama-tiny"]}


# -- launching -------------------------------------------------------------------------------------
@dataclass
class Launch:
    returncode: int
    output: str
    ended: float  # time.time() when the job had exited


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> Launch:
    """One torchrun job; on timeout its whole process tree is killed and the test fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), cwd=ROOT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        pytest.fail(f"torchrun {' '.join(args)} still running after {timeout} s")
    return Launch(proc.returncode, output, time.time())


def run_args(sets: list[str], resume: bool = False, faults: list[str] = ()) -> list[str]:
    """Arguments of `dist-ortho run` for tiny.yaml plus these overrides and testing aids
    (`--fault`, dist_ortho.studies.faults)."""
    return ([str(TINY), *(arg for kv in [*COMMON, *sets] for arg in ("--set", kv))]
            + (["--resume"] if resume else []) + [arg for f in faults for arg in ("--fault", f)])


def run_many(nproc: int, jobs: list[list[str]], folder: Path) -> Launch:
    folder.mkdir(parents=True, exist_ok=True)
    jobs_file = folder / f"jobs_{len(list(folder.glob('jobs_*')))}.json"
    jobs_file.write_text(json.dumps(jobs))
    out = torchrun(nproc, [str(TESTS / "rel_cases.py"), str(jobs_file)])
    assert out.returncode == 0, out.output[-6000:]
    return out


def one_run(nproc: int, sets: list[str], resume: bool = False, faults: list[str] = ()) -> Launch:
    return torchrun(nproc, ["-m", "dist_ortho", "run", *run_args(sets, resume, faults)])


def fault_time(output: str) -> float:
    """Wall clock at which the testing aid failed its rank (logged just before)."""
    m = re.search(r"testing aid: rank \d+ will .* \(time (\d+\.\d+)\)", output)
    assert m, output[-4000:]
    return float(m.group(1))


# -- reading results -------------------------------------------------------------------------------
def flat_state(ckpt_dir: Path, step: int, scratch: Path) -> dict:
    """Every tensor and value of a checkpoint's model and optimizer state, gathered to full
    tensors in this process (no process group), keyed by its path."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"{ckpt_dir.name}_{step}.pt"
    dcp_to_torch_save(str(checkpoint.checkpoint_path(ckpt_dir, step)), str(out))
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


def mismatches(a: dict, b: dict) -> list[str]:
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(a.keys() ^ b.keys())[:5]}"]
    bad = []
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x, y)):
                bad.append(k)
        elif x != y:
            bad.append(k)
    return bad


def metric_rows(run_dir: Path, metric: str) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["metric"] == metric and r["phase"] == "step"]


def losses(run_dir: Path) -> dict[int, float]:
    return {int(s): v for s, v in json.loads((run_dir / "run.json").read_text())["losses"]}


# -- the shared launches ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rel")


def _job(root: Path, name: str, model: str, sets: list[str], resume: bool = False,
         every: int = K, faults: list[str] = ()) -> list[str]:
    return run_args([*MODEL_SETS[model], f"output.dir={root / 'out'}", f"output.name={name}",
                     f"checkpoint.dir={root / 'ck' / name}", f"checkpoint.every={every}",
                     *sets], resume, faults)


@pytest.fixture(scope="module")
def first(root) -> Launch:
    """P=2: per strategy and model, the uninterrupted run (`full-*`, saves at 2 and 4) and the
    first half (`res-*`, 2 steps); a --resume with nothing saved; the two NaN-skip runs."""
    jobs = []
    for s in STRATEGIES:
        for m in MODELS:
            jobs.append(_job(root, f"full-{m}-{s}", m, [f"strategy.name={s}",
                                                        f"train.steps={STEPS}"]))
            jobs.append(_job(root, f"res-{m}-{s}", m, [f"strategy.name={s}", f"train.steps={K}"]))
    jobs.append(_job(root, "scratch", "gpt", [f"train.steps={STEPS}"], resume=True))
    # gpt-tiny's first parameter is the embedding, an AdamW parameter: the NaN must reach the
    # matrix optimizer's check and stop AdamW too
    jobs.append(_job(root, "nan-gpt", "gpt", [f"train.steps={STEPS}"], every=0,
                     faults=["nan_step=1", "nan_rank=1"]))
    jobs.append(_job(root, "nan-shape", "shape", [f"train.steps={STEPS}", "strategy.name=balanced"],
                     every=0, faults=["nan_step=2", "nan_rank=0",
                                      "nan_param=layers.0.mlp.gate_proj.weight"]))
    return run_many(2, jobs, root / "jobs")


@pytest.fixture(scope="module")
def second(root, first) -> Launch:
    """P=2: every `res-*` run again with train.steps=4 and --resume."""
    jobs = [_job(root, f"res-{m}-{s}", m, [f"strategy.name={s}", f"train.steps={STEPS}"],
                 resume=True) for s in STRATEGIES for m in MODELS]
    return run_many(2, jobs, root / "jobs")


@pytest.fixture(scope="module")
def three(root, first) -> Launch:
    """P=3: the P=2 step-2 checkpoint of every strategy's GPT run, resumed to step 4."""
    jobs = []
    for s in STRATEGIES:
        src = checkpoint.checkpoint_path(root / "ck" / f"full-gpt-{s}", K)
        shutil.copytree(src, root / "ck" / f"p3-{s}" / src.name)
        jobs.append(_job(root, f"p3-{s}", "gpt", [f"strategy.name={s}", f"train.steps={STEPS}",
                                                  "train.batch_size=4"], resume=True))
    return run_many(3, jobs, root / "jobs")


# -- checkpoint / resume ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_continues_bitwise(root, first, second, strategy, model):
    full = flat_state(root / "ck" / f"full-{model}-{strategy}", STEPS, root / "flat")
    resumed = flat_state(root / "ck" / f"res-{model}-{strategy}", STEPS, root / "flat")
    at_k = flat_state(root / "ck" / f"res-{model}-{strategy}", K, root / "flat")
    assert any(k.endswith(".momentum_buffer") for k in full)
    assert any(k.endswith(".v") for k in full)  # NorMuon's row second moments
    # every parameter and every piece of optimizer state, bit for bit
    assert mismatches(resumed, full) == []
    # (else the comparison proves nothing) every parameter moved between step K and the end
    assert {k for k in full if k.startswith("/model/")} <= set(mismatches(at_k, full))
    info = checkpoint.checkpoint_info(root / "ck" / f"res-{model}-{strategy}", STEPS)
    assert info["step"] == STEPS and info["world_size"] == 2
    full_info = checkpoint.checkpoint_info(root / "ck" / f"full-{model}-{strategy}", STEPS)
    assert info["extra"]["losses"] == full_info["extra"]["losses"]
    if model == "gpt":  # the data position came back and moved on
        assert len(info["extra"]["losses"]) == STEPS
        rank1 = torch.load(checkpoint.checkpoint_path(root / "ck" / f"res-gpt-{strategy}", STEPS)
                           / "rank_00001.pt", weights_only=True)
        assert rank1["loader"]["step"] == STEPS


@pytest.mark.slow
def test_resumed_runs_report_their_true_steps(root, first, second):
    assert second.output.count("resumed from") == len(STRATEGIES) * len(MODELS)
    for s in STRATEGIES:
        for m in MODELS:
            run_dir = root / "out" / f"res-{m}-{s}"
            rows = metric_rows(run_dir, "time_s")
            assert sorted({int(r["step"]) for r in rows}) == [K, K + 1]
            # the resumed process warms up again, but its last step is measured
            warm = {int(r["step"]): r["warmup"] == "True" for r in rows}
            assert warm == {K: True, K + 1: False}
            facts = json.loads((run_dir / "run.json").read_text())
            assert (facts["resumed_from"], facts["first_step"], facts["steps"]) == (K, K, STEPS)
            done = json.loads((run_dir / "DONE").read_text())
            assert done["steps"] == STEPS and done["resumed_from"] == K


@pytest.mark.slow
def test_resume_with_nothing_saved_starts_from_scratch(root, first):
    assert f"no complete checkpoint in {root / 'ck' / 'scratch'}; starting from step 0" \
        in first.output
    assert mismatches(flat_state(root / "ck" / "scratch", STEPS, root / "flat"),
                      flat_state(root / "ck" / "full-gpt-replicated", STEPS, root / "flat")) == []


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_at_three_ranks_gives_the_same_losses(root, first, three, strategy):
    assert "saved at world size 2, loaded at 3" in three.output
    got, want = losses(root / "out" / f"p3-{strategy}"), losses(root / "out" / f"full-gpt-{strategy}")
    for step in (K + 1, STEPS):  # the steps taken after the resume, at P=3 and at P=2
        assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got, want)
    assert got[K] == want[K]  # carried over from the checkpoint
    assert checkpoint.checkpoint_info(root / "ck" / f"p3-{strategy}", STEPS)["world_size"] == 3


# -- NaN / Inf -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,skipped,nan_param", [
    ("nan-gpt", 1, "tok_emb.weight"), ("nan-shape", 2, "layers.0.mlp.gate_proj.weight")])
@pytest.mark.slow
def test_nan_in_one_ranks_gradient_is_skipped_everywhere(root, first, name, skipped, nan_param):
    assert f"wrote NaN into its gradient shard of {nan_param} at step {skipped}" in first.output
    run_dir = root / "out" / name
    assert json.loads((run_dir / "run.json").read_text())["skipped_steps"] == [skipped]
    assert json.loads((run_dir / "DONE").read_text())["skipped_steps"] == 1
    rows = metric_rows(run_dir, "skipped")
    assert {(int(r["rank"]), int(r["step"])) for r in rows if float(r["value"])} == \
        {(0, skipped), (1, skipped)}
    assert len(rows) == 2 * STEPS
    state = flat_state(root / "ck" / name, STEPS, root / "flat")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert all(bool(t.float().isfinite().all()) for t in tensors.values())
    # no optimizer took that step: every step counter (NorMuon's and AdamW's) says 3, not 4
    counters = {k: float(v) for k, v in tensors.items() if k.endswith(".step")}
    assert counters and set(counters.values()) == {STEPS - 1.0}, counters


@pytest.mark.slow
def test_nan_with_nonfinite_raise_fails_the_job(root):
    out = one_run(2, [*MODEL_SETS["gpt"], f"output.dir={root / 'raise'}", "output.name=r",
                      "train.steps=3", "optimizer.nonfinite=raise"],
                  faults=["nan_step=1", "nan_rank=1"])
    assert out.returncode != 0
    assert "FloatingPointError" in out.output and "nonfinite='raise'" in out.output
    assert not (root / "raise" / "r" / "DONE").exists()
    assert not (root / "raise" / "r" / "metrics.csv").exists()


# -- faults ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_rank_fails_its_sweep_point_within_the_timeout(tmp_path, monkeypatch):
    from dist_ortho.studies.sweep import load_study, run_sweep

    timeout_s = 20
    ck = tmp_path / "ck"
    study = {"name": "killed", "base": str(TINY), "output_dir": str(tmp_path / "results"),
             "point_timeout_s": 120,
             "set": {"model.preset": "gpt-tiny", "train.data": "synthetic", "train.seq_len": 32,
                     "train.steps": 6, "train.warmup_steps": 1, "profiling.memory": False,
                     "checkpoint.dir": str(ck), "checkpoint.every": 1,
                     "dist.timeout_s": timeout_s},
             "grid": {"strategies": ["replicated"], "world_sizes": [2]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    # the testing aid reaches every rank of every point through the environment
    monkeypatch.setenv("DIST_ORTHO_FAULTS", "fail_step=3 fail_rank=1")
    result = run_sweep(load_study(tmp_path / "s.yaml"), stream=io.StringIO())
    ended = time.time()
    (r,) = result.results
    log = r.log.read_text()
    assert r.status == "failed" and r.returncode != 0, (r.status, log[-3000:])
    assert ended - fault_time(log) < timeout_s + 10
    assert "Signal 9 (SIGKILL)" in log and "rank 0 of 2 stopped at step 3" in log
    # one line: the first failing rank and why, not torchrun's report, and where each rank was
    # (rank 1 died between its gradients and its optimizer step)
    assert r.error.startswith("rank 1 was killed by SIGKILL (signal 9) [rank 1 at step 3; "
                              "rank 0 at step 3, "), r.error
    assert "\n" not in r.error
    with open(result.failures) as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "failed" and row["point"] == r.job.name
    assert row["error"] == r.error
    assert not (r.job.run_dir / "DONE").exists()
    assert not (r.job.run_dir / "metrics.csv").exists()
    assert not (tmp_path / "results" / "killed" / "summary.csv").exists()
    # steps 0..2 were saved after each step; the killed step 3 left nothing
    assert checkpoint.latest_step(ck) == 3
    assert checkpoint.checkpoint_info(ck)["step"] == 3
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000001", "step_00000002",
                                                    "step_00000003"]


@pytest.mark.slow
def test_rank_killed_in_a_save_leaves_no_checkpoint_and_resume_recovers(root, first):
    ck = root / "ck" / "killed-save"
    sets = [*MODEL_SETS["shape"], f"output.dir={root / 'out'}", "output.name=killed-save",
            f"checkpoint.dir={ck}", "checkpoint.every=1", f"train.steps={STEPS}"]
    out = one_run(2, sets, faults=["fail_step=1", "fail_rank=1", "fail_mode=kill_in_save"])
    assert out.returncode != 0
    assert out.ended - fault_time(out.output) < 60 + 10
    assert (ck / ".step_00000002.partial").is_dir()  # rank 0 had started the save
    assert not (ck / "step_00000002").exists()
    assert checkpoint.latest_step(ck) == 1
    assert not (root / "out" / "killed-save" / "DONE").exists()
    # the same run resumed: it continues from step 1, clears the partial save, and ends where
    # the uninterrupted run ended, bit for bit
    again = one_run(2, sets, resume=True)
    assert again.returncode == 0, again.output[-4000:]
    assert "resumed from" in again.output
    assert not (ck / ".step_00000002.partial").exists()
    assert mismatches(flat_state(ck, STEPS, root / "flat"),
                      flat_state(root / "ck" / "full-shape-replicated", STEPS, root / "flat")) == []


@pytest.mark.slow
def test_hung_rank_ends_the_job_at_the_timeout(root):
    # long enough that ranks of a loaded 2-core machine reach step 1 before any collective times
    # out (3 s was not), short enough to show the hang is ended by the timeout
    timeout_s = 10
    out = one_run(2, [*MODEL_SETS["shape"], f"output.dir={root / 'hang'}", "output.name=h",
                      f"checkpoint.dir={root / 'ck' / 'hang'}", "train.steps=4",
                      f"dist.timeout_s={timeout_s}"],
                  faults=["fail_step=1", "fail_rank=1", "fail_mode=hang"])
    waited = out.ended - fault_time(out.output)
    assert out.returncode != 0
    assert timeout_s - 0.5 < waited < timeout_s + 15, waited  # ended by the timeout, soon after
    assert "rank 0 of 2 stopped at step 1" in out.output
    assert not (root / "hang" / "h" / "DONE").exists()
    assert checkpoint.latest_step(root / "ck" / "hang") is None


# -- config errors
# ----------------------------------------------------------------------------------
INVALID = [
    (["optimizer.nonfinite=ignore"], [], "optimizer.nonfinite", "skip, raise"),
    (["train.steps=3", "train.warmup_steps=1"], ["nan_step=3"], "faults.nan_step",
     "train.steps=3"),
    ([], ["nan_step=-1"], "faults.nan_step", ">= 0"),
    ([], ["nan_rank=-1"], "faults.nan_rank", ">= 0"),
    ([], ["nan_param=''"], "faults.nan_param", "parameter name"),
    ([], ["fail_step=20"], "faults.fail_step", "train.steps=20"),
    ([], ["fail_rank=-2"], "faults.fail_rank", ">= 0"),
    ([], ["fail_mode=explode"], "faults.fail_mode", "kill, hang, raise, kill_in_save"),
    ([], ["fail_stp=1"], "faults.fail_stp", "did you mean 'fail_step'"),
    ([], ["fail_step=1", "fail_mode=kill_in_save"], "faults.fail_step",
     "checkpoint save after step 1"),
    (["checkpoint.dir=c", "checkpoint.every=2"], ["fail_step=0", "fail_mode=kill_in_save"],
     "faults.fail_step", "checkpoint.every=2"),
    (["checkpoint.resume=true", "checkpoint.every=0"], [], "checkpoint.dir", "resume"),
]


@pytest.mark.parametrize("sets,faults,key,phrase", INVALID, ids=[k for _, _, k, _ in INVALID])
def test_reliability_config_errors_name_their_key(sets, faults, key, phrase):
    with pytest.raises(ConfigError) as info:
        config = load_config(None, sets)
        from_sources(faults, environ={}).check_against(config, world_size=2)
    assert info.value.key == key and phrase in str(info.value), str(info.value)


@pytest.mark.slow
def test_testing_aids_stay_out_of_the_config_and_its_hash(root, first):
    run_dir = root / "out" / "nan-gpt"
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["faults"]["nan_step"] == 1 and facts["faults"]["nan_rank"] == 1
    recorded = load_config(run_dir / "config.yaml")  # the resolved config the run recorded
    assert config_hash(recorded) == facts["config_hash"]
    assert json.loads((run_dir / "DONE").read_text())["config_hash"] == facts["config_hash"]
    clean = json.loads((root / "out" / "full-gpt-replicated" / "run.json").read_text())
    assert clean["faults"] is None
    # the same settings without the testing aid hash the same: only checkpointing differs,
    # which the hash leaves out
    assert config_hash(recorded) == clean["config_hash"]


@pytest.fixture
def one_process():
    """In-process runs start a one-rank group and set one thread; undo both."""
    import torch.distributed as dist

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    assert not dist.is_initialized(), "a failed build_run left its process group behind"


@pytest.mark.parametrize("faults,key", [
    (["fail_step=1", "fail_rank=1"], "faults.fail_rank"),  # checked before the group starts
    (["nan_step=1", "nan_rank=3"], "faults.nan_rank"),
    (["nan_step=1", "nan_param=nope.weight"], "faults.nan_param"),  # checked once the model is
])                                                                  # built, before a collective
def test_runtime_config_errors_before_any_collective(one_process, tmp_path, faults, key):
    from dist_ortho.studies.run import build_run

    config = load_config(TINY, [f"output.dir={tmp_path / 'unused'}"])
    with pytest.raises(ConfigError) as info:
        build_run(config, from_sources(faults, environ={}))
    assert info.value.key == key


@pytest.mark.parametrize("overrides,key", [
    (["model.num_layers=1"], "model.num_layers"),
    (["train.batch_size=6"], "train.batch_size"),  # 6 x 1 rank, saved with 6 x 2
    (["train.seed=5"], "train.seed"),
    (["train.steps=3", "train.warmup_steps=1"], "train.steps"),  # the checkpoint is at step 4
])
@pytest.mark.slow
def test_resume_into_a_different_run_is_a_config_error(root, first, one_process, overrides, key):
    from dist_ortho.studies.run import build_run

    config = load_config(TINY, [*MODEL_SETS["gpt"], "train.batch_size=12",
                                f"output.dir={root / 'unused'}",
                                f"checkpoint.dir={root / 'ck' / 'full-gpt-replicated'}",
                                "checkpoint.resume=true", *overrides])
    with pytest.raises(ConfigError) as info:
        build_run(config)
    assert info.value.key == key


def test_resume_flag_without_a_directory_is_refused(capsys):
    import argparse

    from dist_ortho.studies.run import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args([str(TINY), "--resume"])) == 2
    assert "checkpoint.dir: is null but checkpoint.resume is true" in capsys.readouterr().err
