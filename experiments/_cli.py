"""What every entry point shares: schema registration and clean failure on bad input."""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from routing_suite.config import register_configs
from routing_suite.errors import ConfigError, RunFailure
from routing_suite.store import StoreBusy

register_configs()
log = logging.getLogger(__name__)


def _discard_run_dir() -> None:
    """Remove the run folder Hydra made if it holds nothing but its own files."""
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return
    own = {".hydra"} | {p.name for p in out.glob("*.log")}
    if out.is_dir() and all(p.name in own for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


def guarded(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Bad input ends the run with one line naming the key, exit code 2, and no run
    folder; a failure once work has started (`RunFailure`) with one line, exit code 1."""

    @functools.wraps(run)
    def wrapper(cfg: Any) -> Any:
        try:
            return run(cfg)
        except RunFailure as err:
            # Work had started: the run folder keeps its log, the store its finished batches.
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except StoreBusy as err:
            # Refused before any work, but a sweep job's folder is the busy run's too: left alone.
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except Exception as err:
            config_error = _config_error(err)
            if config_error is None:
                raise
            _discard_run_dir()
            print(f"error: {config_error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def _config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind `err` (Hydra wraps errors raised while instantiating)."""
    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
    return None
