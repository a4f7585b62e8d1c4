"""GPU readiness, checked as far as a CPU can, and on a GPU where there is one.

On any machine: a step of every strategy on meta-device parameters (a tensor made on the CPU where
the parameter's device was needed raises), Newton-Schulz on fake "cuda" tensors (FakeTensorMode
fakes CUDA without one), the host syncs of a step counted at P = 1 against the documented number
(`dist_ortho.optim.optimizer.HOST_SYNCS_PER_STEP`; on 2 gloo ranks in
tests/strategies/test_every_strategy_matches_the_reference.py), and bench/gpu_check.sh's no-GPU path
and dry run. With CUDA (bench/gpu_check.sh runs this file on the GPU): an FSDP2 step of every
strategy on an NCCL group of one rank against the reference, and the host syncs of a CUDA step, also
as torch's CUDA sync debug mode sees them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dist_ortho.optim.optimizer as optimizer_module
from dist_ortho import Muon, NorMuon, strategies
from dist_ortho.core.newton_schulz import NSConfig, newton_schulz
from dist_ortho.core.orthogonalizer import Orthogonalizer
from dist_ortho.models import ShapeConfig
from dist_ortho.optim.optimizer import HOST_SYNCS_PER_STEP
from dist_ortho.optim.reference import ReferenceHParams, reference_step
from dist_ortho.studies import run as run_module
from dist_ortho.studies.config import ConfigError, load_config, resolve, run_device_type
from dist_ortho.testing import gpu_check
from tests.optimizer import gpu_cases

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = strategies.available_exact()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these CPU checks are tiny, and two threads on a shared 2-core
    machine spin against other jobs (20x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- without a GPU --------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [NorMuon, Muon])
def test_meta_step_of_every_strategy_keeps_state_and_results_on_the_parameters_device(
        optimizer, monkeypatch):
    # meta tensors have no values: the one host sync (the non-finite verdict) is answered here
    monkeypatch.setattr(optimizer_module, "count_nonfinite",
                        lambda *args, flag=None, **kwargs: 0 if flag is None else (0, 0))
    for name in STRATEGIES:
        params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in gpu_cases.SHAPES]
        opt = optimizer(params, strategy=name)
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
        opt.step()
        # "auto" picks bfloat16 off the CPU; results travel in it
        assert opt.plan().matrices[0].out_dtype == torch.bfloat16, name
        for p in params:
            assert p.device.type == "meta", name
            assert all(t.device.type == "meta" for t in opt.state[p].values()
                       if isinstance(t, torch.Tensor) and t.ndim), (name, opt.state[p].keys())


def test_optimizer_plans_for_fake_cuda_parameters_on_their_device_in_bfloat16():
    # a CPU build of torch cannot index fake CUDA tensors (its Python indexing path needs a CUDA
    # device guard), so the step itself is checked on meta tensors above and on a GPU below
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.empty(s, device="cuda")) for s in gpu_cases.SHAPES]
        for name in STRATEGIES:
            plan, run = NorMuon(params, strategy=name)._planned()
            assert run.layout.device.type == "cuda", name
            assert {m.out_dtype for m in plan.matrices} == {torch.bfloat16}, name


def test_newton_schulz_on_fake_cuda_tensors_runs_in_bfloat16_on_cuda():
    with FakeTensorMode():
        for shape in ((1, 8, 6), (2, 12, 5), (1, 4, 54)):
            g = torch.empty(shape, device="cuda")
            out = Orthogonalizer([NSConfig(), NSConfig()], torch.device("cuda")).run(
                list(range(shape[0])), g)
            assert out.device.type == "cuda" and out.dtype == torch.bfloat16
            assert out.shape == g.shape
            assert newton_schulz(g, 5, torch.float32).device.type == "cuda"


@pytest.mark.parametrize("optimizer", [NorMuon, Muon])
def test_host_syncs_per_step_p1_equal_the_documented_number(optimizer):
    for name in STRATEGIES:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in gpu_cases.SHAPES]
        events = gpu_cases.step_syncs(params, lambda ps, n=name: optimizer(ps, strategy=n))
        gpu_cases.assert_one_sync_per_step(events, (optimizer.__name__, name))


def test_a_stack_of_mixed_ns_settings_is_split_without_a_host_sync():
    configs = [NSConfig(5, "float32"), NSConfig(3, "float32"), NSConfig(5, "float32"),
               NSConfig(5, "float32", "polar_express")]
    stack = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(0))
    with gpu_cases.HostSyncCounter() as counter:
        out = Orthogonalizer(configs, torch.device("cpu")).run([0, 1, 2, 3], stack)
    assert counter.events == []
    for j, config in enumerate(configs):
        alone = Orthogonalizer([config], torch.device("cpu")).run([0], stack[j:j + 1])[0]
        # 0 and 2 ran as one batched call: another kernel path than one alone, so not bitwise
        torch.testing.assert_close(out[j], alone, rtol=1e-4, atol=1e-5, msg=str(j))


def test_host_sync_counter_sees_every_kind_of_sync():
    x = torch.ones(4)
    with gpu_cases.HostSyncCounter() as counter:
        x.sum().item()
        bool(x.sum() > 0)
        x.tolist()
        x.cpu()
        x.nonzero()
    assert [kind for kind, _ in counter.events] == [
        "scalar", "scalar", "method", "method", "data-dependent shape"]
    assert torch.Tensor.cpu is not None and x.cpu() is x  # methods restored


def test_the_host_syncs_are_documented_where_gpu_users_look():
    page = (ROOT / "docs" / "gpus.md").read_text()
    assert "HOST_SYNCS_PER_STEP" in page and "one host sync" in page
    assert "HOST_SYNCS_PER_STEP[nonfinite]`" in optimizer_module.__doc__


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "no CUDA GPU" in proc.stdout, proc.stdout
    assert proc.stderr == "" and list(tmp_path.iterdir()) == []


def test_gpu_check_module_without_a_gpu_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU" in out
    assert not (tmp_path / "out").exists()


def test_gpu_check_dry_run_lists_every_check(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    names = [c.name for c in gpu_check.CHECKS]
    assert names == ["environment", "nccl_strategies", "stream_overlap", "cuda_graph",
                     "profiled_run", "calibrate_ns", "hbm_compute", "tests_cuda",
                     "tests_gloo_multirank"]
    for name in names:
        assert f"\n{name} (budget" in "\n" + out, name
    listed = {line.split(" (budget")[0] for line in out.splitlines() if " (budget" in line}
    assert listed == set(names)
    for word in [*STRATEGIES, "bfloat16", "float32", "llama-1b", "llama-8b", "llama-70b",
                 "DIST_ORTHO_TEST_DEVICE='cuda'", "CUDA_VISIBLE_DEVICES=''", "HBM",
                 gpu_check.RUN_CONFIG, "ns_dtype auto", "trace", "reduce-scatter starts before",
                 "autograd device thread", "CUDA graph"]:
        assert word in out, word
    # each check has its own budget, and together they fit the 8 minutes a GPU is lent for
    assert sum(c.budget_s for c in gpu_check.CHECKS) <= gpu_check.TOTAL_BUDGET_S < 8 * 60


def test_gpu_check_runs_every_check_past_a_failure_and_a_timeout(tmp_path, monkeypatch):
    py = sys.executable
    checks = (gpu_check.Check("fails", 20, "exits 3", (py, "-c", "import sys; sys.exit(3)")),
              gpu_check.Check("hangs", 1, "sleeps", (py, "-c", "import time; time.sleep(30)")),
              gpu_check.Check("passes", 20, "writes", (py, "-c", "open('{out}/x.json', 'w')"),
                              (("SOME_VAR", "1"),)))
    monkeypatch.setattr(gpu_check, "CHECKS", checks)
    rows = gpu_check.run_checks(tmp_path)
    assert [(r["check"], r["status"]) for r in rows] == [
        ("fails", "failed"), ("hangs", "timeout"), ("passes", "ok")]
    assert rows[1]["seconds"] < 15 and (tmp_path / "x.json").is_file()
    assert (tmp_path / "logs" / "fails.log").read_text().startswith("$ ")
    text = gpu_check.summary_markdown(tmp_path, rows)
    assert "| fails | failed |" in text and "| hangs | timeout |" in text


def test_gpu_check_measuring_steps_run_on_the_cpu_with_small_shapes(tmp_path):
    # a Llama-like family whose NS FLOPs span 60x, so the fit holds on a loaded CPU
    family = ShapeConfig(hidden=256, intermediate=1024, n_heads=4, n_kv_heads=1, head_dim=64,
                         num_layers=1)
    cal = gpu_check.step_calibrate_ns(tmp_path, "cpu", families=(family,), dtypes=("float32",),
                                      elementwise_sets=([(32, 32)] * 4, [(64, 64)] * 2))
    (row,) = cal["ns"]
    assert row["shapes"] == [[64, 256], [256, 256], [256, 1024], [1024, 256]]
    assert row["fitted_flops_per_s"] > 0
    assert row["measured_over_preset"] > 0 and cal["elementwise"]["s_per_element"] >= 0
    hw = gpu_check.step_hbm_compute(tmp_path, "cpu", copy_numel=2**16, matmul_n=64)
    assert hw["hbm_bytes_per_s"] > 0 and [m["dtype"] for m in hw["matmul"]] == [
        "bfloat16", "float32", "tf32"]
    (tmp_path / "calibrate_ns.json").write_text(json.dumps(cal))
    (tmp_path / "hbm_compute.json").write_text(json.dumps(hw))
    (tmp_path / "profiled_run.json").write_text(json.dumps({"step_mem_peak_bytes": "?"}))
    text = gpu_check.summary_markdown(tmp_path, [])
    assert "| ShapeConfig(hidden=256" in text and "HBM copy" in text
    assert "profiled_run.json could not be summarized" in text


def test_gpu_check_profiled_run_step_on_the_cpu_with_a_tiny_model(tmp_path):
    """The profiled-run check end to end on gloo/CPU (also on a GPU machine: gloo keeps the run
    on the CPU): a trace, memory peaks, phases, DONE."""
    facts = gpu_check.step_profiled_run(
        tmp_path, ("dist.backend=gloo", "model.preset=gpt-tiny", "train.seq_len=64",
                   "train.batch_size=2", "train.steps=3", "train.warmup_steps=1",
                   "profiling.trace_step=1"),
        expect=("cpu", "gloo", "float32"))
    assert facts["problems"] == [] and facts["traces"] == ["trace_rank0_step1.json"]
    assert facts["measured_steps"] == 2 and facts["step_mem_peak_bytes"] > 0
    assert "optimizer/orthogonalize/ns" in facts["phase_mean_s"]
    run_dir = Path(facts["run_dir"])
    assert gpu_check.run_problems(facts, run_dir, ("cuda", "nccl", "bfloat16")) == [
        "ran on cpu/gloo, not cuda/nccl", "ns_dtype auto resolved to float32, not bfloat16"]
    (run_dir / "DONE").unlink()
    assert gpu_check.run_problems({**facts, "traces": [], "step_mem_peak_bytes": 0}, run_dir,
                                  ("cpu", "gloo", "float32")) == [
        "no trace file", "no memory peak recorded", "no DONE marker"]


def test_the_backend_decides_the_device_gloo_keeps_ranks_on_the_cpu(monkeypatch):
    config = load_config(None, [])
    gloo = load_config(None, ["dist.backend=gloo"])
    assert run_device_type(config) == run_device_type(gloo) == "cpu"  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_device_type(config) == "cuda" and run_device_type(gloo) == "cpu"
    assert resolve(config, run_device_type(config)).dist.backend == "nccl"
    assert resolve(gloo, run_device_type(gloo)).optimizer.ns_dtype == "float32"
    # more ranks on a node than GPUs: one line naming the fix, before any CUDA call
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="local rank 1 has no GPU: 1 visible"):
        run_module._pick_device(config)


# --- on a GPU
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nccl_group():
    """An NCCL group of one rank in this process (one GPU cannot host two NCCL ranks)."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    yield init_device_mesh("cuda", (1,))
    if started:
        dist.destroy_process_group()


def _fsdp_model(mesh, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.Tanh(),
                                torch.nn.Linear(24, 16, bias=False)).cuda()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@needs_cuda
@pytest.mark.parametrize("name", STRATEGIES)
def test_nccl_p1_fsdp2_step_matches_the_reference(name, nccl_group):
    model = _fsdp_model(nccl_group, seed=0)
    params = list(model.parameters())
    opt = NorMuon(params, strategy=name, ns_dtype="float32", lr=0.02)
    ref_params = [p.full_tensor().detach().cpu().clone() for p in params]
    state: dict = {}
    hp = ReferenceHParams(lr=0.02, momentum=0.95, beta2=0.95, weight_decay=0.0, nesterov=True,
                          ns=NSConfig(5, "float32"))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)).cuda()
    for _ in range(3):
        model(x).square().mean().backward()
        grads = [p.grad.full_tensor().cpu() for p in params]
        opt.step()
        opt.zero_grad()
        reference_step(ref_params, grads, state, hp)
    for p, ref in zip(params, ref_params):
        assert p.to_local().device.type == "cuda"
        torch.testing.assert_close(p.full_tensor().cpu(), ref, rtol=1e-4, atol=1e-5)
    # ns_dtype auto: bfloat16 Newton-Schulz on the GPU, results travel in bfloat16
    auto = NorMuon(params, strategy=name)
    assert auto.plan().matrices[0].out_dtype == torch.bfloat16
    model(x).square().mean().backward()
    auto.step()
    assert all(torch.isfinite(p.full_tensor()).all() for p in params)


@needs_cuda
def test_cuda_step_makes_exactly_the_documented_host_syncs():
    for name in STRATEGIES:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda())
                  for s in gpu_cases.SHAPES]
        events = gpu_cases.step_syncs(params, lambda ps, n=name: NorMuon(ps, strategy=n))
        gpu_cases.assert_one_sync_per_step(events, name)
        opt = NorMuon(params, strategy=name)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # state allocated outside the count
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == HOST_SYNCS_PER_STEP["skip"], (name, [str(w.message) for w in syncs])


@needs_cuda
def test_cuda_mask_step_makes_no_host_sync_as_torch_sees_it():
    for name in STRATEGIES:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda())
                  for s in gpu_cases.SHAPES]
        opt = NorMuon(params, strategy=name, nonfinite="mask",
                      lr=torch.tensor(0.02, device="cuda"))
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # state allocated outside the check
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        assert bool(opt.last_step_ok), name
