"""The GPU acceptance script's stream check reads its verdict from a torch.profiler chrome trace
(dist_ortho.testing.gpu_step.reduce_scatter_before_ns_end); here on hand-made traces of the two
schedules it must tell apart: NS on the optimizer's own stream (a later unit's reduce-scatter
starts before an earlier unit's NS ends) and NS queued on FSDP2's reduce-scatter stream (it
cannot)."""

from __future__ import annotations

from dist_ortho.testing.gpu_step import reduce_scatter_before_ns_end

RS_STREAM, NS_STREAM, HOOK_THREAD = 7, 9, 2


def _trace(own_stream: bool) -> dict:
    events, corr = [], [0]

    def annotate(name, ts, dur):
        events.append({"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur,
                       "tid": HOOK_THREAD})

    def launch(ts, stream, start, dur):
        corr[0] += 1
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts,
                       "dur": 1, "tid": HOOK_THREAD, "args": {"correlation": corr[0]}})
        events.append({"ph": "X", "cat": "kernel", "name": "k", "ts": start, "dur": dur,
                       "tid": stream, "args": {"correlation": corr[0], "stream": stream}})

    annotate("FSDP::post_backward_reduce (2)", 0, 10)
    launch(5, RS_STREAM, 20, 1)  # unit 0's reduce-scatter; its hook only records arrival
    annotate("FSDP::post_backward_reduce (1)", 30, 30)
    launch(35, RS_STREAM, 40, 1)  # unit 1's reduce-scatter
    annotate("dist_ortho::overlap", 45, 13)  # unit 1's hook: bucket 0's NS (lag 1)
    annotate("dist_ortho::ns", 46, 4)
    launch(47, NS_STREAM if own_stream else RS_STREAM, 50, 100)
    annotate("FSDP::post_backward_reduce (0)", 70, 10)
    # unit 2's reduce-scatter: beside the NS, or queued behind it on the same stream
    launch(72, RS_STREAM, 90 if own_stream else 151, 1)
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1, "dur": 1, "tid": 1})
    return {"traceEvents": events}


def test_own_stream_reduce_scatter_starts_before_the_earlier_units_ns_ends():
    facts = reduce_scatter_before_ns_end(_trace(own_stream=True))
    assert facts["pairs"] == [{"ns": 0, "reduce_scatter": 2, "starts_before_ns_end": True}]
    assert facts["ns_streams"] == [NS_STREAM] and facts["reduce_scatter_streams"] == [RS_STREAM]
    assert [u["start"] for u in facts["units"]] == [20, 40, 90]


def test_ns_on_fsdp2_stream_is_reported_serialized():
    facts = reduce_scatter_before_ns_end(_trace(own_stream=False))
    assert facts["pairs"] == [{"ns": 0, "reduce_scatter": 2, "starts_before_ns_end": False}]
    assert set(facts["ns_streams"]) & set(facts["reduce_scatter_streams"])
