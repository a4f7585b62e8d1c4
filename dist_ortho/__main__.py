"""`python -m dist_ortho <command>`: the same program as the `dist-ortho` script."""

import sys

from dist_ortho.cli import main

sys.exit(main())
