"""Gated attention MIL pooling (Ilse et al., 2018, eq. 9)."""

from __future__ import annotations

from torch import nn

from mim_agg.aggregators.base import WeightedPatchPool, register


@register("abmilp_gated")
class GatedAbMILP(WeightedPatchPool):
    """``a = softmax(w^T (tanh(V z) * sigmoid(U z)))`` over patch tokens; pooled ``sum a_i z_i``.

    The sigmoid gate lets the scorer express non-linear token relevance that ``tanh`` alone
    saturates on.

    Options:
        hidden_dim: width of the two branches ``V`` and ``U``.
    """

    def __init__(self, layout, *, hidden_dim: int = 128):
        super().__init__(layout)
        dim = layout.dim
        self.tanh_branch = nn.Linear(dim, hidden_dim)
        self.sigmoid_branch = nn.Linear(dim, hidden_dim)
        self.scorer = nn.Linear(hidden_dim, 1)

    def pooling_weights(self, tokens):
        patches = tokens.patches
        gated = self.tanh_branch(patches).tanh() * self.sigmoid_branch(patches).sigmoid()
        return self.scorer(gated).squeeze(-1).softmax(dim=-1)
