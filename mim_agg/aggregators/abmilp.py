"""AbMILP: attention-based multiple-instance pooling (Ilse et al., 2018), the paper's method."""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import nn

from mim_agg.aggregators.base import Aggregator, pool, register, square_side
from mim_agg.aggregators.token_sets import check_token_set, token_set
from mim_agg.backbones.tokens import Tokens
from mim_agg.errors import ConfigError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
SELF_ATTN_MODES = ("none", "map", "both")


@register("abmilp")
class AbMILP(Aggregator):
    """A learned scorer picks which tokens to pool: ``sum_i softmax(s)_i z_i``.

    The "Beyond [cls]" paper's head (Przewięźlikowski et al., ICCV 2025; gmum/beyond_cls,
    ``abmilp.py``), which efficient-probing reuses as its ``abmilp`` (Psomas et al., ICLR 2026;
    billpsomas/efficient-probing, ``poolings/abmilp.py``).

    Defaults are the "Beyond [cls]" recipe (one ``Linear(D, 1)`` scorer over the patches:
    ``D + 1`` parameters). efficient-probing's leaderboard ``abmilp`` (its ``main_linprobe.py``
    defaults ``--abmilp_depth 2 --abmilp_act tanh --abmilp_sa both``) is
    ``depth=2, self_attn=both`` (``activation=tanh`` is already the default), and its
    ``abmilp_all`` adds ``tokens=all``: ``5 D^2 + 3 D + 1`` parameters (2,951,425 at D = 768).

    Options:
        depth: scorer layers; 1 is a single ``Linear(D, 1)``.
        hidden_dim: width of deeper scorers (None: D, as in both papers' code).
        activation: ``tanh`` or ``relu`` between scorer layers.
        tokens: ``patch`` tokens, or ``all``: ``[cls]`` then the patches (registers never).
        pos_cond: add a fixed 2-D sin-cos position embedding (MAE's layout, a zero row for
            ``[cls]``; never trained) to the scorer's input, after the self-attention.
        self_attn: a one-head self-attention layer (``qkv`` without bias, biased output
            projection, as in the authors' code) feeding the scorer (``map``) or the scorer and
            the pooled values (``both``).
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
        check_token_set(layout, tokens, self.name)
        _check_choice("self_attn", self_attn, SELF_ATTN_MODES)
        if depth < 1:
            raise ConfigError(f"aggregator.depth={depth} must be at least 1.")
        self.tokens = tokens
        self.self_attn_mode = self_attn
        self.self_attn = (
            Attention(dim, num_heads=1, qkv_bias=False) if self_attn != "none" else None
        )
        self.scorer = _scorer(dim, depth, hidden_dim or dim, ACTIVATIONS[activation])
        if pos_cond:
            side = square_side(layout, self.name)
            pos_embed = sincos_2d(dim, side, side)
            if tokens == "all":  # [cls] has no position: a zero row, as in the authors' code
                pos_embed = nn.functional.pad(pos_embed, (0, 0, 1, 0))
            self.register_buffer("pos_embed", pos_embed, persistent=False)
        else:
            self.pos_embed = None

    def forward(self, tokens):
        weights, values = self._weights_and_values(tokens)
        return pool(weights, values)

    def pooling_weights(self, tokens):
        """Softmax weights of the patch tokens (with ``tokens=all``, the [cls] weight left out)."""
        return self._weights_and_values(tokens)[0][:, -self.num_patches :]

    def _weights_and_values(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        values = token_set(tokens, self.tokens)
        scorer_input = values
        if self.self_attn is not None:
            scorer_input = self.self_attn(values)
            if self.self_attn_mode == "both":
                values = scorer_input
        if self.pos_embed is not None:
            scorer_input = scorer_input + self.pos_embed.to(scorer_input.dtype)
        scores = self.scorer(scorer_input).squeeze(-1)
        return scores.softmax(dim=-1), values


def sincos_2d(dim: int, rows: int, columns: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding of a row-major grid, ``[rows * columns, dim]``:
    ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` for column ``x`` and row ``y``, with
    ``w_i = 10000^(-i / (dim / 4))`` (MAE's ``get_2d_sincos_pos_embed``, which both papers'
    code uses; timm's ``build_sincos2d_pos_embed`` orders the four blocks differently)."""
    if dim % 4:
        raise ConfigError(f"aggregator.pos_cond needs a token dim divisible by 4; got {dim}.")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(columns, dtype=torch.float64),
        indexing="ij",
    )
    angles = [position.flatten()[:, None] * omega for position in (x, y)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


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
