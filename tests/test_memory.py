"""The memory an extraction needs (``mim_agg/backbones/memory.py``) against what a real forward
allocates: tiny random models of each family, run by ``FrozenBackbone`` on the CPU under
``torch.profiler``'s memory events, whose running sum's peak is the measurement. CPU autocast
normalises in float32 as CUDA's does; its softmax stays in bfloat16 where CUDA's is float32, so
the explicit attention map is measured without autocast."""

import pytest
import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from mim_agg.backbones import FrozenBackbone, TokenRequest
from mim_agg.backbones.memory import ExtractionMemory, extraction_memory, gigabytes, memory_warning
from mim_agg.errors import ConfigError

BATCH = 8
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
CASES = {  # name: (backbone config, reads attention, autocast)
    "ViT": (dict(arch="vit_small_patch16_224", img_size=64, arch_kwargs=TINY), False, True),
    "ViT, bfloat16 weights": (
        dict(arch="vit_small_patch16_224", img_size=64, arch_kwargs=TINY, dtype="bfloat16"),
        False,
        True,
    ),
    "DINOv3 (RoPE, float32 table; attention outgrows its MLP)": (
        dict(arch="vit_small_patch16_dinov3", img_size=64, arch_kwargs={**TINY, "mlp_ratio": 1}),
        False,
        True,
    ),
    "DINOv3 SwiGLU, bfloat16 weights": (
        dict(arch="vit_small_plus_patch16_dinov3", img_size=64, arch_kwargs=TINY, dtype="bfloat16"),
        False,
        True,
    ),
    "AIMv2 (SwiGLU, no [cls])": (
        dict(arch="aimv2_large_patch14_224", img_size=56, arch_kwargs=TINY),
        False,
        True,
    ),
    "Hiera (four stages)": (
        dict(
            arch="hiera_tiny_224",
            img_size=128,
            arch_kwargs={"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 2, 1)},
        ),
        False,
        True,
    ),
    "ViT, [cls] attention map": (
        dict(arch="vit_small_patch16_224", img_size=128, arch_kwargs={**TINY, "num_heads": 8}),
        True,
        False,
    ),
    "DINOv3, [cls] attention map": (
        dict(arch="vit_small_patch16_dinov3", img_size=128, arch_kwargs={**TINY, "num_heads": 8}),
        True,
        False,
    ),
}


def measured_peak(backbone: FrozenBackbone, images: torch.Tensor, autocast: bool) -> int:
    """The most bytes one ``forward_blocks`` held at once beside ``images``: allocations and
    frees in the order the profiler saw them begin."""
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        backbone.forward_blocks(images)
    held = peak = 0
    for event in sorted(prof.events(), key=lambda event: event.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_count_is_what_a_forward_allocates(case):
    """The estimate's activations (and map) are the measured peak plus the input images, to
    within 2% below (the patch embedding's small tensors it leaves out) and 5% above (a copy
    of the residual that a ViT's MLP, unlike Eva's, does not hold; AIMv2's RMSNorm, which CPU
    autocast keeps in bfloat16). Leaving out RoPE's temporaries, a SwiGLU's fourth hidden
    tensor or the map fails it (0.94, 0.96, 0.54 in the cases that exercise them)."""
    config, reads_attention, autocast = CASES[case]
    torch.manual_seed(0)
    backbone = FrozenBackbone(**config)
    if reads_attention:
        backbone.provide(TokenRequest(tokens=True, cls_attn=True))
    size = config["img_size"]
    images = torch.randn(BATCH, 3, size, size)
    measured = measured_peak(backbone, images, autocast) + images.numel() * images.element_size()
    need = extraction_memory(OmegaConf.create(config), BATCH, reads_attention, autocast)
    assert 0.98 <= (need.activations + need.attention) / measured <= 1.05, (need, measured)
    weights = sum(p.numel() * p.element_size() for p in backbone.parameters())
    assert weights <= need.weights <= weights * 1.01  # and the buffers (RoPE periods, say)


def test_reading_attention_adds_the_map_where_it_outgrows_the_mlp():
    """A fused attention holds no map; an explicit one under autocast adds ``[B, heads, T, T]``
    bfloat16 logits, softmax's float32 copy of them and its float32 output (what an H200
    allocated: scripts/gpu_check.py), but only where the attention's set then outgrows the
    MLP's; Hiera, which exposes no map, is refused as its extraction is."""
    config = OmegaConf.create(CASES["ViT, [cls] attention map"][0])
    plain, reading = (extraction_memory(config, BATCH, reads) for reads in (False, True))
    assert plain.attention == 0 and reading.activations == plain.activations
    tokens, heads = (128 // 16) ** 2 + 1, 8
    logits_softmax_and_its_input = BATCH * heads * tokens**2 * (2 + 4 + 4)
    assert logits_softmax_and_its_input * 0.6 < reading.attention < logits_softmax_and_its_input
    hiera = OmegaConf.create(CASES["Hiera (four stages)"][0])
    with pytest.raises(ConfigError, match="does not expose attention maps"):
        extraction_memory(hiera, BATCH, reads_attention=True)


def test_the_warning_names_a_batch_size_that_fits():
    """4 GB of weights and 8 GB of activations at 256 images: 12 GB fit in 20 GB; in 8 GB the
    4 GB left hold 128 images; in 3 GB not even one."""
    need = ExtractionMemory(
        batch_size=256, parameters=2 * 10**9, weights=4 * 10**9, activations=8 * 10**9, attention=0
    )
    assert memory_warning(need, free=20 * 10**9) is None
    warning = memory_warning(need, free=8 * 10**9)
    assert "cache.batch_size=256 needs about 12.0 GB" in warning
    assert "only 8.0 GB are free: use cache.batch_size=128 or less" in warning
    assert "not even one image fits" in memory_warning(need, free=3 * 10**9)
    with_map = ExtractionMemory(256, 2 * 10**9, 4 * 10**9, 6 * 10**9, 2 * 10**9)
    assert with_map.batch_size_within(8 * 10**9) == 128


def test_an_extraction_on_a_gpu_warns_when_less_is_free(monkeypatch, caplog):
    """``task=extract``'s check on rank 0's GPU (its free memory faked: no CUDA here): the
    estimate is logged; the warning comes with the batch size that fits, and only then."""
    from mim_agg.cache.build import check_gpu_memory
    from tests.helpers import compose_config

    cfg = compose_config(["debug=fast", "cache.batch_size=64"])
    requests = {11: TokenRequest(tokens=True, cls_attn=True)}  # ViT-Ti's last block
    need = extraction_memory(cfg.backbone, 64, reads_attention=True)
    for free, warned in ((need.total, False), (need.total - 1, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, free))
        caplog.clear()
        with caplog.at_level("INFO", logger="mim_agg.cache.build"):
            check_gpu_memory(cfg, requests, "bf16-mixed", torch.device("cuda", 0))
        assert f"cache.batch_size=64 needs about {gigabytes(need.total)}" in caplog.text
        fits = f"use cache.batch_size={need.batch_size_within(free)} or less"
        assert (fits in caplog.text) == warned and need.batch_size_within(free) == 63 + (not warned)
