"""Layer 3: the optimizers (Muon, NorMuon), their parameter split, backward overlap, the
mesh step and the single-process reference."""
