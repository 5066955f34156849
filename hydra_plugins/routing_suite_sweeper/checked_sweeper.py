"""`hydra/sweeper=checked` (the suite's default): Hydra's basic sweeper plus checks.

Hydra only loads plugins from the `hydra_plugins` namespace, hence this
package. Before launching anything it composes every job of the sweep (an
override naming a config that does not exist fails here), works out each
job's folder, refuses a sweep in which two jobs share one, refuses a launcher
whose plugin is not installed, and writes the job list `sweep.json` into the
sweep folder. Then it builds the built-in organisms the jobs need and that
are not cached yet, one per core side by side (`sweeps.prebuild_organisms`),
so that no job builds one while another waits. The jobs then run exactly as
under the basic sweeper, through whichever launcher is configured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from routing_suite import sweeps

log = logging.getLogger(__name__)


class CheckedSweeper(BasicSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        sweeps.check_launcher(config.hydra.launcher, config.hydra.runtime.choices.get("hydra/launcher"))
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        every_job = self.split_arguments(parser.parse_overrides([*self._parse_config(), *arguments]), None)[0]
        loader = self.hydra_context.config_loader
        configs = [loader.load_sweep_config(master_config=self.config, sweep_overrides=list(o)) for o in every_job]
        jobs = [sweeps.as_job(num, overrides, cfg) for num, (overrides, cfg) in enumerate(zip(every_job, configs))]
        sweeps.check_distinct(jobs)
        manifest = sweeps.write_manifest(Path(str(self.config.hydra.sweep.dir)), jobs)
        log.info("%d jobs checked; their folders are listed in %s", len(jobs), manifest)
        sweeps.prebuild_organisms(configs)
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Any) -> None:
        """Every job was composed in sweep() already, before the first launch."""
