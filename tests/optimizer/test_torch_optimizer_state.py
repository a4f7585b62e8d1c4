"""`build_optimizers`' result speaks torch's optimizer state-dict API: `get_optimizer_state_dict`
/ `set_optimizer_state_dict` round-trip bitwise (nested and flattened, every strategy, FSDP2 on 2
gloo ranks), and its state reshards through DCP: saved under FSDP on 2 ranks, loaded under
FSDP x TP 2 x 2, a step, saved, loaded under FSDP on 4 ranks, a step; the weights stay within
the float bound of the uninterrupted run (tests/optimizer/torch_state_cases.py)."""

from __future__ import annotations

import tempfile

from dist_ortho import strategies
from dist_ortho.testing.processes import spawn
from tests import tolerances
from tests.optimizer import torch_state_cases


def test_get_and_set_optimizer_state_dict_round_trip_bitwise_for_every_strategy():
    names = strategies.available_exact()
    results = spawn(torch_state_cases.roundtrip_worker, 2, args=(names,))
    for rank, per_case in enumerate(results):
        assert len(per_case) == 2 * len(names)
        for key, res in per_case.items():
            assert res["same_keys"] and res["bitwise_state"], (key, rank, res["differ"])
            assert res["bitwise_next_step"], (key, rank)
            assert res["names"], (key, res["keys"][:8])  # keyed by parameter names


def test_dcp_reshards_fsdp2_to_fsdp_x_tp_to_fsdp4_within_the_float_bound():
    with tempfile.TemporaryDirectory() as root:
        uninterrupted = spawn(torch_state_cases.save_worker, 2, args=(root,))[0]
        resumed = spawn(torch_state_cases.reshard_worker, 4, args=(root,))[0]
    for label, step in (("fsdp_x_tp", 3), ("fsdp4", 4)):
        bounds = torch_state_cases.reference_bounds(step)["bounds"]
        params, want = resumed[label], uninterrupted[step]
        assert params.keys() == want.keys()
        ratios = [float((params[n] - want[n]).norm()) / (2 * bounds[n]) for n in params]
        tolerances.report("DCP reshard vs uninterrupted, float32", ratios)
        assert max(ratios) <= 1.0, (label, max(ratios))
