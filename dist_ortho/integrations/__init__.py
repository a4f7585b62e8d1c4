"""dist_ortho inside other trainers. `dist_ortho.integrations.torchtitan`: an optimizers container
for torchtitan's config system (imports torchtitan only when its container is first used)."""
