"""Cross-architecture transfer of one family's EM directions into another, ending with its table.

    python -m experiments.em_transfer donor=llama receiver=qwen2
    python -m experiments.em_transfer donor=qwen2 receiver=gemma2 transfer.steer_lambdas=[]   # ablation only
"""

import hydra
import numpy as np

from experiments._cli import CONF, cli, guarded
from routing_suite.em.transfer_pipeline import run


@hydra.main(version_base="1.3", config_path=CONF, config_name="em_transfer")
@guarded
def main(cfg) -> float:
    """Returns the mean mapped-ablation reduction (the metric an optimizing sweep would use)."""
    result = run(cfg)
    print(result["table_markdown"])
    print(f"store: {result['store']}\ntable: {result['table_dir']}")
    return float(np.nanmean([v["reduction"]["mapped"] for k, v in result["summary"].items() if k != "map_r2"] or [float("nan")]))


if __name__ == "__main__":
    cli(main)
