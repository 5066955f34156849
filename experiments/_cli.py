"""What every entry point shares: schema registration and clean failure on bad input.

`guarded` wraps a Hydra task (the job), `cli` the whole command (Hydra's own
composition of the config, which runs before any job): bad input, whichever
catches it, ends the run with one line naming the key, and exit code 2.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from routing_suite.config import register_configs
from routing_suite.errors import ConfigError, RunFailure
from routing_suite.store_lock import StoreBusy

register_configs()
log = logging.getLogger(__name__)

# The configs, by absolute path: Hydra finds them whether an entry point runs as
# `python -m experiments.<name>` or is called in another process's code (the tests).
CONF = str(Path(__file__).resolve().parents[1] / "conf")


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
    folder; a failure once work has started (`RunFailure`) with one line, exit code 1;
    a machine that refuses a write (disk full, a name too long, no permission) with
    one line naming the file, exit code 2 (the store keeps what was finished)."""

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
            if (refused := _os_refusal(err)) is not None:
                print(f"error: {refused}", file=sys.stderr)
                sys.exit(2)
            config_error = _config_error(err)
            if config_error is None:
                raise
            _discard_run_dir()
            print(f"error: {config_error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def cli(main: Callable[[], Any]) -> Any:
    """Run a `hydra.main` entry point so that Hydra's own errors (an unknown key or
    option, a value of the wrong type, an override it cannot parse, a refused
    sweep) are one line, exit code 2, too. Hydra prints them in several lines,
    naming its schema classes, unless HYDRA_FULL_ERROR lets them through: it is
    set here for that, and a user who set it gets Hydra's full report."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    if previous == "1":
        return main()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return main()
    except Exception as err:
        line = hydra_error_line(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


# Hydra's config store holds the suite's typed schemas as options of each group;
# they are not options a user chooses, and their names say nothing to one.
_SCHEMA_NAME = re.compile(r"\b\w+_schema\b")


def hydra_error_line(err: BaseException) -> str | None:
    """One line for an error Hydra or OmegaConf raised while composing the config; None for others."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        return None
    if isinstance(err, OverrideParseException):
        return f"cannot read the override {err.override!r}: {err.message.splitlines()[0]}"
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = [o for o in err.options if not _SCHEMA_NAME.fullmatch(o)]
        return f"{group}={option}: no such option (the options: {', '.join(options)})"
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return _omegaconf_line(cause)
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return _SCHEMA_NAME.sub("a schema", re.sub(r"^In '[^']*': ", "", first))


def _omegaconf_line(err: Any) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    key = err.full_key
    if isinstance(err, MissingMandatoryValue):
        return f"{key} is required and has no value (add {key}=...)"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return f"{key}: no such key (a key of your own needs a leading +, e.g. +{key}=...)"
    first = str(err).splitlines()[0].strip()
    return f"{key}: {_SCHEMA_NAME.sub('a schema', first)}"


def _config_error(err: BaseException | None) -> ConfigError | str | None:
    """The ConfigError behind `err` (Hydra wraps errors raised while instantiating), or
    the line for a config value OmegaConf refused there (say a required one left empty)."""
    from omegaconf.errors import OmegaConfBaseException

    while err is not None:
        if isinstance(err, ConfigError):
            return err
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            return _omegaconf_line(err)
        err = err.__cause__ or err.__context__
    return None


# Refusals of the machine, not of the suite: each is said in one line naming the file.
_OS_REFUSALS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.ENAMETOOLONG: "a file name too long", errno.EACCES: "no permission", errno.EROFS: "a read-only file system"}


def _os_refusal(err: BaseException | None) -> str | None:
    while err is not None:
        if isinstance(err, OSError) and err.errno in _OS_REFUSALS:
            where = err.filename or "a file of the run"
            return (f"{_OS_REFUSALS[err.errno]} while writing {str(where)!r}; the store keeps every finished prompt "
                    "and stage: make room (or fix the path) and rerun the same command")
        err = err.__cause__ or err.__context__
    return None
