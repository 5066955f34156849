"""Turn many finished run stores into paper tables, plots and a report.

    python -m experiments.aggregate root=outputs/stores
    python -m experiments.aggregate 'root=outputs/stores/**/refuse' out=paper/appendix duplicates=newest
"""

import hydra

from experiments._cli import CONF, cli, guarded
from routing_suite import aggregate


@hydra.main(version_base="1.3", config_path=CONF, config_name="aggregate")
@guarded
def main(cfg) -> int:
    result = aggregate.run(cfg)
    for line in (result["headline"], result["adl_headline"], result["em_headline"], result["em_transfer_headline"]):
        if line:
            print(line)
    print(
        f"{result['n_cells']} routing cells, {result['n_adl_cells']} ADL pairs, {result['n_em_cells']} EM families and "
        f"{result['n_em_transfer_cells']} EM transfer pairs from {result['n_stores']} stores; "
        f"tables, plots and report.md in {result['out']}"
    )
    return result["n_cells"] + result["n_adl_cells"] + result["n_em_cells"] + result["n_em_transfer_cells"]


if __name__ == "__main__":
    cli(main)
