"""`hydra/sweeper=checked` (the suite's default): Hydra's basic sweeper plus checks.

Hydra only loads plugins from the `hydra_plugins` namespace, hence this
package. Before launching anything it composes every job of the sweep (an
override naming a config that does not exist fails here), works out each
job's folder, refuses a sweep in which two jobs share one, refuses a launcher
whose plugin is not installed, and writes the sweep's records into the sweep
folder: its job list `sweep-<time>-<pid>.json` and its config
`multirun-<time>-<pid>.yaml` (without secret values), named per sweep so that
a second sweep into the same folder keeps the first one's (Hydra's basic
sweeper would write `multirun.yaml` over it). Then it builds the built-in
organisms the jobs need and that are not cached yet, one per core side by
side (`sweeps.prebuild_organisms`), so that no job builds one while another
waits. The jobs then run as under the basic sweeper, batch by batch, through
whichever launcher is configured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from routing_suite import sweeps
from routing_suite.callbacks import scrub_files, secret_values

log = logging.getLogger(__name__)


class CheckedSweeper(BasicSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        sweeps.check_launcher(config.hydra.launcher, config.hydra.runtime.choices.get("hydra/launcher"))
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None and self.launcher is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        every_job = self.split_arguments(overrides, None)[0]
        loader = self.hydra_context.config_loader
        configs = [loader.load_sweep_config(master_config=self.config, sweep_overrides=list(o)) for o in every_job]
        jobs = [sweeps.as_job(num, overrides, cfg) for num, (overrides, cfg) in enumerate(zip(every_job, configs))]
        sweeps.check_distinct(jobs)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        stamp = sweeps.sweep_stamp(sweep_dir)
        manifest = sweeps.write_manifest(sweep_dir, jobs, stamp)
        config = sweep_dir / sweeps.SWEEP_CONFIG.format(stamp=stamp)
        OmegaConf.save(self.config, config)
        scrub_files([config], secret_values(self.config))
        log.info("%d jobs checked; this sweep's records: %s (jobs and folders), %s (config)", len(jobs), manifest, config)
        sweeps.prebuild_organisms(configs)
        # Hydra's basic sweeper, less its multirun.yaml: batch by batch through the launcher.
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        returns, first = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            results = self.launcher.launch(batch, initial_job_idx=first)
            for result in results:
                _ = result.return_value  # raises a job's error, as the basic sweeper does
            first += len(batch)
            returns.append(results)
        return returns

    def validate_batch_is_legal(self, batch: Any) -> None:
        """Every job was composed in sweep() already, before the first launch."""
