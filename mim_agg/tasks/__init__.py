"""Tasks a run can perform; ``task=<name>`` picks one."""

from mim_agg.tasks import probe

TASKS = {"probe": probe.run}

__all__ = ["TASKS"]
