"""Transitional: the ``slurm_cluster`` fixture now lives in tests/conftest.py (the cluster code in
tests/helpers.py). tests/test_launch_env.py still imports it from here; delete this file once it does not."""
from conftest import slurm_cluster  # noqa: F401
