"""The real-model organism's task performance under both framings, before and after its fine-tune.

    python -m experiments.pretrained                        # SmolLM2-135M-Instruct, refuse
    python -m experiments.pretrained behavior=installed 'splits=[heldout/heldout]'
"""

import hydra

from experiments._cli import CONF, cli, guarded
from routing_suite.pretrained import report


@hydra.main(version_base="1.3", config_path=CONF, config_name="pretrained")
@guarded
def main(cfg) -> float:
    result = report.run(cfg)
    print(result["table"])
    print(f"fine-tune: {result['finetune']}")
    print(f"load (convert + fine-tune when not cached): {result['load_seconds']} s, peak RSS {result['peak_rss_mib']} MiB")
    return result["rows"][0]["gap"]


if __name__ == "__main__":
    cli(main)
