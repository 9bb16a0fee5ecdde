"""How every gal-* command ends on a failure it expects: one line on stderr, exit code 2, no traceback.

Expected failures are the user's to fix: a config key (``ConfigError``, Hydra's own override and
config-group errors, OmegaConf's type checks), a bad input line (``BadInput``), a missing file. The line
names the key, file, line, shard or checkpoint and what to do. ``--debug`` (or ``HYDRA_FULL_ERROR=1``)
shows the whole traceback instead. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from typing import Callable, NoReturn

# The exit codes of the gal-* commands (gal-train's preemption code is launch.slurm.EXIT_PREEMPTED).
EXIT_DONE = 0
EXIT_USAGE = 2  # usage and config errors, as argparse does
EXIT_LOSS_GUARD = 3  # gal-train: trainer.max_consecutive_skips bad steps in a row (the last state checkpointed)

# Third-party noise that says nothing about the run: (warning category, message pattern).
NOISE_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),  # megatron-core without TE or apex
    (FutureWarning, r"torch\.distributed\.\w+` is deprecated"),  # DeepSpeed ZeRO's collectives, every step
    (DeprecationWarning, r"tp_group is None|torch\.jit\.script_method|cyclic import"),  # megatron-core internals
)
NOISE_LOGGER = "third_party"  # where that noise goes: the run's log file (train.log), never the console
NOISE_LOGGERS = (NOISE_LOGGER, "compilers")  # setuptools' compiler probes: DeepSpeed checks its ops with gcc
CHATTY_LOGGERS = ("megatron",)  # their INFO lines ("Detected Megatron Core", ...): file only; warnings shown


def _hide_noise_warnings() -> None:
    """NOISE_WARNINGS go to the NOISE_LOGGER instead of stderr (installed when this module is imported:
    every gal-* command imports it before torch, DeepSpeed or megatron-core)."""
    log, shown = logging.getLogger(NOISE_LOGGER), warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if any(issubclass(category, c) and re.search(p, str(message)) for c, p in NOISE_WARNINGS):
            log.info("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


_hide_noise_warnings()


def quiet_third_party() -> None:
    """Known third-party start-up noise goes to the log file (if any), not the console: the NOISE_WARNINGS,
    the gcc probes of DeepSpeed's op checks, megatron-core's INFO lines, DeepSpeed's "Setting accelerator
    to CPU" guess (said instead with DS_ACCELERATOR=cpu where there is no GPU) and what DeepSpeed prints
    while it builds its CPU ops (:func:`third_party_output`). Call once logging is set up, before the run."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(_for_the_console)


def _for_the_console(record: logging.LogRecord) -> bool:
    if record.name.startswith(NOISE_LOGGERS):
        return False
    return record.levelno >= logging.WARNING or not record.name.startswith(CHATTY_LOGGERS)


@contextlib.contextmanager
def third_party_output():
    """What third-party code print()s inside the block goes to the log file, a line each."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    for line in buffer.getvalue().splitlines():
        logging.getLogger(NOISE_LOGGER).info(line)


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
