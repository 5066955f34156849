"""Print one line per benchmark figure and write them to bench.json in the run folder.

    python -m experiments.bench                       # small default
    python -m experiments.bench n_prompts=512 repeats=5 memory=false
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from experiments._cli import CONF, cli, guarded
from routing_suite import bench


@hydra.main(version_base="1.3", config_path=CONF, config_name="bench")
@guarded
def main(cfg) -> float:
    figures = bench.run(cfg)
    for key, value in figures.items():
        print(f"{key}: {value}")
    path = bench.write(figures, Path(HydraConfig.get().runtime.output_dir))
    print(f"written: {path}")
    return figures["collection_ratio"]


if __name__ == "__main__":
    cli(main)
