"""Tests of the meshes area."""
