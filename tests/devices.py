"""The test-device switch: DIST_ORTHO_TEST_DEVICE=cuda puts the single-process tests' tensors on the
GPU (tests/conftest.py sets torch's default device); default cpu. `cpu_ranks_only` marks a test
that compares the test process's tensors with those of spawned CPU ranks, so it runs in the CPU
pass only."""

from __future__ import annotations

import os

import pytest

TEST_DEVICE = os.environ.get("DIST_ORTHO_TEST_DEVICE", "cpu")

cpu_ranks_only = pytest.mark.skipif(
    TEST_DEVICE != "cpu", reason="compares with spawned gloo CPU ranks: runs in the CPU pass")
