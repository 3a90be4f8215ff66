"""Tasks a run can perform; ``task=<name>`` picks one. Each module has ``run(cfg, ...)``;
tasks with ``USES_RUN_FOLDER`` also ``finished(folder)``, which shows a finished run."""

from mim_agg.tasks import analyze, extract, knn, probe, report

TASKS = {
    "probe": probe,
    "knn": knn,
    "extract": extract,
    "analyze": analyze,
    "report": report,
}

__all__ = ["TASKS"]
