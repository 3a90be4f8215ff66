"""Whether a run follows the protocol of a published figure, and if not, how it departs.

A published figure (``published.csv``) was measured on the whole dataset with the backbone as
its source released it: a run on 1 shot per class, on block 3, on other weights or on 3
batches an epoch is no measurement of the same thing, and its difference from the figure
would read as a finding. The protocol is our config files: the backbone exactly as
``conf/backbone/<name>.yaml`` sets it (over the schema's defaults), the dataset's images and
labels exactly as ``conf/dataset/<name>.yaml`` sets them (no ``shots``, ``fraction``,
``train_size``, ``test_size`` or split file), and no ``trainer.limit_*_batches``. The run's
side is its whole ``config.yaml`` (``Job.settings``), whose interpolations were resolved when
it ran; the files' interpolations (``${paths.weights_dir}``) are resolved against it.
"""

from __future__ import annotations

import functools

from omegaconf import OmegaConf

from mim_agg.report.runs import Job

# Keys that change neither which numbers a backbone computes nor which images and labels a run
# sees: labels (family), where files come from (url, sha256, root, download), the arithmetic's
# precision (dtype), loading (num_workers, verify, decode), and what a report averages over or
# selects on by its own rule (the seeds, the held-out fraction), or a recipe choice (augment).
NOT_PROTOCOL = {
    "backbone": ("family", "url", "sha256", "dtype"),
    "dataset": ("root", "download", "num_workers", "verify", "decode", "seed", "subset_seed",
                "heldout_fraction", "augment"),
}  # fmt: skip


@functools.cache
def config_file(group: str, name: str):
    """``conf/<group>/<name>.yaml`` over its schema (every such file names its schema, then
    itself, in its defaults list), unresolved; None where there is no such file."""
    from mim_agg.cli import CONFIG_DIR  # the CLI imports the report's modules
    from mim_agg.config import BackboneConfig, dataset_schema

    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        return None
    values = OmegaConf.load(path)
    values.pop("defaults", None)
    schema = BackboneConfig if group == "backbone" else dataset_schema(name)
    return OmegaConf.merge(OmegaConf.structured(schema), values)


def as_configured(group: str, name: str, settings: dict) -> dict | None:
    """``conf/<group>/<name>.yaml``'s values, its interpolations resolved in the run's config."""
    values = config_file(group, name)
    if values is None:
        return None
    root = OmegaConf.create({key: value for key, value in settings.items() if key != group})
    root[group] = values
    return OmegaConf.to_container(root, resolve=True)[group]


def group_departures(group: str, name: str, settings: dict) -> list[str]:
    """``backbone.block=3 (conf/backbone/mae_vitb.yaml: -1)``, for each key the run sets
    otherwise than the file. A key the run's config lacks did not exist when it ran: the run
    did as before the key, and is not held to it."""
    expected = as_configured(group, name, settings)
    if expected is None:
        return [f"no conf/{group}/{name}.yaml to compare the run's {group} with"]
    ours = settings.get(group) or {}
    return [
        f"{group}.{key}={ours[key]} (conf/{group}/{name}.yaml: {value})"
        for key, value in expected.items()
        if key not in NOT_PROTOCOL[group] and key in ours and ours[key] != value
    ]


def trainer_limits(settings: dict) -> list[str]:
    """``trainer.limit_train_batches=3``: every limit that cuts an epoch or an evaluation
    (Lightning reads 1.0 as all batches, an integer as that many)."""
    trainer = settings.get("trainer") or {}
    return [
        f"trainer.{key}={value}"
        for key, value in trainer.items()
        if key.startswith("limit_")
        and value is not None
        and not (isinstance(value, float) and value == 1.0)
    ]


def departures(job: Job, backbone: str, dataset: str) -> list[str]:
    """How ``job`` departs from the protocol of a figure of backbone config ``backbone`` on
    dataset config ``dataset``; empty where it follows it."""
    if not job.settings:
        return ["its config.yaml was not read"]
    return [
        *group_departures("backbone", backbone, job.settings),
        *group_departures("dataset", dataset, job.settings),
        *trainer_limits(job.settings),
    ]
