"""Layer 5: checkpoints that are verified, retained and optionally written in the background."""
