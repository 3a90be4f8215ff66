"""Every option of every config group composes and instantiates; typos fail at composition."""

import copy
import dataclasses
import runpy
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from mim_agg.aggregators import AGGREGATORS, Aggregator, build_aggregator, register
from mim_agg.backbones import FrozenBackbone, TokenLayout, Tokens
from mim_agg.backbones.frozen import is_timm_tag
from mim_agg.builders import build_datamodule, head_grid
from mim_agg.cli import CONFIG_DIR
from mim_agg.config import BackboneConfig, DatasetConfig, register_configs
from mim_agg.probe.module import OPTIMIZERS
from mim_agg.runs.runner import required_groups, run_task
from mim_agg.tasks import TASKS
from mim_agg.tasks.probe import accumulation
from mim_agg.utils.loggers import build_loggers
from mim_agg.validation import (
    FAMILIES,
    backbone_arguments,
    check_representation,
    missing_keys,
)
from tests.helpers import FAST, PROJECT_ROOT, compose_config


def options(group: str) -> list[str]:
    """The options Hydra offers for ``group``: files in ``conf/`` and generated ones (every
    registered aggregator, ``heads=all``)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def files(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "schema"), [("backbone", BackboneConfig), ("dataset", DatasetConfig)]
)
def test_config_files_say_only_what_differs_from_the_codes_defaults(group, schema):
    """A default lives in one place: the signature the schema is derived from."""
    defaults = {f.name: f.default for f in dataclasses.fields(schema)}
    for name in files(group):
        values = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml"))
        repeated = [k for k, v in values.items() if k in defaults and v == defaults[k]]
        assert not repeated, f"{group}={name} repeats the default of {repeated}"


def test_every_group_has_options():
    groups = (
        "backbone",
        "aggregator",
        "heads",
        "dataset",
        "probe",
        "analysis",
        "trainer",
        "logger",
        "experiment",
    )
    for group in groups:
        assert options(group), group


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_options(name, tmp_path):
    cfg = compose_config([f"backbone={name}"], tmp_path).backbone
    if cfg.url is not None:  # a file that scripts/download_weights.py fetches
        assert cfg.weights.startswith(str(tmp_path / "weights")), cfg.weights
        assert cfg.url.startswith("https://")
    else:
        assert cfg.weights is None or is_timm_tag(cfg.weights), f"{cfg.weights} is no timm tag"
    assert cfg.family in FAMILIES
    with torch.device("meta"):  # real modules, no memory, no download
        backbone = FrozenBackbone(**{**backbone_arguments(cfg), "weights": None})
    cell = backbone.reader.size_multiple  # a ViT's patch; Hiera's final-stage cell, 32 px
    assert backbone.layout.num_patches == (cfg.img_size // cell) ** 2
    check_representation(cfg, backbone.layout.has_cls)  # no [cls] read where there is none


def test_every_registered_aggregator_is_an_option_and_heads_all_trains_them_all():
    assert options("aggregator") == sorted(AGGREGATORS)
    assert not (CONFIG_DIR / "aggregator").exists()  # generated: no file repeats a name
    assert "all" in options("heads") and not (CONFIG_DIR / "heads" / "all.yaml").exists()


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", options("aggregator"))
def test_aggregator_options(name, tmp_path):
    cfg = OmegaConf.to_container(compose_config([f"aggregator={name}"], tmp_path).aggregator)
    assert cfg["name"] == name
    aggregator = build_aggregator(layout=TokenLayout(192, 1, True, (14, 14)), **cfg)
    assert aggregator.out_dim >= 192


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", options("heads"))
def test_heads_options(name, tmp_path):
    cfg = compose_config([f"heads={name}"], tmp_path)
    grid = head_grid(cfg)
    assert "cls" in grid  # the `aggregator` head is always part of the grid
    for spec in grid.values():
        assert (spec.blr, spec.wd) == (cfg.probe.blr, cfg.probe.weight_decay)
        build_aggregator(layout=TokenLayout(768, 1, True, (14, 14)), **spec.options)
    if name == "all":
        assert {spec.options["name"] for spec in grid.values()} == set(AGGREGATORS)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options(name, tmp_path):
    cfg = compose_config(
        [f"dataset={name}", "dataset.root=/data/x", "dataset.num_classes=7"]
        if name == "image_folder"
        else [f"dataset={name}"],
        tmp_path,
    )
    datamodule = build_datamodule(cfg)
    assert datamodule.num_classes == cfg.dataset.num_classes
    root = cfg.dataset.get("root")  # a source that reads no files has no root
    if root is not None:
        assert root.startswith(("/data/x", str(tmp_path / "data")))


@pytest.mark.parametrize("name", options("analysis"))
def test_analysis_options(name, tmp_path):
    cfg = compose_config(["task=analyze", f"analysis={name}"], tmp_path).analysis
    assert cfg.split in ("val", "train") and cfg.num_images > 0


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", options("probe"))
def test_probe_options(name, tmp_path):
    cfg = compose_config([f"probe={name}"], tmp_path).probe
    assert cfg.optimizer in OPTIMIZERS and cfg.epochs > cfg.warmup_epochs >= 0


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options(name, tmp_path):
    cfg = compose_config([f"trainer={name}"], tmp_path).trainer
    if cfg.accelerator in ("cpu", "auto"):
        trainer = instantiate(cfg, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == 90
    else:  # no GPU here: check the class and its arguments without starting CUDA
        assert get_class(cfg._target_).__name__ == "Trainer" and cfg.precision == "bf16-mixed"


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options(name, tmp_path):
    cfg = compose_config([f"logger={name}"], tmp_path)
    loggers = build_loggers(cfg)  # WANDB_MODE=disabled in tests: CSV only
    assert type(loggers[0]).__name__ == "CSVLogger"


@pytest.mark.parametrize("name", options("callbacks"))
def test_callbacks_options(name, tmp_path):
    cfg = compose_config([f"callbacks={name}"], tmp_path)
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    assert all(isinstance(c, Callback) for c in callbacks) and len(callbacks) == len(cfg.callbacks)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options(name, tmp_path):
    cfg = compose_config([f"experiment={name}"], tmp_path)
    resolve_what_its_task_reads(cfg)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", options("debug"))
def test_debug_options(name, tmp_path):
    cfg = compose_config([f"debug={name}", "experiment=paper_mae_abmilp"], tmp_path)
    resolve_what_its_task_reads(cfg)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert cfg.trainer.accelerator == "cpu" and cfg.logger.wandb is None
    assert not trainer.progress_bar_callback and "debug" in cfg.tags


def resolve_what_its_task_reads(cfg) -> None:
    """Every key of the groups the task must have filled is set, and every interpolation
    resolves (another task's mandatory key, ``evaluate.run``, may stay ``???``)."""
    for group in required_groups(cfg, TASKS[cfg.task]):
        assert not missing_keys(cfg, group)
    OmegaConf.to_container(cfg, resolve=True)


def launcher_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_slurm_launcher_reads_the_slurm_node_and_agrees_with_ddp():
    launcher = launcher_config(
        [
            "hydra/launcher=slurm",
            "slurm.partition=gpu",
            "slurm.account=lab",
            "slurm.gpus_per_node=4",
            "hydra.launcher.setup=[module load cuda]",
        ]
    )
    assert get_class(launcher["_target_"]).__name__ == "SlurmLauncher"
    assert (launcher["partition"], launcher["account"]) == ("gpu", "lab")
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == 4  # one task per GPU
    assert launcher["setup"] == ["module load cuda"] and launcher["max_num_timeout"] > 0


def test_local_launcher_runs_jobs_as_processes():
    launcher = launcher_config(["hydra/launcher=local"])
    assert get_class(launcher["_target_"]).__name__ == "LocalLauncher"


def test_a_git_ignored_local_config_is_composed_last(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text("# @package _global_\nslurm:\n  qos: high\n")
    launcher = launcher_config(["hydra/launcher=slurm", f"hydra.searchpath=[file://{tmp_path}]"])
    assert launcher["qos"] == "high"
    ignored = subprocess.run(
        ["git", "check-ignore", "conf/local/default.yaml"], cwd=PROJECT_ROOT, check=False
    )
    assert ignored.returncode == 0


def test_paper_recipe_keeps_an_effective_batch_of_16384_on_any_device_count(tmp_path):
    cfg = compose_config(["experiment=paper_mae_abmilp"], tmp_path)
    assert [accumulation(cfg, devices) for devices in (1, 2, 8, 16)] == [16, 8, 2, 1]
    with pytest.raises(ValueError, match="probe.effective_batch=16384 is no multiple of"):
        accumulation(cfg, 3)


def test_paper_main_sweeps_mim_and_jea_backbones_with_four_heads(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", ["experiment=paper_main"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and "mae_vitb" in cfg.hydra.sweeper.params.backbone
    assert "dino_vitb" in cfg.hydra.sweeper.params.backbone
    assert set(head_grid(cfg)) == {"cls", "mean", "abmilp", "topk_attn"}
    assert cfg.probe.effective_batch == 16384


def test_defaults_are_the_paper_recipe(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.backbone.weights == "vit_base_patch16_224.mae" and not cfg.backbone.final_norm
    assert cfg.aggregator.name == "cls" and cfg.probe.optimizer == "lars" and cfg.probe.blr == 0.1
    assert (cfg.probe.epochs, cfg.probe.warmup_epochs) == (90, 10)
    abmilp = compose_config(["aggregator=abmilp"], tmp_path).aggregator
    assert (abmilp.depth, abmilp.tokens, abmilp.pos_cond, abmilp.self_attn) == (
        1,
        "patch",
        False,
        "none",
    )


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize(
    "override,message",
    [
        ("aggregator=nope", "Could not find 'aggregator/nope'"),
        ("aggregator.depht=2", "Key 'depht' not in 'AbMILPOptions'"),
        ("backbone.blok=3", "Key 'blok' not in 'BackboneConfig'"),
        ("dataset.rot=/x", "Key 'rot' not in 'DatasetConfig'"),
        ("probe.lr=0.1", "Key 'lr' not in 'ProbeConfig'"),
        ("logger.wandb.projet=x", "Key 'projet' not in 'WandbConfig'"),
        ("backbone.block=last", "Value 'last' of type 'str' could not be converted to Integer"),
    ],
)
def test_typos_fail_at_composition(override, message):
    overrides = ["aggregator=abmilp", override] if "depht" in override else [override]
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(overrides)
    text = str(error.value) + str(error.value.__cause__)
    assert message in text


@pytest.mark.parametrize(
    "group,text,message",
    [
        (
            "aggregator",
            "defaults:\n  - /aggregator/topk_attn@_here_\n  - _self_\ntopk: 3\n",
            "Key 'topk' not in 'TopKClsAttentionOptions'",
        ),
        (
            "experiment",
            "# @package _global_\ndefaults:\n  - override /aggregator: abmilp\n"
            "aggregator:\n  depht: 2\n",
            "Key 'depht' not in 'AbMILPOptions'",
        ),
    ],
)
def test_misspelled_key_in_a_config_file_fails(tmp_path, group, text, message):
    (tmp_path / group).mkdir()
    (tmp_path / group / "typo.yaml").write_text(text)
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", f"{group}=typo"]
    with (
        initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"),
        pytest.raises(ConfigCompositionException) as error,
    ):
        compose("config", overrides=overrides)
    assert message in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize("script", sorted(p.name for p in (PROJECT_ROOT / "scripts").glob("*.py")))
def test_every_script_answers_help_with_its_usage(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "scripts"))  # as `python scripts/x.py` has it
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(str(PROJECT_ROOT / "scripts" / script), run_name="__main__")
    assert exit_status.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"scripts/{script}" in out or "usage:" in out


def help_rows() -> dict[str, list[str]]:
    """``--help``'s config groups, composed as ``run.py --help`` composes them (in-process):
    ``{group: the options listed}``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        header = compose("config", return_hydra_config=True).hydra.help.header
    rows: dict[str, str] = {}
    for line in header.split("== Config groups")[1].split("== Scripts ==")[0].splitlines()[1:]:
        if line.strip():
            if not line.startswith(" "):
                name, _, line = line.partition(" ")
            rows[name] = rows.get(name, "") + " " + line
    return {name: row.replace(",", " ").split() for name, row in rows.items()}


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_help_lists_every_option_of_every_group_as_hydra_finds_them():
    """No list is kept by hand: files in conf/ and the registries' options, a new one included."""
    rows = help_rows()
    folders = {path.name for path in CONFIG_DIR.iterdir() if path.is_dir()}
    generated = {"aggregator", "hydra/launcher"}  # the registry's; Hydra's and ours
    assert set(rows) == folders - {"hydra", "local"} | generated  # local: nothing to choose
    for group, row in rows.items():
        assert row == options(group), f"--help row of {group}"
    assert "all" in rows["heads"] and "basic" in rows["hydra/launcher"]


@pytest.fixture
def toy_aggregator(monkeypatch):
    """A new aggregator registered at runtime, as a notebook or a plug-in module would: its
    module alone, no file in conf/. The ConfigStore and the registry are restored after."""
    store = ConfigStore.instance()
    monkeypatch.setattr(store, "repo", copy.deepcopy(store.repo))

    @register("toy_sum")
    class ToySum(Aggregator):
        """Scaled sum of the patch tokens: the smallest aggregator with an option."""

        def __init__(self, layout: TokenLayout, *, scale: float = 1.0) -> None:
            super().__init__(layout)
            self.scale = scale

        def forward(self, tokens: Tokens) -> torch.Tensor:
            return self.scale * tokens.patches.sum(dim=1)

    register_configs()  # as mim_agg.cli does on import, before Hydra composes
    yield "toy_sum"
    del AGGREGATORS["toy_sum"]


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_new_aggregator_is_its_module_alone(toy_aggregator, tmp_path):
    before = sorted(CONFIG_DIR.rglob("*"))
    cfg = compose_config(["aggregator=toy_sum", "aggregator.scale=2"], tmp_path)
    assert OmegaConf.to_container(cfg.aggregator) == {"name": "toy_sum", "scale": 2.0}
    aggregator = build_aggregator(layout=TokenLayout(192, 1, True, (14, 14)), **cfg.aggregator)
    assert aggregator.out_dim == 192 and aggregator.scale == 2.0
    with pytest.raises(ConfigCompositionException) as typo:
        compose_config(["aggregator=toy_sum", "aggregator.scal=2"], tmp_path)
    assert "Key 'scal' not in 'ToySumOptions'" in str(typo.value.__cause__)
    grid = head_grid(compose_config(["heads=all"], tmp_path))
    assert grid["toy_sum"].options == {"name": "toy_sum", "scale": 1.0}
    assert {spec.options["name"] for spec in grid.values()} == set(AGGREGATORS)
    assert "toy_sum" in help_rows()["aggregator"]
    assert sorted(CONFIG_DIR.rglob("*")) == before  # nothing was written to conf/


def test_an_unknown_task_is_refused_by_name_listing_the_tasks(tmp_path):
    from mim_agg.errors import ConfigError

    cfg = compose_config([*FAST, "task=probs"], tmp_path)
    with pytest.raises(ConfigError, match="task=probs is no task; the tasks are analyze, "):
        run_task(cfg)
    assert set(TASKS) == {"analyze", "evaluate", "extract", "knn", "logreg", "probe", "report"}
