"""torchtitan's own trainer with dist_ortho's optimizers container (`pytest -m torchtitan`)."""
