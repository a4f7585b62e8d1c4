"""The convergence study's analysis: tables, plot and summary from finished runs.

Writes to the study's `out_dir`:
- `loss_curves.png`: train (windowed mean) and validation loss, mean and min-max band over seeds;
- `final_val_loss.csv` and `summary.md`: final validation loss, mean +- std (ddof=1) over seeds;
- steps to reach AdamW's final validation loss (AdamW's mean over seeds), read off each
  optimizer's seed-mean validation curve by linear interpolation between evaluation points, and
  per seed; "not reached" when the curve never gets there;
- `study.json`: wall time of the study and of every run;
- with a distributed check (`convergence.distributed`): `distributed_check.csv`,
  `distributed_check.png` and a section of `summary.md` putting each P > 1 run beside its P = 1
  run (same optimizer, seed and global batch): the largest difference of their training losses
  (every step) and validation losses (every evaluation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dist_ortho.core.io import atomic_write_bytes  # noqa: E402
from dist_ortho.core.io import atomic_write_text
from dist_ortho.studies.convergence.config import ConvergenceStudy  # noqa: E402
from dist_ortho.studies.convergence.training import CURVE_FILE  # noqa: E402
from dist_ortho.studies.convergence.training import RESULT_FILE
from dist_ortho.studies.jobs import Job  # noqa: E402

__all__ = ["steps_to_reach", "analyze", "compare_curves"]


def steps_to_reach(steps: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """First step at which the curve reaches `target` (loss <= target), linearly interpolated
    between the evaluation points around the crossing; None if it never does."""
    previous = None
    for s, loss in zip(steps, losses):
        if not math.isfinite(loss):
            previous = None
            continue
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(s)
            s0, l0 = previous
            return s0 + (l0 - target) / (l0 - loss) * (s - s0)
        previous = (s, loss)
    return None


def _load_runs(jobs: list[Job]):
    frames, results = [], []
    for job in jobs:
        curve = pd.read_csv(job.run_dir / CURVE_FILE)
        curve["optimizer"], curve["seed"] = job.labels["optimizer"], job.labels["seed"]
        frames.append(curve)
        results.append(json.loads((job.run_dir / RESULT_FILE).read_text()))
    return pd.concat(frames, ignore_index=True), results


def _fmt_steps(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f}"


def analyze(study: ConvergenceStudy, jobs: list[Job], wall_s: float | None = None) -> dict:
    """Plot, tables and summary from the finished runs in `jobs`; returns the summary."""
    conv = study.convergence
    out = Path(conv.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checks = [j for j in jobs if j.labels.get("check")]
    jobs = [j for j in jobs if not j.labels.get("check")]
    curves, results = _load_runs(jobs)
    optimizers = list(dict.fromkeys(j.labels["optimizer"] for j in jobs))
    val = curves.dropna(subset=["val_loss"])
    val_mean = val.groupby(["optimizer", "step"])["val_loss"].mean()
    final = pd.DataFrame(results).groupby("optimizer")
    reference = "adamw" if "adamw" in optimizers else None
    target = float(final["final_val_loss"].mean()[reference]) if reference else None
    ref_steps = None
    if reference:
        ref_curve = val_mean[reference]
        ref_steps = steps_to_reach(list(ref_curve.index), list(ref_curve.values), target)
    rows = []
    for name in optimizers:
        finals = final.get_group(name)["final_val_loss"]
        trains = final.get_group(name)["final_train_loss"]
        row = {"optimizer": name,
               "lr": study.run_config(name, conv.seeds[0]).optimizer.lr if name != "adamw"
               else None,
               "adamw_lr": study.run_config(name, conv.seeds[0]).optimizer.adamw_lr,
               "seeds": len(finals), "final_val_mean": float(finals.mean()),
               "final_val_std": float(finals.std(ddof=1)) if len(finals) > 1 else math.nan,
               "final_val_min": float(finals.min()), "final_val_max": float(finals.max()),
               "final_train_mean": float(trains.mean())}
        if target is not None:
            curve = val_mean[name]
            mean_steps = steps_to_reach(list(curve.index), list(curve.values), target)
            per_seed = []
            for seed, g in val[val["optimizer"] == name].groupby("seed"):
                per_seed.append(steps_to_reach(list(g["step"]), list(g["val_loss"]), target))
            row["steps_to_adamw_final"] = mean_steps
            row["steps_to_adamw_final_per_seed"] = ";".join(_fmt_steps(s) for s in per_seed)
            row["fraction_of_adamw_steps"] = (mean_steps / ref_steps if mean_steps is not None
                                              and ref_steps else None)
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write_text(out / "final_val_loss.csv",
                      table.to_csv(index=False, float_format="%.5g"))
    _plot(study, curves, optimizers, target, out / "loss_curves.png")
    check_rows = _distributed_check(jobs, checks, out) if checks else []
    summary = {"target_adamw_final_val_loss": target, "adamw_steps_to_own_final": ref_steps,
               "study_wall_s": wall_s, "runs": results, "table": rows,
               "distributed_check": check_rows}
    atomic_write_text(out / "study.json",
                      json.dumps(summary, indent=2, default=_json_default) + "\n")
    atomic_write_text(out / "summary.md", _markdown(study, rows, target, ref_steps, wall_s,
                                                    results) + _check_markdown(check_rows))
    return summary


# float32 losses near 2-5 are spaced 2.4e-7 to 4.8e-7 apart: 1e-5 is a few tens of ulps, what
# different reduction orders give before training amplifies them
ROUNDING = 1e-5


def compare_curves(reference: pd.DataFrame, other: pd.DataFrame) -> dict:
    """Largest absolute differences between two runs' curves (curve.csv frames): training loss
    over the steps both have, validation loss over the evaluations both have, final validation
    loss; and `agree_until_step`, the last step up to which every training loss differs by at
    most `ROUNDING` (float rounding), with the largest difference until then."""
    train = reference.set_index("step")["train_loss"].sub(
        other.set_index("step")["train_loss"]).abs().dropna()
    val_ref = reference.dropna(subset=["val_loss"]).set_index("step")["val_loss"]
    val_other = other.dropna(subset=["val_loss"]).set_index("step")["val_loss"]
    val = val_ref.sub(val_other).abs().dropna()
    off = train[train > ROUNDING]
    agree_until = (int(off.index.min()) - 1 if len(off) else int(train.index.max())) \
        if len(train) else 0
    early = train[train.index <= agree_until]
    return {"steps_compared": int(len(train)), "evals_compared": int(len(val)),
            "agree_until_step": agree_until,
            "max_abs_train_diff_while_agreeing": float(early.max()) if len(early) else math.nan,
            "max_abs_train_diff": float(train.max()) if len(train) else math.nan,
            "max_abs_val_diff": float(val.max()) if len(val) else math.nan,
            "final_val_p1": float(val_ref.iloc[-1]) if len(val_ref) else math.nan,
            "final_val_check": float(val_other.iloc[-1]) if len(val_other) else math.nan}


def _distributed_check(jobs: list[Job], checks: list[Job], out: Path) -> list[dict]:
    """Each check run against its P = 1 run: the table, the plot; returns the rows."""
    by_key = {(j.labels["optimizer"], j.labels["seed"]): j for j in jobs}
    rows, pairs = [], []
    for job in checks:
        ref = by_key[(job.labels["optimizer"], job.labels["seed"])]
        a, b = pd.read_csv(ref.run_dir / CURVE_FILE), pd.read_csv(job.run_dir / CURVE_FILE)
        rows.append({"optimizer": job.labels["optimizer"], "seed": job.labels["seed"],
                     "reference": f"{ref.name} (P = {ref.world_size}, "
                                  f"{ref.config.strategy.name})",
                     "check": f"{job.name} (P = {job.world_size}, {job.labels['strategy']})",
                     **compare_curves(a, b)})
        pairs.append((ref, job, a, b))
    atomic_write_text(out / "distributed_check.csv",
                      pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
    _plot_check(pairs, out / "distributed_check.png")
    return rows


def _check_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "## Distributed check: the same run at P > 1", "",
             "Each run below repeats a run of the table above on more ranks with a sharding "
             "strategy and the same global batch (per-rank batch divided by the ranks; every "
             "rank takes its rows of the same global draw), so the curves must agree up to "
             "float rounding (which the different reduction orders of FSDP2 and the strategy "
             "introduce). Training is chaotic: a difference of one float32 ulp grows by about "
             "an order of magnitude every few tens of steps once it appears, so the curves agree "
             f"to float rounding (every step within {ROUNDING:g}) for a while and then separate "
             "into two equally good trajectories; compare the final losses with the seed spread "
             "of the table above. Plot: `distributed_check.png`.", "",
             "| P = 1 run | distributed run | steps within rounding | max abs. diff. until "
             "then | max abs. diff. train loss (all steps) | max abs. diff. val loss (all "
             "evaluations) | final val loss P = 1 | final val loss distributed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['reference']} | {r['check']} | 1..{r['agree_until_step']} | "
                     f"{r['max_abs_train_diff_while_agreeing']:.1e} | "
                     f"{r['max_abs_train_diff']:.2e} | {r['max_abs_val_diff']:.2e} | "
                     f"{r['final_val_p1']:.4f} | {r['final_val_check']:.4f} |")
    return "\n".join(lines) + "\n"


def _plot_check(pairs, path: Path) -> None:
    fig, (ax_val, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ref, job, a, b in pairs:
        va, vb = a.dropna(subset=["val_loss"]), b.dropna(subset=["val_loss"])
        ax_val.plot(va["step"], va["val_loss"], "o-", label=f"{ref.name}, P = {ref.world_size}")
        ax_val.plot(vb["step"], vb["val_loss"], "x--", markersize=8,
                    label=f"{job.name}, P = {job.world_size}")
        diff = a.set_index("step")["train_loss"].sub(b.set_index("step")["train_loss"]).abs()
        diff = diff[diff.index > 0].dropna()
        ax_diff.semilogy(diff.index, diff.clip(lower=1e-9), label=f"{job.name} vs {ref.name}")
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("validation loss (nats/byte)")
    ax_val.set_title("validation loss: P = 1 and the distributed run (on top of each other)")
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel("|train loss difference| (floored at 1e-9)")
    ax_diff.set_title("training loss, distributed vs P = 1, per step")
    for ax in (ax_val, ax_diff):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    plt.close(fig)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(type(value).__name__)


def _markdown(study: ConvergenceStudy, rows: list[dict], target, ref_steps, wall_s, results) -> str:
    conv = study.convergence
    run = study.run_config(next(iter(conv.optimizers)), conv.seeds[0])

    def num(value, fmt: str) -> str:
        return "-" if value is None or not math.isfinite(value) else format(value, fmt)

    lines = [f"# Convergence: {', '.join(r['optimizer'] for r in rows)}", "",
             f"Model {run.model.preset}, {run.train.steps} steps, batch {run.train.batch_size} "
             f"x {run.train.seq_len} bytes per rank, strategy {run.strategy.name}, seeds "
             f"{conv.seeds}, LR warmup {conv.lr_warmup_frac:g} / linear decay "
             f"{conv.lr_decay_frac:g} of the steps, validation every {conv.eval_every} steps on "
             f"{conv.eval_batches} fixed batches of {conv.eval_batch_size} x {run.train.seq_len}.",
             "", "| optimizer | matrix lr | adamw lr | final val loss (mean ± std) | min | max | "
             "steps to AdamW's final val loss | per seed | fraction of AdamW's steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {num(r['lr'], 'g')} | {num(r['adamw_lr'], 'g')} | "
                     f"{num(r['final_val_mean'], '.4f')} ± {num(r['final_val_std'], '.4f')} | "
                     f"{num(r['final_val_min'], '.4f')} | {num(r['final_val_max'], '.4f')} | "
                     f"{_fmt_steps(r.get('steps_to_adamw_final'))} | "
                     f"{r.get('steps_to_adamw_final_per_seed', '-')} | "
                     f"{num(r.get('fraction_of_adamw_steps'), '.3f')} |")
    lines.append("")
    lines.append("std is over seeds (ddof=1).")
    if target is not None:
        lines.append(f"Target: AdamW's final validation loss, mean over seeds = {target:.4f}. "
                     f"Steps are where each optimizer's seed-mean validation curve first reaches "
                     f"it, linearly interpolated between evaluation points (per seed: each seed's "
                     f"own curve). AdamW's own mean curve first reaches it at step "
                     f"{_fmt_steps(ref_steps)}, the denominator of the fraction.")
    if wall_s is not None:
        lines.append(f"Study wall time: {wall_s:.0f} s ({wall_s / 60:.1f} min); per run "
                     + ", ".join(f"{r['optimizer']}-s{r['seed']} {r['wall_s']:.0f} s"
                                 for r in results) + " (training and evaluation only).")
    return "\n".join(lines) + "\n"


def _plot(study: ConvergenceStudy, curves, optimizers: list[str], target, path: Path) -> None:
    conv = study.convergence
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"normuon": "tab:red", "muon": "tab:blue", "adamw": "tab:green"}
    low, top = math.inf, -math.inf
    for name in optimizers:
        c = curves[curves["optimizer"] == name]
        train = c[c["step"] > 0].pivot(index="step", columns="seed", values="train_loss")
        train = train.rolling(conv.train_window, min_periods=1, center=True).mean()
        val = c.dropna(subset=["val_loss"]).pivot(index="step", columns="seed", values="val_loss")
        for ax, frame in ((ax_train, train), (ax_val, val)):
            ax.plot(frame.index, frame.mean(axis=1), color=colors.get(name), label=name)
            ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1),
                            color=colors.get(name), alpha=0.25, linewidth=0)
            low = min(low, float(frame.min(axis=1).min()))
        # The first steps fall from ln(256) = 5.5; show the range from where every optimizer is
        # after a tenth of training down to the best value, so the differences are visible.
        tenth = train.mean(axis=1).loc[max(1, int(0.1 * train.index.max())):]
        top = max(top, float(tenth.iloc[0]) + 0.1)
    for ax in (ax_train, ax_val):
        if math.isfinite(low) and math.isfinite(top) and top > low:
            ax.set_ylim(low - 0.05, top)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if target is not None:
        ax_val.axhline(target, color="gray", linestyle="--", linewidth=1,
                       label="AdamW final (mean)")
    ax_train.set_ylabel(f"train loss (nats/byte, centered {conv.train_window}-step mean)")
    ax_val.set_ylabel("validation loss (nats/byte)")
    ax_train.set_title("training loss: mean and min-max over seeds")
    ax_val.set_title(f"validation loss ({conv.eval_batches} fixed batches)")
    ax_val.legend()
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    plt.close(fig)


