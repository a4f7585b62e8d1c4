"""Tests of the end to end area."""
