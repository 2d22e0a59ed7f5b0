"""Low-memory optimizers that run on the privatised gradient (post-processing)."""
