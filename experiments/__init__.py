"""Thin Hydra entry points: each composes its config and calls the library's run(cfg)."""
