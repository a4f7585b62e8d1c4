import os
import sys

# Spawned workers unpickle functions from tests/dist_cases.py by module name: keep tests/ and the
# repository root importable in every child process.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("PYTHONPATH", os.pathsep.join([HERE, ROOT]))
