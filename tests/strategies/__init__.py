"""Tests of the strategies area."""
