"""Hydra config tree of capsexp (shipped inside the package so wheels carry it)."""
