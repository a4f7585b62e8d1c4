"""What `dist-ortho project` says about the field's strategy families.

Two questions, one table each, from the projection's rows (no new predictions but the padding):
- where does `split_ns` (whole matrices by LPT, the largest split over ranks that would idle)
  beat whole-matrix ownership (`balanced`), and by how much: both predicted steps, their ratio,
  and the busiest rank's NS FLOPs over the even split (1.0 = perfectly balanced);
- what does `megabatch`'s padding cost: the share of its NS FLOPs spent on zero matrices, its
  busiest rank's bytes against `balanced`'s, and its predicted step against `balanced`'s.

`split_ns_options` gives split_ns the weights of the priced machine, in NS FLOPs (the NS rate times
seconds), so the planner splits where that machine gains and the cost model prices the split rounds
as the planner did: a preset (GPUs per node known) keeps split groups inside one node
(`ranks_per_node`, at most that many members) and prices their bytes and messages at the
intra-node link: the rounds run among the members only, so each costs a member one message
latency per fellow member (`flop_per_peer`), whatever P. Calibrated constants (no node size) price
both at their all-to-all beta and per-peer alpha. The forward and return all-to-alls span
every rank: their busiest rank's bytes are weighed at the all-to-all beta
(`flop_per_byte_exchange`).
"""

from __future__ import annotations

from dist_ortho.profiling.costmodel import CostConstants, matrix_specs, torch_dtype
from dist_ortho.profiling.hardware import HardwarePreset
from dist_ortho.strategies.megabatch import padding_flops

__all__ = ["split_ns_options", "families_section"]


def split_ns_options(constants, world_size: int, ns_dtype: str) -> dict:
    """split_ns's planner weights for the machine the projection prices ({} for constants
    without an all-to-all rate): flop_per_byte = rate / link bandwidth (NVLink inside a node for
    a preset, which also sets ranks_per_node and max_group to its GPUs per node; the all-to-all
    beta otherwise), flop_per_peer = rate * one message's latency on that link (the preset's
    intra-node per-peer latency; the all-to-all alpha per peer otherwise), and
    flop_per_byte_exchange = rate * the all-to-all beta (forward and return span every rank)."""
    preset = constants if isinstance(constants, HardwarePreset) else None
    if preset is not None:
        constants = preset.constants(world_size, ns_dtype)
    if not isinstance(constants, CostConstants):
        return {}
    rate = constants.compute.ns_flops_per_s
    beta = constants.comm.beta_s_per_byte.get("all_to_all")
    if not beta:
        return {}
    alpha = constants.comm.alpha_s.get("all_to_all", 0.0)  # seconds per peer
    exchange_beta = beta  # forward and return: all-to-alls over every rank
    out = {}
    if preset is not None:
        beta = 1.0 / (preset.intra_node_bytes_per_s * preset.link_efficiency)
        alpha = preset.intra_node_peer_s
        out.update(max_group=preset.gpus_per_node, ranks_per_node=preset.gpus_per_node)
    out["flop_per_byte"] = float(f"{rate * beta:.4g}")
    out["flop_per_byte_exchange"] = float(f"{rate * exchange_beta:.4g}")
    out["flop_per_peer"] = float(f"{rate * alpha:.4g}")
    return out


def _by(rows: list[dict]) -> dict:
    return {(r["world_size"], r["strategy"]): r for r in rows}


def families_section(rows: list[dict], shapes, param_dtype: str, ns_dtype: str) -> str:
    """Markdown: split_ns against balanced, and megabatch's padding; '' without balanced."""
    by = _by(rows)
    sizes = sorted({r["world_size"] for r in rows})
    out = []
    if all((P, "balanced") in by and (P, "split_ns") in by for P in sizes):
        out += ["## split_ns against whole-matrix ownership (balanced)", "",
                "| P | balanced step ms | split_ns step ms | split_ns / balanced | "
                "NS FLOP imbalance balanced | split_ns | split_ns planner weights (NS FLOPs) |",
                "|---|---|---|---|---|---|---|"]
        for P in sizes:
            b, s = by[(P, "balanced")], by[(P, "split_ns")]
            ratio = s["step_s"] / b["step_s"]
            verdict = "faster" if ratio < 1 else ("same" if ratio == 1 else "slower")
            out.append(f"| {P} | {b['step_s'] * 1e3:.4g} | {s['step_s'] * 1e3:.4g} | "
                       f"{ratio:.3f} ({verdict}) | {b['flops_imbalance']:.3f} | "
                       f"{s['flops_imbalance']:.3f} | {s.get('options', '') or '-'} |")
        out += ["", "Planner weights, in NS FLOPs (the NS rate times seconds): flop_per_byte, a "
                "byte of the split rounds on the link the groups use; flop_per_peer, one message's "
                "latency there (the rounds run among the members only: each split matrix waits "
                "1 + 2 ns_steps rounds, a member of a g-rank split sends g - 1 messages per "
                "round); flop_per_byte_exchange, a byte of the forward / return all-to-all; "
                "ranks_per_node, groups inside one node. split_ns's step and comm column price "
                "its rounds with these weights, as its planner does.", ""]
    if all((P, "balanced") in by and (P, "megabatch") in by for P in sizes):
        out += ["## megabatch's padding (zero matrices to a multiple of P per shape group)", "",
                "| P | padding share of NS FLOPs | bytes/rank megabatch / balanced | "
                "step megabatch / balanced |", "|---|---|---|---|"]
        for P in sizes:
            b, m = by[(P, "balanced")], by[(P, "megabatch")]
            specs = matrix_specs(shapes, P, torch_dtype(param_dtype), ns_dtype)
            pad = sum(padding_flops(specs, P))
            total = sum(s.flops for s in specs) + pad
            out.append(f"| {P} | {pad / total:.1%} | "
                       f"{m['max_bytes_per_rank'] / b['max_bytes_per_rank']:.3f} | "
                       f"{m['step_s'] / b['step_s']:.3f} |")
        out.append("")
    return "\n".join(out)
