"""Tests of the studies area."""
