"""`build_optimizers`' result speaks torch's optimizer state-dict API: `get_optimizer_state_dict`
/ `set_optimizer_state_dict` round-trip bitwise (nested and flattened, every strategy, FSDP2 on 2
gloo ranks), and its state reshards through DCP: saved under FSDP on 2 ranks, loaded under
FSDP x TP 2 x 2 and FSDP on 4 ranks, the next step within the float bound of the uninterrupted
run (tests/torch_state_cases.py)."""

from __future__ import annotations

import tempfile

import pytest
import tolerances
import torch
import torch_state_cases

from dist_ortho import strategies
from dist_ortho.testing.processes import spawn


def test_get_and_set_optimizer_state_dict_round_trip_bitwise_for_every_strategy():
    names = strategies.available()
    results = spawn(torch_state_cases.roundtrip_worker, 2, args=(names,))
    for rank, per_case in enumerate(results):
        assert len(per_case) == 2 * len(names)
        for key, res in per_case.items():
            assert res["same_keys"] and res["bitwise_state"], (key, rank, res["differ"])
            assert res["bitwise_next_step"], (key, rank)
            assert res["names"], (key, res["keys"][:8])  # keyed by parameter names


def test_dcp_reshards_fsdp2_state_to_fsdp_x_tp_and_fsdp4_within_the_float_bound():
    with tempfile.TemporaryDirectory() as root:
        saved = spawn(torch_state_cases.save_worker, 2, args=(root,))
        resumed = spawn(torch_state_cases.reshard_worker, 4, args=(root,))
    ref = torch_state_cases.reference_bounds(3)
    uninterrupted = saved[0]["params"]
    for label in ("fsdp_x_tp", "fsdp4"):
        params = resumed[0][label]["params"]
        assert params.keys() == uninterrupted.keys()
        ratios = [float((params[n] - uninterrupted[n]).detach().norm()) / (2 * ref["bounds"][n])
                  for n in params]
        tolerances.report("DCP reshard vs uninterrupted, float32", ratios)
        assert max(ratios) <= 1.0, (label, max(ratios))
