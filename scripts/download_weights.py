"""Fetch a backbone's checkpoint from its official source into ``paths.weights_dir``.

    python scripts/download_weights.py backbone=mocov3_vitb
    python scripts/download_weights.py backbone=ibot_vitl paths.weights_dir=/shared/weights

Any config override works as with run.py. The file is called ready only once it opens as a
run opens it (the same safe loader and format detection); one that does not is moved aside
(exit status 2). Afterwards ``backbone=<name>`` loads the file offline. A backbone with a timm
tag (``backbone=mae_vitb``) is fetched into the Hugging Face cache (``HF_HOME``), where runs on
offline compute nodes that share it find it. Licence-gated weights (DINOv3) are served only at
the signed address their authors e-mail once the licence is accepted: without it, the script
says where to ask and how to pass that address or point ``backbone.weights`` at the file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub.constants import HF_HUB_CACHE
from hydra import compose, initialize_config_dir
from hydra.errors import CompactHydraException

from mim_agg.backbones.frozen import create_model, is_timm_tag, weight_dtype
from mim_agg.backbones.loading import describe_checkpoint
from mim_agg.cli import CONFIG_DIR, composition_message
from mim_agg.errors import UserError
from mim_agg.utils.download import download
from mim_agg.utils.files import sha256_of
from mim_agg.validation import backbone_arguments


def main(overrides: list[str]) -> int:
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except CompactHydraException as error:  # backbone=<no such config>, a misspelled key
        print(f"Error: {composition_message(error)}", file=sys.stderr)
        return 2
    backbone = cfg.backbone
    try:
        dtype = weight_dtype(backbone.dtype)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    if backbone.url is None:
        if backbone.weights is None or not is_timm_tag(backbone.weights):
            print(f"backbone.weights={backbone.weights}: nothing to download.", file=sys.stderr)
            return 0
        return prefetch_tag(backbone, dtype)
    if (instructions := gated(backbone)) is not None:
        print(instructions, file=sys.stderr)
        return 2
    fix = f"it is not the checkpoint {backbone.url} should serve"
    held = []  # what the check found, for the message: the file is read once

    def check(path) -> None:
        held.append(describe_checkpoint(path, fix))
        create_model(backbone.arch, str(path), backbone.img_size, dtype, **arch_kwargs(backbone))

    try:
        path = download(backbone.url, backbone.weights, backbone.sha256, check=check)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print(f"{path} is ready ({held[0]}): python run.py {' '.join(overrides)}")
    if backbone.sha256 is None:
        print(pin_advice(sha256_of(path), overrides))
    return 0


def dinov3_sources(name: str) -> str:
    """Where DINOv3's file ``name`` is given out: Meta's form, or the same weights converted,
    transformers' names on Hugging Face for a ViT (also read, see ``formats/dinov3.py``), timm's
    tag for a ConvNeXt (its configs' default; transformers' ConvNeXt names are not read)."""
    repo = "facebook/" + name.split("-")[0].replace("_", "-")
    meta = (
        "DINOv3's weights are licence-gated. Either\n"
        "  - request them at https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/:"
        " Meta e-mails a signed URL for each file, valid for a few days; download it here, "
        f"resumed and checked, with 'backbone.url=<the URL of {name}>' added to this command, or "
        f"fetch it yourself and pass backbone.weights=/path/to/{name};\n"
    )
    if "_convnext_" in name:
        tag = name.split("_pretrain_")[0].removeprefix("dinov3_") + ".dinov3_lvd1689m"
        return meta + (
            f"  - or keep the config's timm tag, backbone.weights={tag}: the same weights, "
            f"converted by timm (transformers' conversion at https://huggingface.co/{repo} is not "
            "read here)."
        )
    return meta + (
        f"  - or accept the licence at https://huggingface.co/{repo}, fetch its model.safetensors"
        f" (huggingface-cli download {repo} model.safetensors) and pass "
        "backbone.weights=/path/to/model.safetensors: transformers' conversion, whose RoPE "
        "periods are float32, not the stored bfloat16 ones the authors' model (and "
        "efficient-probing) computed with, so its tokens differ slightly."
    )


# Where licence-gated weights are requested, by the official address a config's url names.
GATED = {"https://dinov3.llamameta.net/": dinov3_sources}


def gated(backbone) -> str | None:
    """What to do for a licence-gated file not yet downloaded whose url carries no signature
    (a signed URL, or the file in place, is downloaded or checked as any other); else None."""
    sources = next((how for prefix, how in GATED.items() if backbone.url.startswith(prefix)), None)
    if sources is None or urlsplit(backbone.url).query or Path(backbone.weights).is_file():
        return None
    name = Path(urlsplit(backbone.url).path).name
    return (
        f"backbone.weights={backbone.weights} is not there, and {backbone.url} serves it only "
        f"with a signature. {sources(name)}"
    )


def arch_kwargs(backbone) -> dict:
    """``backbone.arch_kwargs`` as plain values: timm takes lists (ConvNeXt's ``dims``), never
    a ``ListConfig``."""
    return backbone_arguments(backbone)["arch_kwargs"] or {}


def prefetch_tag(backbone, dtype) -> int:
    """A timm tag into the Hugging Face cache, as a run would load it: compute nodes are often
    offline, and a run there finds the tag in a cache (``HF_HOME``) it shares with this node."""
    try:
        model = create_model(
            backbone.arch, backbone.weights, backbone.img_size, dtype, **arch_kwargs(backbone)
        )
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    tensors = len(model.state_dict())
    print(
        f"backbone.weights={backbone.weights} is ready in the Hugging Face cache {HF_HUB_CACHE} "
        f"({tensors} tensors); runs on nodes sharing it load it offline (HF_HUB_OFFLINE=1)."
    )
    return 0


def pin_advice(digest: str, overrides: list[str]) -> str:
    """The config line that makes later downloads of this file checked: the authors publish
    no SHA-256 for most files, so the first good download is what later ones are held to."""
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("backbone=")), "<name>")
    return (
        f"SHA-256 {digest}. No backbone.sha256 is configured; to have later downloads checked "
        f"against this one, add the line `sha256: {digest}` to conf/backbone/{name}.yaml "
        f"(or pass backbone.sha256={digest})."
    )


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        raise SystemExit(0)
    raise SystemExit(main(sys.argv[1:]))
