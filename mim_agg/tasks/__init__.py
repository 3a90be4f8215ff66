"""Tasks a run can perform; ``task=<name>`` picks one. Each module has ``run(cfg, ...)``;
tasks with ``USES_RUN_FOLDER`` also ``finished(folder)``, which shows a finished run, and
``reads(cfg)`` with ``IGNORED``: the config groups their results depend on and the keys inside
them that change no number, from which ``mim_agg/runs/identity.py`` names their runs."""

from mim_agg.tasks import analyze, extract, knn, probe, report

TASKS = {
    "probe": probe,
    "knn": knn,
    "extract": extract,
    "analyze": analyze,
    "report": report,
}

__all__ = ["TASKS"]
