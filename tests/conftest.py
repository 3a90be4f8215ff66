"""Shared fixtures: offline, CPU-only, small. Nothing here touches the network."""

from __future__ import annotations

import os
import tempfile

# Hugging Face reads these at import: set them before timm is imported anywhere. Import
# helpers from tests/helpers.py, never from this file (a second import would run this again).
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mim_agg_hf_")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("MIM_AGG_DATA_DIR", None)

import pytest
import timm
import torch

import mim_agg.cli  # noqa: F401  (registers the config schemas)
from mim_agg.runs.runner import run_task
from tests.helpers import FAST, TINY_ARCH, compose_config

# Two cores: two threads alone, one per worker when pytest-xdist runs two (make test).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TINY_ARCH, num_classes=0).eval()


@pytest.fixture
def tiny_state_dict(tiny_vit) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_vit.state_dict().items()}


@pytest.fixture(scope="session")
def probe_ckpt(tmp_path_factory):
    """A finished AbMILP probe run's checkpoint (synthetic images, the random backbone of
    seed 0), whose pooling k-NN and logistic regression evaluate."""
    root = tmp_path_factory.mktemp("probe")
    run_task(compose_config([*FAST, "aggregator=abmilp"], root))
    return root / "run" / "checkpoints" / "last.ckpt"
