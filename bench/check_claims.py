"""Do the rankings a study's report states hold in reruns of the same study?

    python bench/check_claims.py results/examples/default_study RERUN_1/default_study RERUN_2/...

Every "A faster than B" claim of each study directory (`dist_ortho.reporting.comparison.claims_of`, what
its report.md states) is checked in every other one (`comparison.failed_claims`: there the
paired ratio A/B must have its whole 95% interval below 1). Prints one line per study and per
claim that fails, and a markdown table to --out (default: results/bench/claims_rerun.md).
Exit status 1 when a claim fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dist_ortho.core.io import atomic_write_text  # noqa: E402
from dist_ortho.reporting import report  # noqa: E402
from dist_ortho.reporting import comparison


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="+", type=Path, help="study directories (2 or more)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "claims_rerun.md")
    args = parser.parse_args(argv)
    if len(args.studies) < 2:
        parser.error("pass at least two study directories (a run and its rerun)")
    analyses = {str(p): report.load_results(p).analysis for p in args.studies}
    lines = ["# Claims of each run of the study, checked in the others", "",
             "| run | claims stated | hold in every other run | load avg 1 min (per job, at "
             "start) |", "|---|---|---|---|"]
    failed = []
    for name, analysis in analyses.items():
        claims = comparison.claims_of(analysis)
        stated = [f"{facet} P={p}: {a} < {b}" for (facet, p), pairs in claims.items()
                  for a, b in pairs]
        bad = [line for other, a in analyses.items() if other != name
               for line in comparison.failed_claims(claims, a)]
        failed += bad
        loads = ", ".join(f"{job} {(m.get('load_start') or ['?'])[0]}"
                          for job, m in analysis.machines.items())
        lines.append(f"| `{os.path.relpath(name, ROOT)}` | {'; '.join(stated) or 'none'} | "
                     f"{'yes' if not bad else 'NO: ' + '; '.join(bad)} | {loads} |")
        print(f"{name}: {len(stated)} claim(s), {len(bad)} failing in the other run(s)")
    for line in failed:
        print(f"  {line}")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
