"""Labeled image sources, the paper's transforms and the train / held-out / test splits.

Every module here is imported, so a source registered with ``@source`` in a new module is
found (``dataset=<name>``) without a list to extend."""

import importlib
import pkgutil

from mim_agg.data.datamodule import ProbeDataModule
from mim_agg.data.sources import SOURCES, Source, source, source_options
from mim_agg.data.transfer import TRANSFER

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SOURCES", "TRANSFER", "ProbeDataModule", "Source", "source", "source_options"]
