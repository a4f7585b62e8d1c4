"""The communication constants are fitted on what an optimizer step issues: message sizes that
reach its exchanges' pieces, and each collective's median repeat (the statistic the validation
holds the model to), with every repeat kept."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.distributed as dist

from dist_ortho import strategies
from dist_ortho.models.shapes import matrix_shapes
from dist_ortho.profiling.calibration import (CALIBRATED_KINDS, COMM_SIZES, _run_collective,
                                              measure_collectives)
from dist_ortho.profiling.costmodel import predict
from dist_ortho.testing.processes import spawn


def test_calibrated_sizes_span_the_exchanges_of_a_benchmark_step():
    """The whole-group all-to-alls / all-gathers of transformer-bench (the validated model) lie
    inside the calibrated range of a fit at P = 3 (where the validation fits): at P = 3, 4 no
    piece sent to one peer is larger than the largest calibrated piece; at P = 2 (one peer) no
    call moves more than the largest calibrated call does at P = 3."""
    shapes = matrix_shapes("transformer-bench")
    largest = {}
    for P in (2, 3, 4):
        for name in strategies.available_exact():
            for cost in predict(shapes, P, name).plan.ranks:
                for c in cost.comm:
                    if c.group is None and c.kind in ("all_to_all", "all_gather"):
                        piece = max(c.send_bytes, c.recv_bytes) / (P - 1)
                        largest[P] = max(largest.get(P, 0.0), piece)
    assert largest[3] <= max(COMM_SIZES) and largest[4] <= max(COMM_SIZES)
    assert 2**20 < largest[2] <= (3 - 1) * max(COMM_SIZES)


def statistic_worker(rank: int, world_size: int) -> dict:
    out = {s: measure_collectives(None, sizes_bytes=(2**10, 2**14), repeats=5,
                                  kinds=("all_to_all",), statistic=s) for s in ("min", "median")}
    try:
        measure_collectives(None, sizes_bytes=(2**10,), statistic="mean")
    except ValueError as exc:
        out["error"] = str(exc)
    dist.barrier()
    return out


def test_collective_samples_keep_every_repeat_and_the_chosen_statistic():
    out = spawn(statistic_worker, 2)[0]
    for statistic, pick in (("min", min), ("median", statistics.median)):
        for s in out[statistic]:
            assert len(s.times) == 5
            assert s.seconds == pick(s.times)
    assert "statistic='mean'" in out["error"]


def fresh_buffer_worker(rank: int, world_size: int) -> dict:
    """Per kind: whether two calls received into different memory, and into what they received."""
    out = {}
    for kind in CALIBRATED_KINDS:
        op = _run_collective(kind, 8, None, torch.device("cpu"), world_size, rank)
        first, second = op(), op()
        if kind == "all_reduce" or first is None:
            continue  # in place, or this rank receives nothing (a root, a gather's sender)
        a, b = (t if isinstance(t, list) else [t] for t in (first, second))
        out[kind] = dict(shared=any(x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                                    for x in a for y in b),
                         ones=all(bool((x == 1).all()) for x in a + b))
    return out


def test_calibration_receives_into_new_buffers_as_a_step_does():
    """An optimizer step receives every exchange into buffers it has just allocated (first-touch
    page faults on a CPU host are part of the transfer); the calibration's calls do the same, and
    still receive the right values."""
    out = spawn(fresh_buffer_worker, 2)
    assert set(out[0]) | set(out[1]) == set(CALIBRATED_KINDS) - {"all_reduce"}
    for rank_out in out:
        for kind, r in rank_out.items():
            assert not r["shared"], kind
            assert r["ones"], kind
