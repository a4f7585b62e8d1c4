"""What torchtitan's trainer needs to run on CPU with gloo (used by the torchtitan tests only).

Each patch says why. Applied in every rank before torchtitan is imported (`apply()`).
"""

from __future__ import annotations

import sys
import types

import torch


def apply() -> None:
    # `import torchtitan.train` imports torchtitan's async expert-parallel Triton kernels
    # (torchtitan.distributed.minimal_async_ep.kernels: `import triton` at the top); the CPU
    # wheel of torch has no triton. A stand-in module whose kernels raise if ever launched
    # satisfies the import (a fake `triton` would mislead torch's own triton detection).
    name = "torchtitan.distributed.minimal_async_ep.kernels"
    try:
        import triton  # noqa: F401
    except ImportError:
        kernels = types.ModuleType(name)

        def __getattr__(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def unavailable(*args, **kwargs):
                raise RuntimeError(f"{name}.{attr} needs triton (CUDA)")
            return unavailable

        kernels.__getattr__ = __getattr__
        sys.modules.setdefault(name, kernels)

    # torch.cpu lacks the memory-statistics functions torchtitan's memory monitor calls on its
    # device module (torch.cuda has them): report nothing (zeros) instead of failing.
    cpu = torch.cpu
    for name, value in (("get_device_name", lambda *a, **k: "cpu"),
                        ("get_device_properties",
                         lambda *a, **k: types.SimpleNamespace(total_memory=1 << 30)),
                        ("reset_peak_memory_stats", lambda *a, **k: None),
                        ("empty_cache", lambda *a, **k: None),
                        ("memory_stats", lambda *a, **k: {}),
                        ("set_device", lambda *a, **k: None)):
        if not hasattr(cpu, name):
            setattr(cpu, name, value)

    # After its first step torchtitan shortens every process group's timeout
    # (dist_utils.set_pg_timeouts): a barrier with device_ids=[current device] (CUDA only; on CPU
    # the id is the string "cpu") and torch.distributed.set_timeout, which torch 2.13 does not
    # have. Timeouts only matter for hangs, which the tests' own timeout covers: skip it.
    from torchtitan.distributed import utils as dist_utils
    dist_utils.set_pg_timeouts = lambda *args, **kwargs: None

    # FSDP2 averages gradients with a PREMUL_SUM reduce-scatter when it can; gloo has no
    # PREMUL_SUM. torchtitan sets the divide factor to 1 (it scales the loss by the global token
    # count itself), and forcing plain SUM reductions gives the same sum on gloo.
    from torch.distributed.fsdp import FSDPModule
    original = FSDPModule.set_gradient_divide_factor

    def set_gradient_divide_factor(self, factor: float) -> None:
        original(self, factor)
        self.set_force_sum_reduction_for_comms(True)

    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor

    # torchtitan picks its device at import: the first available accelerator, else "cuda".
    # On a CPU machine that is "cuda"; make it "cpu" (and its device module torch.cpu).
    from torchtitan.tools import utils
    utils.device_type, utils.device_module = "cpu", torch.cpu
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("torchtitan") and \
                getattr(module, "device_type", None) == "cuda":
            module.device_type, module.device_module = "cpu", torch.cpu


def cpu_attention(model_config) -> None:
    """FlexAttention (torchtitan's language-model attention) has no CPU backward; give every
    layer torch's scaled_dot_product_attention instead: causal, without torchtitan's
    per-document masks (documents packed into one sequence attend to earlier ones), which
    torchtitan supports as a maskless backend. The same model on 1 and on N ranks."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    for layer in model_config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
