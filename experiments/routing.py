"""The routing study on one cell, end to end, ending with the cell's gap-reduction table.

    python -m experiments.routing                                  # llama organism, underperform
    python -m experiments.routing model=gemma2_organism behavior=refuse intervention.rank=1
"""

import sys

import hydra

from experiments._cli import CONF, cli, guarded
from routing_suite.routing import cell


@hydra.main(version_base="1.3", config_path=CONF, config_name="routing")
@guarded
def main(cfg) -> float:
    """Returns the intervention's gap reduction (the metric an optimizing sweep would use)."""
    result = cell.run(cfg)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(result["table_markdown"])
    print(result["headline"])
    print(f"store: {result['store']}\ntables and plots: {result['table_dir']}")
    return result["reduction"]


if __name__ == "__main__":
    cli(main)
