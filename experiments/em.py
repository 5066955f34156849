"""Emergent-misalignment directions on one family's organisms, ending with its EM table.

    python -m experiments.em                                  # llama organisms
    python -m experiments.em model=qwen2_organism em.sampling.n_samples=8
"""

import hydra
import numpy as np

from experiments._cli import CONF, cli, guarded
from routing_suite.em.pipeline import run


@hydra.main(version_base="1.3", config_path=CONF, config_name="em")
@guarded
def main(cfg) -> float:
    """Returns the mean own-direction ablation reduction (the metric an optimizing sweep would use)."""
    result = run(cfg)
    print(result["table_markdown"])
    print(f"store: {result['store']}\ntable: {result['table_dir']}")
    reductions = [v["reduction_own"] for v in result["summary"].values() if np.isfinite(v["reduction_own"])]
    return float(np.mean(reductions)) if reductions else float("nan")  # NaN: no fine-tune had a direction to ablate


if __name__ == "__main__":
    cli(main)
