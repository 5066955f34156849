"""The Activation Difference Lens on one model pair, ending with its ADL table.

    python -m experiments.adl                                   # llama organism, underperform
    python -m experiments.adl model=qwen2_organism behavior=refuse adl.n_texts=100
"""

import hydra

from experiments._cli import CONF, cli, guarded
from routing_suite.adl.pipeline import run


@hydra.main(version_base="1.3", config_path=CONF, config_name="adl")
@guarded
def main(cfg) -> float:
    """Returns the difference's logit-lens relevance (the metric an optimizing sweep would use)."""
    result = run(cfg)
    print(result["table_markdown"])
    for line in result["steered_examples"]:
        print(line)
    print(f"store: {result['store']}\ntable: {result['table_dir']}")
    return result["row"]["ll_difference"]


if __name__ == "__main__":
    cli(main)
