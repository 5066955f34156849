"""Thin Hydra entry points: each composes its config and calls the library's run(cfg)."""

import os

# Idle OpenMP threads sleep instead of spinning. The suite pins torch's thread
# count for builds and jobs; on a crowded 2-core machine two spinning threads
# made an organism build 70-240x slower, with bitwise the same weights. Set
# before torch starts its thread pool (any entry point imports this package first).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
