"""The Hydra config tree (YAML only). A package so `pip install .` ships it."""
