"""Blocked time split into transfer and waiting for a slower rank (profiling.transfer), and
co-located ranks' contention in the compute model (calibration.contention_of,
timemodel.shared_makespan)."""

from __future__ import annotations

import pytest
import torch

from dist_ortho.profiling import costmodel as cm
from dist_ortho.profiling.calibration import NSSample, contention_of
from dist_ortho.profiling.transfer import TransferClock, busy_seconds
from dist_ortho.testing.processes import spawn
from tests.profiling import transfer_cases


def test_waiting_for_a_late_rank_is_not_transfer():
    """Rank 1 reaches the all-reduce 1 s late: rank 0 waited most of it, rank 1 did not, and the
    transfer (completion after the last arrival) is far below the wait; the asynchronous
    all-to-all is aligned too (its end from the Work's future)."""
    late = transfer_cases.LATE_S
    out = spawn(transfer_cases.late_rank_worker, 2)
    assert [r["collectives"] for r in out] == [2, 2]
    assert out[0]["wait"] >= 0.5 * late and out[1]["wait"] < 0.1 * late
    assert out[0]["transfer"] == out[1]["transfer"] < 0.5 * late
    assert out[0]["max_wait"] == out[1]["max_wait"] == pytest.approx(out[0]["wait"])


def test_transfer_is_the_union_of_in_flight_intervals():
    """Two collectives every rank issued at 0 ns, done at 10 and 20 ns: the link was busy 20 ns,
    not 30 (the second queued behind the first); disjoint and nested intervals add up right."""
    assert busy_seconds(torch.tensor([0, 0]), torch.tensor([10, 20])) == pytest.approx(20e-9)
    assert busy_seconds(torch.tensor([0, 30, 5]), torch.tensor([10, 40, 8])) == pytest.approx(
        20e-9)
    assert busy_seconds(torch.tensor([5, 0]), torch.tensor([5, 0])) == 0.0
    clock = TransferClock()  # one process: split() needs no process group
    clock._spans = [[0, 10], [0, 20]]
    assert clock.split().transfer_s == pytest.approx(20e-9)


def test_queued_collectives_are_not_counted_twice():
    """QUEUED asynchronous all-to-alls issued at once on 2 ranks: the transfer fits inside the
    window that holds them all (summing each one's issue-to-completion time would exceed it
    several times over)."""
    out = spawn(transfer_cases.queued_worker, 2)
    for r in out:
        assert r["collectives"] == transfer_cases.QUEUED
        assert 0 < r["transfer"] <= r["window"]


def _ns(shape, seconds):
    return NSSample(shape, 1, seconds)


def test_contention_is_the_slowdown_beyond_sharing_cores():
    """3 ranks on 2 cores: sharing alone makes each 1.5x slower; measured 1.65x means each of
    the 2 core-sharing ranks slows the other by 10%."""
    alone = [_ns((8, 8), 1.0), _ns((16, 16), 2.0), _ns((32, 32), 4.0)]
    loaded = [_ns((8, 8), 1.65), _ns((16, 16), 3.3), _ns((32, 32), 9.9)]  # median 1.65
    assert contention_of(alone, loaded, 3, 2.0) == pytest.approx(0.1)
    assert contention_of(alone, loaded, 1, 2.0) == 0.0 and contention_of(alone, loaded, 3,
                                                                          None) == 0.0
    faster = [_ns(s.shape, 0.5 * s.seconds) for s in alone]
    assert contention_of(alone, faster, 2, 2.0) == 0.0


def test_shared_makespan_slows_busy_ranks_by_contention():
    # two ranks on two cores, 10% contention: both finish at 1.1; alone a rank runs at full speed
    assert cm.shared_makespan([1.0, 1.0], 2, 0.1) == pytest.approx([1.1, 1.1])
    assert cm.shared_makespan([1.0, 0.0], 2, 0.1) == pytest.approx([1.0, 0.0])
    # one finishes early: the other runs its last part alone, at full speed
    assert cm.shared_makespan([1.0, 2.0], 2, 0.1) == pytest.approx([1.1, 2.1])
    # four ranks on two cores: half speed each, and the two cores slow each other by 10%
    assert cm.shared_makespan([1.0] * 4, 2, 0.1) == pytest.approx([2.2] * 4)
    with pytest.raises(ValueError, match="contention"):
        cm.ComputeModel(1e9, contention=-0.1)
