"""`python -m dist_ortho.studies.convergence`: the convergence command, and each run's worker
process."""

import sys

from dist_ortho.studies.convergence.cli import _standalone

sys.exit(_standalone())
