"""Per-rank timelines (profiling.timeline), the Gantt chart (dist_ortho.reporting.timeline_plots)
and the interconnect emulation (profiling.interconnect) on a real 2-rank FSDP2 GPT with strategy
`overlapped` (worker: tests/strategies/overlap_cases.timeline_worker)."""

from __future__ import annotations

import functools
import tempfile

import pytest

from dist_ortho.profiling.hardware import get_preset
from dist_ortho.profiling.interconnect import emulated_link
from dist_ortho.profiling.timeline import LANES, Timeline, read_trace, step_marks
from dist_ortho.reporting.timeline_plots import plot_gantt
from dist_ortho.studies.config import ConfigError, load_config
from dist_ortho.studies.run_timeline import _Release
from dist_ortho.testing.processes import spawn
from tests.strategies import overlap_cases
from tests.strategies.test_every_strategy_matches_the_reference import assert_bytes_equal

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# this CPU's NS rate as the emulator is told it: h100 bf16 NS (989e12 x 0.5) is then 2000x faster,
# so an inter-node all-to-all of this model (~10 us on the target) takes ~20 ms here
CPU_RATE = 989e12 * 0.5 / 2000
_TMP = tempfile.TemporaryDirectory()


@functools.lru_cache(maxsize=None)
def run() -> list[dict]:
    return spawn(overlap_cases.timeline_worker, 2, args=(_TMP.name, CPU_RATE))


def test_emulation_delays_every_collective_and_changes_no_bit_or_byte():
    for rank, r in enumerate(run()):
        assert all(r["equal"]), rank  # the same update, emulated or not
        assert_bytes_equal(r["counted"], r["planned"], rank)  # bytes unchanged
        # each collective's span (issue to completion, as the timeline saw it) lasts at least its
        # emulated time; both lists are in issue order
        # (the profiler counted step 0 only; the timeline has every step's collectives, each
        # once: from the counter on step 0, from the emulator on step 1)
        spans = r["spans"]
        assert len(spans) == len(r["delays"]) > 0
        assert {step for *_, step in spans} == {0, 1}
        for (lane, kind, start, end, _), (kind2, nbytes, seconds) in zip(spans, r["delays"]):
            assert kind == kind2 and end is not None
            assert (end - start) / 1e9 >= seconds - 1e-3, (kind, nbytes, seconds, end - start)
        assert {lane for lane, *_ in spans} == {"fsdp comm", "optimizer comm"}


def test_trace_has_every_rank_phase_and_collective_and_draws_a_gantt(tmp_path):
    run()
    trace = read_trace(f"{_TMP.name}/trace.json")
    assert "emulated h100 inter-node" in trace["otherData"]["interconnect"]
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in events} == {0, 1}
    assert {e["tid"] for e in events} == set(range(len(LANES)))
    cats = {e["cat"] for e in events}
    assert {"forward", "backward", "overlap", "ns", "optimizer", "collective"} <= cats
    assert all(e["dur"] >= 0 for e in events)
    # the optimizer's work started inside backward: overlap spans lie within a backward span
    for e in (e for e in events if e["cat"] == "overlap"):
        assert any(b["pid"] == e["pid"] and b["cat"] == "backward" and b["ts"] <= e["ts"]
                   and e["ts"] + e["dur"] <= b["ts"] + b["dur"] + 1 for b in events), e
    marks = step_marks(trace)
    assert set(marks) == {0, 1} and all(m["exposed_s"] > 0 for m in marks.values())
    png = plot_gantt(trace, tmp_path / "g.png", title="t")
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_emulated_link_scale_and_bad_options():
    link = emulated_link("h100", "inter_node", 1e11)
    hw = get_preset("h100")
    assert link.scale == pytest.approx(hw.ns_flops_per_s("bfloat16") / 1e11)
    # alpha-beta: 3 latency steps at P = 4 for an all-to-all, bytes over the NIC's achievable rate
    want = 3 * hw.inter_node_latency_s + 1e6 / (hw.inter_node_bytes_per_s * hw.link_efficiency)
    assert link.seconds("all_to_all", 1e6, 4) == pytest.approx(link.scale * want)
    assert link.seconds("all_to_all", 1e6, 1) == 0.0
    with pytest.raises(ValueError, match="emulated link"):
        emulated_link("h100", "pcie", 1e11)
    with pytest.raises(ConfigError, match="profiling.emulate_hardware"):
        load_config(None, ["profiling.emulate_hardware=tpu"])
    with pytest.raises(ConfigError, match="profiling.emulate_link"):
        load_config(None, ["profiling.emulate_link=pcie"])


def _trace(optimizer_end_ms: float, steps: int = 8) -> dict:
    events = []
    for step in range(steps):
        t0 = step * 100_000.0
        for rank in (0, 1):
            for path, start, end in (("forward_backward/backward", 0, 10_000),
                                     ("optimizer", 10_000, optimizer_end_ms * 1e3)):
                events.append(dict(name=path.split("/")[-1], cat="x", ph="X", ts=t0 + start,
                                   dur=end - start + rank * 100, pid=rank, tid=0,
                                   args=dict(path=path, step=step, completed=True)))
    return dict(traceEvents=events, otherData=dict(interconnect="emulated test"))


def test_report_section_pairs_backward_and_step_with_the_prediction(tmp_path):
    import json

    from dist_ortho.reporting.timeline_plots import report_section

    for run, end in (("m--overlapped_backward--p2", 15.0), ("m--overlapped_step--p2", 30.0)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "trace.json").write_text(json.dumps(_trace(end)))
    (tmp_path / "m--overlapped_backward--p2" / "emulation.json").write_text(
        json.dumps(dict(predicted_exposed=dict(difference_s=0.018))))
    lines = report_section(tmp_path, ["m--overlapped_backward--p2", "m--overlapped_step--p2"],
                           tmp_path / "plots")
    text = "\n".join(lines)
    # exposed: optimizer end - backward end of the slowest rank (rank 1: +0.1 ms on each)
    assert "| m--overlapped_step--p2 | emulated test | 20.0 [20.0, 20.0] | 8 |" in text
    assert "| m--overlapped_backward--p2 | 15.0 | separate | 18.0 | 1.20 |" in text
    assert (tmp_path / "plots" / "gantt_m--overlapped_step--p2.png").is_file()


def test_every_run_marker_times_a_checkpoint_save():
    """Regression: the timeline and the emulator's release joined a run's markers without
    `for_checkpoint`, so the first checkpoint save of every run crashed with AttributeError."""
    timeline = Timeline(rank=0)
    try:
        timeline.step = 3
        for marker in (timeline, _Release()):
            with marker.for_checkpoint(3).phase("checkpoint_save"):
                pass
        assert [s.name for s in timeline.spans] == ["checkpoint_save"]
    finally:
        timeline.close()


def p2p_under_timeline_worker(rank: int, world_size: int) -> dict:
    """A batch of large point-to-point messages (gloo blocks a send until its receive is
    posted) under a timeline and the comm counter, as split_ns's member rounds run in a study."""
    import torch
    import torch.distributed as dist

    from dist_ortho.profiling.comm import CommCounter

    timeline = Timeline(rank)
    try:
        timeline.step = 0
        peer = 1 - rank
        send, recv = torch.full((1 << 20,), float(rank)), torch.empty(1 << 20)
        with CommCounter(), timeline.phase("ns"):
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer),
                                            dist.P2POp(dist.irecv, recv, peer)])
            for work in works:
                work.wait()
        return {"received": float(recv[0]),
                "kinds": sorted(s.name for s in timeline.spans if s.cat == "collective")}
    finally:
        timeline.close()


def test_regression_point_to_point_messages_under_a_timeline_do_not_deadlock():
    """Regression: the timeline waited at issue for every Work without a future, so a send inside
    `batch_isend_irecv` waited for a receive not yet posted, and split_ns's member rounds timed
    out at P = 4 in the default study."""
    from dist_ortho.testing import spawn

    out = spawn(p2p_under_timeline_worker, 2)
    assert [r["received"] for r in out] == [1.0, 0.0]
    assert all(len(r["kinds"]) == 2 for r in out), out
