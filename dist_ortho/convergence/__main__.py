"""`python -m dist_ortho.convergence`: the convergence command, and each run's worker process."""

import sys

from dist_ortho.convergence.cli import _standalone

sys.exit(_standalone())
