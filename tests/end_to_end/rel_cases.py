"""Torchrun entry for tests/end_to_end/test_resume_and_faults_through_torchrun.py: several
`dist-ortho run` command lines in one torchrun job, so every strategy is covered without paying a
launch for each.

    torchrun --standalone --nproc_per_node=2 tests/end_to_end/rel_cases.py jobs.json

jobs.json is a list of argument lists for `dist-ortho run` (for example ["c.yaml", "--set",
"train.steps=4", "--resume"]). Each goes through `dist_ortho.studies.run.main`, exactly as the
command line does; they share one gloo process group started here (`build_run` reuses a
live group). A job that returns non-zero stops the launch with that job named.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path


def main(jobs_file: str) -> int:
    import torch.distributed as dist

    from dist_ortho.studies import run

    jobs = json.loads(Path(jobs_file).read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    for argv in jobs:
        parser = argparse.ArgumentParser(prog="dist-ortho run")
        run.add_arguments(parser)
        code = run.main(parser.parse_args(argv))
        if code != 0:
            raise SystemExit(f"dist-ortho run {' '.join(argv)} returned {code}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
