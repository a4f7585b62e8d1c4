"""Tests of the profiling area."""
