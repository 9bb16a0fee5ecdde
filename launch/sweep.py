"""Hydra multiruns (``gal-train -m``): what names a sweep point, and a console line as each point finishes.

* **Names**: a point's label is its values of the swept keys, ``optim.lr_max=0.001,data.repeat.samples=80``
  (the keys given several values on the command line: ``a,b``, ``range()``, ``choice()``, ``glob()``; constant
  overrides such as ``data.path=`` are left out). In wandb an unset ``logger.name`` becomes that label and an
  unset ``logger.group`` the sweep (its directory's name), so a sweep's runs sit together and tell apart.
* **Progress**: hydra-submitit-launcher runs the points as submitit jobs whose output goes to
  ``.submitit/<job id>/`` and waits for them in submission order, so the console stays silent until the end.
  The launchers of conf/hydra/launcher/ (``hydra_plugins/galactica_launchers``, a Hydra plugin must live in
  the ``hydra_plugins`` package) submit the same jobs, then print one line per point in the order they
  finish (:func:`point_line`) and remove the empty ``.submitit/%j`` folder submitit leaves behind.

Light imports only: Hydra imports every plugin module at start-up, ``--help`` included.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)  # in a multirun Hydra's own format: "[time][HYDRA] ...", as its "#0 : ..." lines
POLL_S = 2.0  # how often the launcher asks submitit whether a point has finished


def swept_keys(task_overrides: Sequence[str]) -> set[str]:
    """The keys a multirun's command line sweeps over (``optim.lr_max=1e-3,2e-3`` → ``optim.lr_max``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def point_label(job_overrides: Sequence[str], swept: set[str]) -> str:
    """A point's values of the swept keys, in command-line order: ``optim.lr_max=0.001,seed=2``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(job_overrides))
    return ",".join(f"{o.key_or_group}={o.get_value_element_as_str()}" for o in parsed if o.key_or_group in swept)


def name_point(logger: Any, hydra_cfg: Any) -> None:
    """In a multirun, fill an unset ``logger.group`` with the sweep's name and an unset ``logger.name`` with
    the point's label; a single run is left as it is (wandb then names it after its run directory).

    The sweep's own command line is in ``multirun.yaml``, which Hydra's sweeper writes into the sweep
    directory before it starts a point (a point's config holds only its own values, not which were swept)."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sweep_dir = Path(hydra_cfg.sweep.dir)
    logger.group = logger.group or sweep_dir.name
    if not logger.name and (sweep_dir / "multirun.yaml").is_file():
        swept = swept_keys(OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task)
        logger.name = point_label(hydra_cfg.overrides.task, swept) or None


def point_line(done: int, total: int, label: str, run_dir: Path, error: str | None, log: Path | None) -> str:
    """``sweep 2/5 done: optim.lr_max=0.001 → loss 4.41, held-out 4.52 after 24 steps, runs/lr/1``; a failed
    point says why (the trainer's stop event, or the last line of the job's error log) and where its log is."""
    what = label or "(no overrides)"
    rows = _metrics(run_dir)
    steps = [r for r in rows if "event" not in r and r.get("loss") is not None]
    held_out = [r["losses"]["aggregate"] for r in rows
                if r.get("event") == "validation" and r["losses"].get("aggregate") is not None]
    result = ", ".join([*([f"loss {steps[-1]['loss']:.4g}"] if steps else []),
                        *([f"held-out {held_out[-1]:.4g}"] if held_out else [])])
    result = f"{result} after {steps[-1]['step'] if steps else 0} steps" if result else "no steps"
    if error is None:
        return f"sweep {done}/{total} done: {what} → {result}, {run_dir}"
    last = [r for r in rows if r.get("event") not in (None, "validation")][-1:]
    if last and last[0]["event"] in ("stopped", "preempted"):  # the trainer's own account of why
        error = last[0].get("reason") or last[0]["event"]
    return f"sweep {done}/{total} failed: {what} → {error} ({result}); log {log}"


def _metrics(run_dir: Path) -> list[dict]:
    from pretrain.analysis.records import read_metrics

    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def launch_and_report(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """hydra-submitit-launcher 1.2's ``BaseSubmititLauncher.launch`` (the same executor, parameters and jobs),
    except that it waits for the points as they finish, prints a line for each, and removes the empty
    ``%j`` folder. The results come back in submission order and a failed point raises, as before."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cluster, config = launcher._EXECUTOR, launcher.config
    params = dict(launcher.params)
    folder = params.pop("submitit_folder")
    init = {f"{cluster}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
    executor = submitit.AutoExecutor(cluster=cluster, folder=folder, **init)
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in common else f"{cluster}_{k}": v for k, v in params.items()})

    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        sweep_dir.chmod(int(str(config.hydra.sweep.mode), 8))
    swept = swept_keys(config.hydra.overrides.task)
    nums = [initial_job_idx + i for i in range(len(job_overrides))]
    log.info(f"Submitit '{cluster}' sweep output dir : {sweep_dir}")
    for num, overrides in zip(nums, job_overrides):
        log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
    args = [(list(o), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
            for num, o in zip(nums, job_overrides)]
    jobs = executor.map_array(launcher, *zip(*args))
    try:
        for done, job in enumerate(submitit.helpers.as_completed(jobs, poll_frequency=POLL_S), 1):
            i = jobs.index(job)
            label = point_label(job_overrides[i], swept) or " ".join(filter_overrides(job_overrides[i]))
            log.info(point_line(done, len(jobs), label, sweep_dir / str(nums[i]), _job_error(job), job.paths.stderr))
    finally:
        # submitit's local job controller creates the folder pattern itself, literally ('.submitit/%j')
        _remove_empty(Path(folder))
    return [job.results()[0] for job in jobs]


def _job_error(job: Any) -> str | None:
    """None when the point completed; otherwise one line: its exception, or the last line of its error log
    (gal-train's own one-line error, when it stopped on a config or input error)."""
    from hydra.core.utils import JobStatus

    error = job.exception()
    if error is None:
        ret = job.results()[0]
        if ret.status == JobStatus.COMPLETED:
            return None
        error = ret._return_value  # the task's exception (JobReturn.return_value would raise it)
        return f"{type(error).__name__}: {error}".splitlines()[0]
    lines = [x.strip() for x in _read(job.paths.stderr).splitlines() if x.strip()]
    return lines[-1] if lines else f"the job ended without a result (state {job.state})"


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _remove_empty(folder: Path) -> None:
    if "%" in folder.name:
        try:
            folder.rmdir()
        except OSError:  # absent, or not empty: not ours to remove
            pass
