"""Tasks a run can perform; ``task=<name>`` picks one."""

from mim_agg.tasks import analyze, probe

TASKS = {"probe": probe.run, "analyze": analyze.run}

__all__ = ["TASKS"]
