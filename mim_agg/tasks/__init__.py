"""Tasks a run can perform, one module each; ``task=<name>`` picks the module of that name.

A task module declares (``mim_agg/tasks/knn.py`` is a complete example):
- ``SUMMARY``: its line in ``--help``;
- ``run(cfg, watch)``: what it does; ``watch`` (``mim_agg/runs/preemption.py``) says when a
  signal asks it to stop at the next safe point;
- ``USES_RUN_FOLDER``: whether it owns ``outputs/runs/<name>`` (resume, status, results); if so
  also ``reads(cfg)`` and ``IGNORED``, the config groups its results depend on and the keys
  inside them that change no number (``mim_agg/runs/identity.py`` names its runs from exactly
  these, so a group added for another task never renames its runs), and ``finished(folder)``,
  which shows a finished run's results again;
- ``Settings``: the schema of its own config group, named ``SETTINGS_GROUP`` (values and their
  meaning in ``conf/<group>/default.yaml``), or None where it reads other groups only.
Modules are found here by name, so a new task is its module, its config group (if any), one
line in ``conf/config.yaml``'s defaults, and one test.
"""

import importlib
import pkgutil

TASKS = {
    module.name: importlib.import_module(f"{__name__}.{module.name}")
    for module in pkgutil.iter_modules(__path__)
}

__all__ = ["TASKS"]
