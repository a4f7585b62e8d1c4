import os
import sys

# Spawned workers unpickle their functions by module name (tests.strategies.dist_cases.<worker>),
# and torchrun children import tests.* too: keep the repository root importable in every child.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("PYTHONPATH", ROOT)

# Test-device switch: DIST_ORTHO_TEST_DEVICE=cuda runs the single-process tests with every tensor
# and module created on the GPU (torch.set_default_device, so the tests need no device argument);
# the tests that need several ranks spawn gloo processes on CPU tensors, which cannot be compared
# with GPU tensors of the test process, so they are skipped in that pass (bench/gpu_check.sh runs
# the multi-rank tests again on the CPU). Default: cpu, the tests as CI runs them.
import pytest  # noqa: E402
import torch  # noqa: E402

import dist_ortho.testing.processes  # noqa: E402
from tests.devices import TEST_DEVICE  # noqa: E402

if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"DIST_ORTHO_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
if TEST_DEVICE == "cuda":
    if not torch.cuda.is_available():
        raise pytest.UsageError("DIST_ORTHO_TEST_DEVICE=cuda but torch sees no CUDA GPU")

    def _spawn_on_cpu_only(fn, world_size, *args, **kwargs):
        pytest.skip(f"spawns {world_size} gloo rank(s) on CPU tensors: run without "
                    f"DIST_ORTHO_TEST_DEVICE=cuda")

    # test modules import `spawn` after this file is loaded, so they get the skipping one
    dist_ortho.testing.processes.spawn = _spawn_on_cpu_only


@pytest.fixture(autouse=True)
def _test_device():
    """Every tensor a test creates without a device lands on TEST_DEVICE."""
    if TEST_DEVICE == "cpu":
        yield
        return
    torch.set_default_device(TEST_DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(None)
