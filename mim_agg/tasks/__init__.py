"""Tasks a run can perform; ``task=<name>`` picks one. Each module has ``run(cfg, ...)``;
tasks with ``USES_RUN_FOLDER`` also ``finished(folder)``, which shows a finished run."""

from mim_agg.tasks import analyze, probe

TASKS = {"probe": probe, "analyze": analyze}

__all__ = ["TASKS"]
