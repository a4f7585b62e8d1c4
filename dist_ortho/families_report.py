"""What `dist-ortho project` says about the field's strategy families (issue 16).

Two questions, one table each, from the projection's rows (no new predictions but the padding):
- where does `split_ns` (whole matrices by LPT, the largest split over ranks that would idle)
  beat whole-matrix ownership (`balanced`), and by how much: both predicted steps, their ratio,
  and the busiest rank's NS FLOPs over the even split (1.0 = perfectly balanced);
- what does `megabatch`'s padding cost: the share of its NS FLOPs spent on zero matrices, its
  busiest rank's bytes against `balanced`'s, and its predicted step against `balanced`'s.

`split_ns_options` gives split_ns the byte weight of the priced machine (NS FLOP rate times the
all-to-all seconds per byte at that world size), so the planner splits where that machine gains.
"""

from __future__ import annotations

from dist_ortho.profiling.costmodel import CostConstants, matrix_specs, torch_dtype
from dist_ortho.profiling.hardware import HardwarePreset
from dist_ortho.strategies.megabatch import padding_flops

__all__ = ["split_ns_options", "families_section"]


def split_ns_options(constants, world_size: int, ns_dtype: str) -> dict:
    """{"flop_per_byte": rate * all-to-all seconds per byte} of the machine the projection
    prices ({} for constants without an all-to-all rate)."""
    if isinstance(constants, HardwarePreset):
        constants = constants.constants(world_size, ns_dtype)
    if not isinstance(constants, CostConstants):
        return {}
    beta = constants.comm.beta_s_per_byte.get("all_to_all")
    if not beta:
        return {}
    return {"flop_per_byte": float(f"{constants.compute.ns_flops_per_s * beta:.4g}")}


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
                "NS FLOP imbalance balanced | split_ns | split_ns byte weight FLOP/B |",
                "|---|---|---|---|---|---|---|"]
        for P in sizes:
            b, s = by[(P, "balanced")], by[(P, "split_ns")]
            ratio = s["step_s"] / b["step_s"]
            verdict = "faster" if ratio < 1 else ("same" if ratio == 1 else "slower")
            out.append(f"| {P} | {b['step_s'] * 1e3:.4g} | {s['step_s'] * 1e3:.4g} | "
                       f"{ratio:.3f} ({verdict}) | {b['flops_imbalance']:.3f} | "
                       f"{s['flops_imbalance']:.3f} | {s.get('options', '') or '-'} |")
        out.append("")
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
