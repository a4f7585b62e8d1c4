"""Count every collective where it happens: at the dispatcher, from the op's own arguments.

All c10d collectives (the `torch.distributed` calls FSDP2 and our strategies make, sync or async)
and the functional collectives DTensor uses pass through `TorchDispatchMode`, as torch's own
`CommDebugMode` relies on. `CommCounter` is such a mode: for each op it records the kind, the bytes
this rank sends to and receives from other ranks (the convention of `strategies.base`), the element
count, dtype, group size, and the phase the caller was in when it issued the op. An async
collective is recorded when issued, so it belongs to the issuing phase. Ops on DTensors are handed
to DTensor first (the mode answers NotImplemented), so collectives DTensor issues inside its own
dispatch, such as an implicit redistribution, are seen too.

Nothing is monkeypatched, and it works on any backend (gloo, NCCL, the fake process group).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from torch._C._distributed_c10d import ProcessGroup
from torch.distributed.distributed_c10d import _resolve_process_group, get_process_group_ranks
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from dist_ortho.core.plan import bytes_by_kind

__all__ = ["CommRecord", "CommCounter", "summarize", "add_listener", "remove_listener", "notify",
           "counter_tells"]

# called as fn(record, issue time in time.time_ns(), the op's output) for every collective a
# CommCounter records (profiling.timeline takes each collective's span from it)
_LISTENERS: list = []
# set while a CommCounter runs a collective it told the listeners about: a mode below it (the
# interconnect emulator) then leaves the telling to it, so each collective is told once
_TOLD = threading.local()


def add_listener(fn) -> None:
    _LISTENERS.append(fn)


def remove_listener(fn) -> None:
    if fn in _LISTENERS:
        _LISTENERS.remove(fn)


def notify(record, issued_ns: int, out) -> None:
    """Tell the listeners about a collective (CommCounter does; see `_TOLD`)."""
    for fn in list(_LISTENERS):
        fn(record, issued_ns, out)


def counter_tells() -> bool:
    """Whether a CommCounter above the caller will tell the listeners about this collective."""
    return getattr(_TOLD, "active", False)


@dataclass(frozen=True)
class CommRecord:
    op: str
    kind: str
    phase: str
    send_bytes: float
    recv_bytes: float
    numel: int
    dtype: str
    group_size: int
    # global ranks of the group it ran on (a plan maps them to axes); a send / recv: the pair
    ranks: tuple[int, ...] = ()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group(obj) -> tuple[int, int]:
    """(rank in group, group size) of a boxed ProcessGroup argument."""
    pg = ProcessGroup.unbox(obj) if not isinstance(obj, ProcessGroup) else obj
    return pg.rank(), pg.size()


def _named_group(name: str) -> tuple[int, int]:
    pg = _resolve_process_group(name)
    return pg.rank(), pg.size()


def _flat(tensors) -> list[torch.Tensor]:
    out = []
    for t in tensors:
        out.extend(_flat(t) if isinstance(t, (list, tuple)) else [t])
    return out


def _split_bytes(t: torch.Tensor, splits, P: int) -> list[int]:
    """Bytes of each of the P dim-0 splits of an all-to-all buffer (even when splits is empty)."""
    if t.dim() == 0 or t.shape[0] == 0:
        return [0] * P if not splits else [0] * len(splits)
    row = _nbytes(t) // t.shape[0]
    if not splits:
        return [_nbytes(t) // P] * P
    return [s * row for s in splits]


def _c10d(name: str, args) -> tuple[str, float, float, int, torch.dtype, int] | None:
    """(kind, send, recv, numel, dtype, group size) of a c10d op, or None if not a collective."""
    if name in ("_allgather_base_",):
        out, inp, pg = args[0], args[1], args[2]
        me, P = _group(pg)
        s = _nbytes(inp)
        return "all_gather", (P - 1) * s, (P - 1) * s, inp.numel(), inp.dtype, P
    if name in ("allgather_", "allgather_into_tensor_coalesced_", "allgather_coalesced_"):
        outs, ins, pg = args[0], args[1], args[2]
        me, P = _group(pg)
        ins = _flat(ins)
        s = sum(_nbytes(t) for t in ins)
        return "all_gather", (P - 1) * s, (P - 1) * s, sum(t.numel() for t in ins), ins[0].dtype, P
    if name in ("_reduce_scatter_base_", "reduce_scatter_", "reduce_scatter_tensor_coalesced_"):
        outs, ins, pg = args[0], args[1], args[2]
        me, P = _group(pg)
        outs = _flat([outs])
        s = sum(_nbytes(t) for t in outs)
        return ("reduce_scatter", (P - 1) * s, (P - 1) * s, sum(t.numel() for t in outs),
                outs[0].dtype, P)
    if name in ("allreduce_", "allreduce_coalesced_"):
        ts, pg = _flat([args[0]]), args[1]
        me, P = _group(pg)
        n = sum(_nbytes(t) for t in ts)
        wire = 2.0 * (P - 1) / P * n
        return "all_reduce", wire, wire, sum(t.numel() for t in ts), ts[0].dtype, P
    if name == "alltoall_base_":
        out, inp, pg, out_splits, in_splits = args[:5]
        me, P = _group(pg)
        sent = _split_bytes(inp, list(in_splits), P)
        got = _split_bytes(out, list(out_splits), P)
        return ("all_to_all", sum(sent) - sent[me], sum(got) - got[me], inp.numel(), inp.dtype, P)
    if name == "alltoall_":
        outs, ins, pg = args[0], args[1], args[2]
        me, P = _group(pg)
        return ("all_to_all", sum(_nbytes(t) for r, t in enumerate(ins) if r != me),
                sum(_nbytes(t) for r, t in enumerate(outs) if r != me),
                sum(t.numel() for t in ins), ins[0].dtype, P)
    if name == "broadcast_":
        ts, pg, root = _flat([args[0]]), args[1], args[2]
        me, P = _group(pg)
        n = sum(_nbytes(t) for t in ts)
        return ("broadcast", (P - 1) * n if me == root else 0, 0 if me == root else n,
                sum(t.numel() for t in ts), ts[0].dtype, P)
    if name == "gather_":
        outs, ins, pg, root = args[0], _flat([args[1]]), args[2], args[3]
        me, P = _group(pg)
        n = sum(_nbytes(t) for t in ins)
        if me == root:
            pieces = _flat(outs)
            recv = sum(_nbytes(t) for r, t in enumerate(pieces) if r != me)
            return "gather", 0, recv, sum(t.numel() for t in ins), ins[0].dtype, P
        return "gather", n, 0, sum(t.numel() for t in ins), ins[0].dtype, P
    if name == "scatter_":
        outs, ins, pg, root = _flat([args[0]]), args[1], args[2], args[3]
        me, P = _group(pg)
        n = sum(_nbytes(t) for t in outs)
        if me == root:
            pieces = _flat(ins)
            sent = sum(_nbytes(t) for r, t in enumerate(pieces) if r != me)
            return "scatter", sent, 0, sum(t.numel() for t in outs), outs[0].dtype, P
        return "scatter", 0, n, sum(t.numel() for t in outs), outs[0].dtype, P
    if name == "reduce_":
        ts, pg, root = _flat([args[0]]), args[1], args[3]
        me, P = _group(pg)
        n = sum(_nbytes(t) for t in ts)
        return ("reduce", 0 if me == root else n, (P - 1) * n if me == root else 0,
                sum(t.numel() for t in ts), ts[0].dtype, P)
    if name in ("send", "recv_"):
        ts = _flat([args[0]])
        n = sum(_nbytes(t) for t in ts)
        me, P = _group(args[1])
        return ("send", n, 0, ts[0].numel(), ts[0].dtype, P) if name == "send" else \
            ("recv", 0, n, ts[0].numel(), ts[0].dtype, P)
    return None


def _functional(name: str, args) -> tuple[str, float, float, int, torch.dtype, int] | None:
    """The same for functional collectives (DTensor redistribution, full_tensor)."""
    if name in ("all_gather_into_tensor",):
        inp, _, group_name = args[0], args[1], args[2]
        me, P = _named_group(group_name)
        s = _nbytes(inp)
        return "all_gather", (P - 1) * s, (P - 1) * s, inp.numel(), inp.dtype, P
    if name in ("reduce_scatter_tensor",):
        inp, group_name = args[0], args[3]
        me, P = _named_group(group_name)
        s = _nbytes(inp) // P
        return "reduce_scatter", (P - 1) * s, (P - 1) * s, inp.numel(), inp.dtype, P
    if name in ("all_reduce",):
        inp, group_name = args[0], args[2]
        me, P = _named_group(group_name)
        wire = 2.0 * (P - 1) / P * _nbytes(inp)
        return "all_reduce", wire, wire, inp.numel(), inp.dtype, P
    if name in ("all_to_all_single",):
        inp, out_splits, in_splits, group_name = args[0], args[1], args[2], args[3]
        me, P = _named_group(group_name)
        sent = _split_bytes(inp, list(in_splits), P)
        row = _nbytes(inp) // inp.shape[0] if inp.dim() and inp.shape[0] else 0
        got = [s * row for s in out_splits] if out_splits else sent
        return ("all_to_all", sum(sent) - sent[me], sum(got) - got[me], inp.numel(), inp.dtype, P)
    if name in ("broadcast",):
        inp, src, group_name = args[0], args[1], args[2]
        me, P = _named_group(group_name)
        n = _nbytes(inp)
        return ("broadcast", (P - 1) * n if me == src else 0, 0 if me == src else n, inp.numel(),
                inp.dtype, P)
    return None


def _group_ranks(namespace: str, name: str, args) -> tuple[int, ...]:
    """Global ranks of the process group a collective runs on: the boxed ProcessGroup argument of
    a c10d op (the other boxed arguments, e.g. a ReduceOp, refuse to unbox), or the group name a
    functional collective takes as its last string argument. A send / recv runs between two
    ranks: this one and its peer (the op's group-local rank argument), sorted."""
    if namespace == "c10d":
        for a in args:
            if isinstance(a, (torch.ScriptObject, ProcessGroup)):
                try:
                    pg = ProcessGroup.unbox(a) if not isinstance(a, ProcessGroup) else a
                except RuntimeError:
                    continue
                ranks = tuple(get_process_group_ranks(_resolve_process_group(pg.group_name)))
                if name in ("send", "recv_"):
                    return tuple(sorted((ranks[pg.rank()], ranks[int(args[2])])))
                return ranks
        return ()
    names = [a for a in args if isinstance(a, str)]
    return tuple(get_process_group_ranks(_resolve_process_group(names[-1]))) if names else ()


def _is_dtensor_op(types) -> bool:
    return any(issubclass(t, DTensor) for t in types)


class CommCounter(TorchDispatchMode):
    """Records every collective issued inside `with CommCounter() as c:`.

    `phase` is the label given to records; a profiler changes it as the step moves on.
    """

    def __init__(self, phase: str = "step") -> None:
        super().__init__()
        self.phase = phase
        self.records: list[CommRecord] = []
        self.unparsed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_dtensor_op(types):
            # Let DTensor run first: the collectives it issues while redistributing (e.g. a
            # Partial -> Replicate all-reduce inside an elementwise op) then come back through
            # this mode as plain-tensor ops and are counted. Answering for DTensor ourselves
            # would run its whole dispatch with this mode switched off, and miss them.
            return NotImplemented
        kwargs = kwargs or {}
        namespace = func.namespace
        if namespace in ("c10d", "_c10d_functional"):
            name = func._schema.name.split("::")[-1]
            parsed = (_c10d(name, args) if namespace == "c10d" else _functional(name, args))
            if parsed is not None:
                kind, send, recv, numel, dtype, P = parsed
                record = CommRecord(name, kind, self.phase, float(send), float(recv), int(numel),
                                    str(dtype).replace("torch.", ""), P,
                                    _group_ranks(namespace, name, args))
                self.records.append(record)
                if _LISTENERS:
                    issued = time.time_ns()
                    _TOLD.active = True
                    try:
                        out = func(*args, **kwargs)
                    finally:
                        _TOLD.active = False
                    notify(record, issued, out)
                    return out
            elif name not in ("wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier"):
                self.unparsed.append(name)
        return func(*args, **kwargs)

    def totals(self, phases: set[str] | None = None) -> dict[str, tuple[float, float]]:
        """{kind: (send bytes, recv bytes)} over records (optionally of some phases)."""
        return summarize(r for r in self.records if phases is None or r.phase in phases)

    def clear(self) -> None:
        self.records.clear()
        self.unparsed.clear()


def summarize(records) -> dict[str, tuple[float, float]]:
    """{kind: (send bytes, recv bytes)} over records: the same sum as a plan's
    `RankCost.bytes_by_kind`, by the same function."""
    return bytes_by_kind(records)
