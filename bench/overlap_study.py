"""Run launch/configs/overlap_study.yaml one job at a time, each under the machine's exclusive lock
(a job is one world size x one emulated link: every strategy of it interleaved in one process
group), report each, and gather the reports' Timelines sections into one markdown file.

    python bench/overlap_study.py [--out results/bench/overlap_study] [--lock /tmp/dist_ortho_cpu.lock]

Why one job at a time: the whole study takes longer than one exclusive hold of a shared 2-core
machine should; each job's timings are compared only within the job anyway (interleaved steps).
Output: <out>/<job>/ (a study directory each, with report.md, plots/ and every run's trace.json
and Gantt chart) and <out>.md (the Timelines sections: exposed optimizer time per point with 95%
intervals, overlapped backward vs step measured and predicted, step times).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "launch" / "configs" / "overlap_study.yaml"


def jobs(study: dict) -> list[tuple[int, dict]]:
    return [(p, o) for o in study["grid"]["option_sets"] for p in study["grid"]["world_sizes"]]


def derived(study: dict, world_size: int, option_set: dict, out: Path) -> dict:
    """The study restricted to one world size and one option set, writing under `out`."""
    d = dict(study)
    d["name"] = f"p{world_size}_{option_set['name']}"
    d["base"] = str(STUDY.parent / study["base"])
    d["output_dir"] = str(out)
    d["grid"] = dict(study["grid"], world_sizes=[world_size], option_sets=[option_set])
    return d


def section(report: Path) -> list[str]:
    """The report's step-time table and its Timelines section without the charts."""
    text = report.read_text().splitlines()
    keep, on = [], False
    for line in text:
        if line.startswith("## "):
            on = line in ("## Step time", "## Timelines")
        if line.startswith("### ") or line.startswith("!["):
            on = on and not line.startswith("### ")
            continue
        if on:
            keep.append(line)
    return keep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "overlap_study")
    parser.add_argument("--lock", default="/tmp/dist_ortho_cpu.lock")
    args = parser.parse_args()
    study = yaml.safe_load(STUDY.read_text())
    exe = str(Path(sys.executable).parent / "dist-ortho")
    lines = ["# Backward overlap study (emulated interconnect)", "",
             f"`python bench/overlap_study.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}: "
             f"launch/configs/overlap_study.yaml, one job (world size x emulated link) at a time, "
             f"each under `flock -x {args.lock}`. All link times are EMULATED "
             f"(profiling.interconnect); bytes and FLOPs are real. Per job: its report.md, "
             f"plots/ (a Gantt chart per point) and runs/<point>/trace.json.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for world_size, option_set in jobs(study):
            d = derived(study, world_size, option_set, args.out)
            path = Path(tmp) / f"{d['name']}.yaml"
            path.write_text(yaml.safe_dump(d, sort_keys=False))
            start = time.time()
            subprocess.run(["flock", "-x", args.lock, exe, "sweep", str(path), "--force"],
                           check=True, cwd=ROOT)
            subprocess.run([exe, "report", str(args.out / d["name"])], check=True, cwd=ROOT)
            lines += [f"## {d['name']} ({time.time() - start:.0f} s)", "",
                      f"Report: `{d['name']}/report.md`.", ""]
            lines += [("#" + x if x.startswith("## ") else x)
                      for x in section(args.out / d["name"] / "report.md")]
    out_md = args.out.parent / f"{args.out.name}.md"
    out_md.write_text("\n".join(lines) + "\n")
    print(out_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
