"""Which tokens a learned pooler reads: its ``tokens`` option.

``patch``: the patch tokens (the default of every pooler). ``all``: ``[cls]`` followed by the
patch tokens, as efficient-probing's ``_all`` variants read them (``--cls_features
<pooling>_all``). Register and storage tokens are never read as patches nor as ``[cls]``: they
carry no image position and no pre-training objective, so ``all`` leaves them out.
"""

from __future__ import annotations

import torch

from mim_agg.backbones.tokens import TokenLayout, Tokens
from mim_agg.errors import ConfigError

TOKEN_SETS = ("patch", "all")


def check_token_set(layout: TokenLayout, tokens: str, name: str, grid: bool = False) -> None:
    """Refuse, at build time and by key, a token set this pooler or backbone cannot read:
    ``all`` needs a ``[cls]`` token, and a pooler over the 2-D patch grid (``grid``) has no
    place for a token without a position."""
    if tokens not in TOKEN_SETS:
        raise ConfigError(f"aggregator.tokens={tokens!r} is not one of {list(TOKEN_SETS)}.")
    if tokens == "all" and grid:
        raise ConfigError(
            f"aggregator={name!r} pools the 2-D patch grid, which has no place for [cls]; "
            "it reads aggregator.tokens=patch only."
        )
    if tokens == "all" and not layout.has_cls:
        raise ConfigError(
            f"aggregator.tokens=all reads [cls] beside the patches, but this backbone has no "
            f"[cls] token; use aggregator.tokens=patch with aggregator={name!r}."
        )


def token_set(tokens: Tokens, which: str) -> torch.Tensor:
    """``[B, N, D]`` patch tokens (``patch``) or ``[B, 1 + N, D]`` ``[cls]`` then patches
    (``all``)."""
    if which == "patch":
        return tokens.patches
    return torch.cat([tokens.cls.unsqueeze(1), tokens.patches], dim=1)
