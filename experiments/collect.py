"""Trace both models under both framings into a zarr store.

    python -m experiments.collect model=qwen2_organism behavior=refuse collect.positions=first_k
"""

import hydra

from experiments._cli import CONF, cli, guarded
from routing_suite.routing import collect


@hydra.main(version_base="1.3", config_path=CONF, config_name="collect")
@guarded
def main(cfg) -> str:
    result = collect.run(cfg)
    print(f"store: {result['store']} ({result['n_prompts']} prompt pairs)")
    return result["store"]


if __name__ == "__main__":
    cli(main)
