"""Tests of the optimizer area."""
