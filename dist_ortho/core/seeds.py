"""One seed mixer for every derived random stream (data batches, shape-only weights and
gradients, RNG reseeding after a resharded resume).

`derive_seed(*parts)` folds integers into a 64-bit seed with splitmix64-style mixing, so nearby
inputs (step 1 vs step 2, seed 0 vs 1, rank 0 vs 1) give unrelated generator seeds, unlike a plain
sum or concatenation. It is pure and process-independent (Python's salted `hash()` is not used),
so the same parts give the same stream on every rank and machine.
"""

from __future__ import annotations

__all__ = ["derive_seed"]

_MASK = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integer parts (each taken modulo 2**64)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (part & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 29
    return h
