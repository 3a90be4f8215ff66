"""What the console shows: our own messages, not third-party advertising or internal noise.

Lightning advertises a cloud logger when a trainer starts, warns that our frozen modules are
in eval mode (on purpose: ``FrozenBackbone.train``), passes on a deprecation from its own
use of torch's pytree, and under DDP asks for ``sync_dist`` on every epoch-level value (ours
come from torchmetrics, which already reduce over all processes; the training loss is a
per-process monitor), and on every resume that the checkpoint folder is not empty (it holds
the checkpoint being resumed); none of it is about the user's run.
"""

from __future__ import annotations

import logging
import warnings

ADVERTS = ("💡 Tip:",)
NOISE = (
    r".*module\(s\) in eval mode.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*It is recommended to use `self\.log\(.*sync_dist=True.*",
    r"Checkpoint directory .* exists and is not empty\.",
)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTS)


def quiet_third_party() -> None:
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
