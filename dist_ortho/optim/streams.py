"""Which CUDA stream the optimizer's work runs on, and the rules that keep it correct.

FSDP2 calls a sharded parameter's post-accumulate-grad hook inside `with stream(post_reduce)`,
for 1-D FSDP its reduce-scatter stream, and on CUDA from the autograd engine's device thread,
not the thread that called `backward()`. Kernels a hook launches there queue behind and ahead of
FSDP2's next reduce-scatters. So the optimizer keeps a stream of its own, and these rules hold:

1. Entering. Work started from a backward hook (momentum, the exchanges' issue and wait, Newton-
   Schulz) runs on the optimizer's stream. It is entered from the stream the hook was called on
   (the gradient's stream) by recording an event there and making the optimizer's stream wait for
   it: the gradient is complete before it is read, and FSDP2's stream never waits for the
   optimizer. Nothing is launched on FSDP2's streams.
2. Collectives. A collective issued from that work is ordered after the optimizer's stream
   (NCCL's stream waits for the issuing stream), and its `wait()` makes the optimizer's stream,
   not FSDP2's and not the default one, wait for it. Exchanges therefore travel while later
   buckets' NS run, and FSDP2's reduce-scatters (on their own communicator: the optimizer's
   collectives use a group of their own) run beside both.
3. Keeping buffers alive. A tensor allocated on one stream and used on another is handed to the
   caching allocator with `record_stream(user)` before the use: its memory is not reused until
   the user's work queued so far has completed. That covers the gradients and momentum buffers
   read on the optimizer's stream, and what the optimizer's stream produces for step() (the new
   momentum rows, NS(U) rows, the gradients' fingerprints). A collective's own buffers are kept
   by its process group (ProcessGroupNCCL records them on its stream, or holds them until the
   `wait()`), and the pipeline holds each exchange's buffers until that `wait()`.
4. Joining. `step()` makes its current stream wait for an event recorded on the optimizer's stream
   after the last work queued there, before it reads anything that work produced: FSDP2's own
   end-of-backward wait covers FSDP2's streams, not ours.
5. Step time. The step-time path runs on the caller's current stream; its collectives are issued
   async and waited for only where their result is needed, so NCCL's stream moves bucket k+1 while
   the current stream runs bucket k's NS (`bucketed_async`, `overlapped`).
6. Threads. Hooks may run on another thread than `step()`; the stream to enter from is always
   read in the thread running the hook (CUDA's current stream is per thread), and the optimizer's
   state is touched from one thread at a time (backward returns before step() starts).

On the CPU there are no streams: `Streams` keeps the same calls, does nothing, and, when given a
`log`, records each call (what, stream, from which stream, thread) so tests check the rules above
without a GPU. Its CPU "current stream" is per thread, like CUDA's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["Streams", "StreamCall", "OPTIMIZER_STREAM"]

OPTIMIZER_STREAM = "optimizer"


@dataclass(frozen=True)
class StreamCall:
    """One recorded call: `what` is "enter", "keep_alive" or "join"; `stream` the stream it acts
    on, `source` the other stream (entered from, kept alive for, waited for); `thread` the
    caller's thread id; `tensor` the storage pointer a keep_alive names (0 otherwise)."""

    what: str
    stream: str
    source: str
    thread: int
    tensor: int = 0


class Streams:
    """The optimizer's stream on `device` (CUDA) or its no-op stand-in (anything else)."""

    def __init__(self, device: torch.device, log: list[StreamCall] | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.log = log
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self._cpu = threading.local()  # the CPU stand-in's per-thread current stream
        self._done = None  # CUDA event after the last work queued on the optimizer's stream

    # -- names (what the CPU log and the tests see) -----------------------------------------------
    def current_name(self) -> str:
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            return OPTIMIZER_STREAM if current == self.side else f"cuda:{current.stream_id}"
        return getattr(self._cpu, "name", "default")

    def _record(self, what: str, stream: str, source: str, tensor: int = 0) -> None:
        if self.log is not None:
            self.log.append(StreamCall(what, stream, source, threading.get_ident(), tensor))

    # -- the rules ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def optimizer_stream(self) -> Iterator[None]:
        """Run the block on the optimizer's stream, entered from the current one (rule 1)."""
        source = self.current_name()
        self._record("enter", OPTIMIZER_STREAM, source)
        if not self.cuda:
            previous = getattr(self._cpu, "name", "default")
            self._cpu.name = OPTIMIZER_STREAM
            try:
                yield
            finally:
                self._cpu.name = previous
            return
        if source != OPTIMIZER_STREAM:
            self.side.wait_event(torch.cuda.current_stream(self.device).record_event())
        with torch.cuda.stream(self.side):
            try:
                yield
            finally:
                self._done = self.side.record_event()

    def keep_alive(self, tensors: Iterable[torch.Tensor | None], for_stream: str | None = None
                   ) -> None:
        """Rule 3: `tensors` are about to be used on `for_stream` (default: the current stream)."""
        name = for_stream or self.current_name()
        stream = None
        if self.cuda:
            stream = (self.side if name == OPTIMIZER_STREAM
                      else torch.cuda.current_stream(self.device))
        for t in tensors:
            if t is None:
                continue
            self._record("keep_alive", name, "", t.untyped_storage().data_ptr())
            if stream is not None and t.device.type == "cuda":
                t.record_stream(stream)

    def join(self) -> None:
        """Rule 4: the current stream waits for everything queued on the optimizer's stream."""
        self._record("join", self.current_name(), OPTIMIZER_STREAM)
        if self.cuda and self._done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done)
