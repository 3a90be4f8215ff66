"""The one place mim_agg reads a torchvision dataset's private attributes, where torchvision
offers no public way; ``tests/test_transfer_datasets.py`` fails loudly on an upgrade that
renames them (``test_the_torchvision_private_reach_in_still_holds``).

``OxfordIIITPet`` takes no ``loader`` (torchvision 0.29), so its items decode every image:
reading its file list through ``__getitem__`` would decode 7,349 images on every run.
"""

from __future__ import annotations

from torchvision.datasets import OxfordIIITPet


def pet_files(dataset: OxfordIIITPet) -> list[tuple[str, int]]:
    """``(file, breed)`` of every image of ``dataset``, as its ``__getitem__`` pairs them."""
    return [(str(p), int(label)) for p, label in zip(dataset._images, dataset._labels, strict=True)]
