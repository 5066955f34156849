"""Cross-architecture transfer of one family's EM directions into another, ending with its table.

    python -m experiments.em_transfer donor=llama receiver=qwen2
    python -m experiments.em_transfer donor=qwen2 receiver=gemma2 transfer.steer_lambdas=[]   # ablation only
"""

import hydra

from experiments._cli import CONF, cli, guarded
from routing_suite.em.transfer_pipeline import run


@hydra.main(version_base="1.3", config_path=CONF, config_name="em_transfer")
@guarded
def main(cfg) -> float:
    result = run(cfg)
    print(result["table_markdown"])
    print(f"store: {result['store']}\ntable: {result['table_dir']}")
    return result["seconds"]


if __name__ == "__main__":
    cli(main)
