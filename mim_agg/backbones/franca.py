"""Franca ViT-L/14 (Venkataramanan et al., 2025) as a timm model: DINOv2's ViT with SwiGLU.

Franca is trained with the DINOv2 codebase (valeoai/Franca, ``franca/models/
vision_transformer.py``): LayerScale (init 1e-5), q/k/v biases, LayerNorm eps 1e-6, and
``ffn_layer=swiglufused``, whose hidden width DINOv2 rounds as ``(int(4 * dim * 2 / 3) + 7)
// 8 * 8`` (2736 at width 1024); one ``w12`` projection holds both halves, the first gated by
SiLU. That is timm's ``VisionTransformer`` with ``SwiGLUPacked`` (``fc1`` = ``w12``, ``fc2`` =
``w3``); timm has no such DINOv2 size, so it is registered here. The published files are
training checkpoints read by ``mim_agg/backbones/formats/franca.py``.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SwiGLUPacked
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn


def swiglu_ratio(dim: int) -> float:
    """timm's ``mlp_ratio`` that gives DINOv2's fused SwiGLU width: ``fc1`` has ``2 * hidden``
    outputs, ``hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8``."""
    return 2 * ((int(4 * dim * 2 / 3) + 7) // 8 * 8) / dim


default_cfgs = generate_default_cfgs(
    {
        "vit_large_patch14_franca": {
            "url": "",  # the authors' file needs converting: FrozenBackbone loads it from disk
            "num_classes": 0,
            "input_size": (3, 224, 224),
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj",
            "license": "apache-2.0",
            "paper_ids": "arXiv:2507.14137",
        }
    }
)


@register_model
def vit_large_patch14_franca(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Franca ViT-L/14: 24 blocks of width 1024, 16 heads, fused SwiGLU of hidden width 2736
    (franca/hub/backbones.py's ``FrancaConfig``). Its files carry 518-px position embeddings
    (37 x 37), resampled at load to ``img_size``."""
    if pretrained:
        raise ValueError(
            "Franca's weights are not on timm's hub: pass the authors' file as backbone.weights "
            "(conf/backbone/franca_vitl14.yaml), which mim_agg converts."
        )
    dim = kwargs.get("embed_dim", 1024)
    model_args = dict(
        patch_size=14,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        init_values=1e-5,
        mlp_ratio=swiglu_ratio(dim),
        mlp_layer=SwiGLUPacked,
        act_layer=nn.SiLU,
    )
    return build_model_with_cfg(
        VisionTransformer,
        "vit_large_patch14_franca",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **{**model_args, **kwargs},
    )
