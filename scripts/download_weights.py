"""Fetch a backbone's checkpoint from its official source into ``paths.weights_dir``.

    python scripts/download_weights.py backbone=mocov3_vitb
    python scripts/download_weights.py backbone=ibot_vitl paths.weights_dir=/shared/weights

Any config override works as with run.py. Afterwards ``backbone=<name>`` loads the file
offline. Backbones with timm tags need no download here (timm fetches them on first use).
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir

from mim_agg.cli import CONFIG_DIR
from mim_agg.errors import UserError
from mim_agg.utils.download import download


def main(overrides: list[str]) -> int:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    backbone = cfg.backbone
    if backbone.url is None:
        print(
            f"backbone.arch={backbone.arch} with weights={backbone.weights} has no backbone.url: "
            "timm fetches tagged weights itself; nothing to download.",
            file=sys.stderr,
        )
        return 0
    try:
        path = download(backbone.url, backbone.weights, backbone.sha256)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print(f"{path} is ready: python run.py {' '.join(overrides)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
