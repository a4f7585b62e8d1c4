"""Profiling for dist_ortho: what each rank moved, held and spent, per step and phase."""

from profiling.comm import CommCounter, CommRecord, summarize

__all__ = ["CommCounter", "CommRecord", "summarize"]
