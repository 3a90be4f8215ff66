"""Token aggregators. Each module registers its aggregators on import; all are imported here,
so adding an aggregator is one file in this folder plus one YAML in ``conf/aggregator``."""

import importlib
import pkgutil

from mim_agg.aggregators.base import (
    AGGREGATORS,
    Aggregator,
    WeightedPatchPool,
    build_aggregator,
    options_schema,
    pool,
    register,
    token_request,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "WeightedPatchPool",
    "build_aggregator",
    "options_schema",
    "pool",
    "register",
    "token_request",
]
