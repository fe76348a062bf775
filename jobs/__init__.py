"""Command-line entry points: Hydra configs in, `trainer` / `data_prep` runs out."""
