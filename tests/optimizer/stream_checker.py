"""A CPU stand-in for a CUDA stream race detector, over `dist_ortho.optim.streams.Streams`.

On the CPU nothing runs concurrently, so a missing event or `record_stream` never shows. This
dispatch mode replays what a GPU would see: every ATen op is attributed to the stream `Streams`
says is current in the calling thread, every tensor storage remembers the stream that allocated it
and the stream and op count of its last write, and the `Streams` log (enter: the optimizer's
stream waits for the source stream; join: the current stream waits for the optimizer's) is
consumed in order as ops are dispatched. An op on stream S that reads a storage

- last written on stream W != S, where S has not waited for W since that write: "read before
  wait" (a missing event);
- allocated on stream A != S, with no keep-alive of that storage for S: "no keep-alive" (its
  memory could be reused under S's reads).

Storages made outside the mode (parameters, the first state) count as made on "default" before
anything. Ops that only read a tensor's metadata (`*_like` factories, views) read nothing. Every
tensor made under the mode is held until the mode is dropped, so no address is reused by memory
the mode cannot see being allocated (inside collectives and FSDP2's own ops).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dist_ortho.optim.streams import Streams

METADATA_ONLY = {"aten::empty_like", "aten::zeros_like", "aten::ones_like", "aten::full_like",
                 "aten::new_empty", "aten::new_zeros", "aten::new_ones", "aten::new_full",
                 "aten::empty_strided", "aten::detach", "aten::alias", "aten::lift_fresh"}


def _tensors(value) -> list[torch.Tensor]:
    flat, _ = tree_flatten(value)
    out = []
    for t in flat:
        if isinstance(t, DTensor):
            t = t._local_tensor
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            out.append(t)
    return out


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class StreamRaceChecker(TorchDispatchMode):
    """`problems`: one (kind, op, stream, other stream) per violation; `ops`: ops per stream."""

    def __init__(self, streams: Streams) -> None:
        super().__init__()
        self.streams = streams
        if streams.log is None:
            streams.log = []
        self._read = 0
        self.ops: dict[str, int] = defaultdict(int)
        self.seen: dict[str, dict[str, int]] = defaultdict(dict)  # S -> W -> W's count waited for
        self.alloc: dict[int, str] = {}
        self.written: dict[int, tuple[str, int]] = {}
        self.kept: set[tuple[int, str]] = set()
        self.problems: list[tuple[str, str, str, str]] = []
        self._held: list[torch.Tensor] = []

    def _consume_log(self) -> None:
        log = self.streams.log
        while self._read < len(log):
            call = log[self._read]
            self._read += 1
            if call.what == "enter" and call.source != call.stream:
                self.seen[call.stream][call.source] = self.ops[call.source]
            elif call.what == "join":
                self.seen[call.stream][call.source] = self.ops[call.source]
            elif call.what == "keep_alive":
                self.kept.add((call.tensor, call.stream))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._consume_log()
        stream = self.streams.current_name()
        self.ops[stream] += 1
        name = func._schema.name
        schema_args = func._schema.arguments
        values = [args[i] if i < len(args) else kwargs.get(a.name)
                  for i, a in enumerate(schema_args)]
        writes = [t for a, v in zip(schema_args, values)
                  if a.alias_info is not None and a.alias_info.is_write for t in _tensors(v)]
        if name not in METADATA_ONLY and not func.is_view:
            for t in _tensors(values):
                self._check_read(_key(t), name, stream)
        out = func(*args, **kwargs)
        count = self.ops[stream]
        for t in writes:
            self.written[_key(t)] = (stream, count)
        returns = func._schema.returns
        outs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for r, value in zip(returns, outs):
            if r.alias_info is None:  # a new tensor: made on this stream, by this op
                for t in _tensors(value):
                    key = _key(t)
                    self._held.append(t)
                    self.alloc[key] = stream
                    self.written[key] = (stream, count)
                    self.kept = {k for k in self.kept if k[0] != key}
        return out

    def _check_read(self, key: int, op: str, stream: str) -> None:
        writer, count = self.written.get(key, ("default", 0))
        if writer != stream and self.seen[stream].get(writer, -1) < count:
            self.problems.append(("read before wait", op, stream, writer))
        made = self.alloc.get(key, "default")
        if made != stream and (key, stream) not in self.kept:
            self.problems.append(("no keep-alive", op, stream, made))
