"""How every gal-* command ends on a failure it expects: one line on stderr, exit code 2, no traceback.

Expected failures are the user's to fix: a config key (``ConfigError``, Hydra's own override and
config-group errors, OmegaConf's type checks), a bad input line (``BadInput``), a missing file. The line
names the key, file, line, shard or checkpoint and what to do. ``--debug`` (or ``HYDRA_FULL_ERROR=1``)
shows the whole traceback instead. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, NoReturn

EXIT_USAGE = 2  # usage and config errors, as argparse does


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def expected_message(e: BaseException) -> str | None:
    """The one line for an expected failure, or None for a bug."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from pretrain.config import ConfigError
    from pretrain.data.read import BadInput

    if isinstance(e, (ConfigError, BadInput, FileNotFoundError, FileExistsError, NotADirectoryError,
                      PermissionError)):
        return str(e)
    if isinstance(e, OmegaConfBaseException):
        key = getattr(e, "full_key", None)
        return f"{key}: {_first_line(e)}" if key else _first_line(e)
    if isinstance(e, MissingConfigException):  # model=nope: list the choices on the same line
        head = re.sub(r"^In '[^']*': ", "", _first_line(e))
        return f"{head}; choose one of: {', '.join(e.options)}" if e.options else head
    if isinstance(e, HydraException):  # a malformed override, an unknown key
        head, cause = _first_line(e).removeprefix("Error merging override ").rstrip("."), e.__cause__
        return f"{head}: {_first_line(cause)}" if isinstance(cause, OmegaConfBaseException) else head
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def hydra_app(prog: str, config_name: str, task: Callable) -> None:
    """Run ``task(cfg)`` as the Hydra app ``config_name`` (overrides, ``-m`` sweeps, ``--cfg job``), with
    expected failures, of the composition or of the task, reported by :func:`fail`."""
    import functools

    import hydra

    from pretrain.config import CONF_DIR

    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    show_traceback = debug or os.environ.get("HYDRA_FULL_ERROR") == "1"

    def report(e: Exception) -> None:
        message = expected_message(e)
        if message is None or show_traceback:
            raise e
        fail(prog, message)

    @functools.wraps(task)
    def guarded(cfg):
        try:
            return task(cfg)
        except Exception as e:  # noqa: BLE001 (sorted into expected failures and bugs)
            report(e)

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises composition errors rather than printing a report
    try:
        hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(guarded)()
    except Exception as e:  # noqa: BLE001
        report(e)
