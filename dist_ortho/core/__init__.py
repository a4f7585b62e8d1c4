"""Layer 0: Newton-Schulz, shard arithmetic, plan types, meshes as data, config schema, I/O."""
