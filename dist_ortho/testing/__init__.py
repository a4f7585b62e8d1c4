"""Layer 8: aids for tests and hardware checks (spawned gloo ranks, the one-GPU check);
the product never imports it."""

from dist_ortho.testing.processes import *  # noqa: F401,F403
from dist_ortho.testing.processes import __all__  # noqa: F401
