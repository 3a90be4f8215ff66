"""AbMILP: attention-based multiple-instance pooling (Ilse et al., 2018), the paper's method."""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn

from mim_agg.aggregators.base import Aggregator, pool, register, square_side
from mim_agg.backbones.tokens import Tokens
from mim_agg.errors import ConfigError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
TOKEN_SETS = ("patch", "all")
SELF_ATTN_MODES = ("none", "map", "both")


@register("abmilp")
class AbMILP(Aggregator):
    """A learned scorer picks which tokens to pool: ``sum_i softmax(s)_i z_i``.

    Options (defaults are the paper's recipe):
        depth: scorer layers; 1 is a single ``Linear(D, 1)``.
        hidden_dim: width of deeper scorers (None: D).
        activation: ``tanh`` or ``relu`` between scorer layers.
        tokens: pool over ``patch`` tokens only, or ``all`` tokens (``[cls]`` and registers too).
        pos_cond: add a fixed 2-D sin-cos position embedding to the scorer's input (never trained).
        self_attn: a one-head self-attention layer feeding the scorer (``map``) or the scorer
            and the pooled values (``both``).
    """

    def __init__(
        self,
        layout,
        *,
        depth: int = 1,
        hidden_dim: int | None = None,
        activation: str = "tanh",
        tokens: str = "patch",
        pos_cond: bool = False,
        self_attn: str = "none",
    ):
        super().__init__(layout)
        dim = layout.dim
        _check_choice("activation", activation, ACTIVATIONS)
        _check_choice("tokens", tokens, TOKEN_SETS)
        _check_choice("self_attn", self_attn, SELF_ATTN_MODES)
        if depth < 1:
            raise ConfigError(f"aggregator.depth={depth} must be at least 1.")
        self.tokens = tokens
        self.self_attn_mode = self_attn
        self.scorer = _scorer(dim, depth, hidden_dim or dim, ACTIVATIONS[activation])
        self.self_attn = (
            nn.MultiheadAttention(dim, num_heads=1, batch_first=True)
            if self_attn != "none"
            else None
        )
        if pos_cond:
            side = square_side(layout, self.name)
            pos_embed = build_sincos2d_pos_embed([side, side], dim)
            self.register_buffer("pos_embed", pos_embed, persistent=False)
        else:
            self.pos_embed = None

    def forward(self, tokens):
        weights, values = self._weights_and_values(tokens)
        return pool(weights, values)

    def pooling_weights(self, tokens):
        """Softmax weights of the patch tokens (with ``tokens=all``, prefix weights left out)."""
        return self._weights_and_values(tokens)[0][:, -self.num_patches :]

    def _weights_and_values(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        values = tokens.patches if self.tokens == "patch" else tokens.all
        scorer_input = values
        if self.pos_embed is not None:
            offset = values.shape[1] - self.num_patches
            scorer_input = scorer_input + nn.functional.pad(self.pos_embed, (0, 0, offset, 0))
        if self.self_attn is not None:
            scorer_input = self.self_attn(scorer_input, scorer_input, scorer_input)[0]
            if self.self_attn_mode == "both":
                values = scorer_input
        scores = self.scorer(scorer_input).squeeze(-1)
        return scores.softmax(dim=-1), values


def _scorer(dim: int, depth: int, hidden: int, activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = dim
    for _ in range(depth - 1):
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"aggregator.{key}={value!r} is not one of {sorted(choices)}.")
