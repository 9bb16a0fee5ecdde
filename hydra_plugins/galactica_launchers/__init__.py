"""hydra-submitit-launcher's local and Slurm launchers, reporting each sweep point on the console as it
finishes (launch/sweep.py). Hydra loads launchers only from the ``hydra_plugins`` package, hence this
module; conf/hydra/launcher/{local,slurm}.yaml name these classes as their ``_target_``."""
from __future__ import annotations

from typing import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher


class _Reporting:
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from launch.sweep import launch_and_report

        return launch_and_report(self, job_overrides, initial_job_idx)


class LocalLauncher(_Reporting, submitit_launcher.LocalLauncher):
    pass


class SlurmLauncher(_Reporting, submitit_launcher.SlurmLauncher):
    pass
