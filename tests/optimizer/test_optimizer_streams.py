"""The optimizer's stream rules (dist_ortho.optim.streams), checked on the CPU.

`Streams` does nothing on the CPU but records each call; tests/optimizer/stream_checker.py replays those
calls against every ATen op of a real FSDP2 training step (2 gloo ranks, strategy `overlapped`
with its work started from backward hooks) the way a GPU would order them, and reports a read
before the reading stream waited for the writer, or a cross-stream read without a keep-alive.
The same training with backward() called from another thread than step() (as CUDA's autograd
engine calls hooks from its device thread) gives the same weights bit for bit.
"""

from __future__ import annotations

import functools
import threading

import torch

from dist_ortho.optim.streams import OPTIMIZER_STREAM, StreamCall, Streams
from dist_ortho.testing.processes import spawn
from tests.optimizer import gpu_step_cases
from tests.optimizer.stream_checker import StreamRaceChecker


@functools.lru_cache(maxsize=None)
def run() -> list[dict]:
    return spawn(gpu_step_cases.stream_worker, 2)


def test_cpu_streams_do_nothing_but_record_where_work_goes_per_thread():
    streams = Streams(torch.device("cpu"), log=[])
    assert streams.current_name() == "default"
    names = {}
    with streams.optimizer_stream():
        names["inside"] = streams.current_name()
        other = threading.Thread(target=lambda: names.setdefault("other", streams.current_name()))
        other.start()
        other.join()
        streams.keep_alive([torch.ones(2), None])
    streams.join()
    assert names == {"inside": OPTIMIZER_STREAM, "other": "default"}  # current is per thread
    me = threading.get_ident()
    assert [(c.what, c.stream, c.source, c.thread) for c in streams.log] == [
        ("enter", OPTIMIZER_STREAM, "default", me), ("keep_alive", OPTIMIZER_STREAM, "", me),
        ("join", "default", OPTIMIZER_STREAM, me)]
    assert isinstance(streams.log[1], StreamCall) and streams.log[1].tensor != 0


def test_race_checker_reports_a_missing_keep_alive_and_a_missing_wait():
    streams = Streams(torch.device("cpu"))
    checker = StreamRaceChecker(streams)
    grad = torch.ones(4)
    with checker:
        made = grad * 2  # on "default"
        with streams.optimizer_stream():
            out = made + 1  # read on "optimizer" without a keep-alive of `made`
        out * 3  # read on "default" before joining the optimizer's stream
    assert [p[0] for p in checker.problems] == ["no keep-alive", "read before wait",
                                                "no keep-alive"]
    checker = StreamRaceChecker(streams)
    with checker:
        made = grad * 2
        with streams.optimizer_stream():
            streams.keep_alive([made])
            out = made + 1
        streams.join()
        streams.keep_alive([out])
        out * 3
    assert checker.problems == []


def test_work_started_in_backward_obeys_the_stream_rules_on_2_ranks():
    for rank, result in enumerate(run()):
        checked = result["checked"]
        assert checked["problems"] == [], (rank, checked["problems"][:5])
        # the hooks' work really ran on the optimizer's stream, entered from the gradient's
        assert checked["ops"][OPTIMIZER_STREAM] > 0 and checked["fallbacks"] == 0, rank
        log = checked["log"]
        assert ("enter", OPTIMIZER_STREAM, "default", True) in log, rank
        assert ("join", "default", OPTIMIZER_STREAM, True) in log, rank
        assert all(result["checked_equal"]), rank


def test_hooks_on_another_thread_than_step_give_the_same_weights_on_2_ranks():
    for rank, result in enumerate(run()):
        threaded = result["threaded"]
        # work entered from the backward thread (hooks) and from the step's (the rest)
        assert threaded["hook_threads_are_main"] == [False, True], rank
        assert threaded["fallbacks"] == 0, rank
        assert all(result["threaded_equal"]), rank
