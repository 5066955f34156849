"""Build the built-in organisms and print how well each carries its behaviour.

    python -m experiments.organisms                       # all 12
    python -m experiments.organisms 'families=[llama]' 'behaviors=[refuse]'
"""

import hydra

from experiments._cli import CONF, cli, guarded
from routing_suite.config import behavior_preset
from routing_suite.organisms import report


@hydra.main(version_base="1.3", config_path=CONF, config_name="organisms")
@guarded
def main(cfg) -> bool:
    result = report.run(cfg, behavior_preset)
    print(result["table"])
    return result["all_ok"]


if __name__ == "__main__":
    cli(main)
