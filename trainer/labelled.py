"""Labelled images for adaptation (ACTIS) and for selecting snapshots by AP: found by cellpose's
naming (``<stem>.tif`` next to ``<stem>_masks.tif``) in a folder, or given as ``IMAGE=MASKS``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.readers import (
    expand_inputs,
    image_stem,
    is_image_file,
    read_label_image,
    read_network_images,
)

MASK_SUFFIX = "_masks"


def find_pairs(specs: Sequence[str]) -> list[tuple[Path, Path]]:
    """(image, label image) pairs: ``IMAGE=MASKS`` as given; a folder → every image in it with a
    ``<stem>_masks.<ext>`` next to it (the masks files themselves are not images to adapt on)."""
    pairs: list[tuple[Path, Path]] = []
    for spec in specs:
        if "=" in spec:
            image, masks = (Path(p) for p in spec.split("=", 1))
            pairs.append((image, masks))
            continue
        folder = Path(spec)
        if not folder.is_dir():
            raise SaDeployError(f"--labelled {spec}: give a folder of <stem>.tif + <stem>_masks.tif "
                                "pairs, or IMAGE=MASKS")
        found = 0
        for image in expand_inputs([folder]):
            if image_stem(image).endswith(MASK_SUFFIX):
                continue
            masks = [p for p in folder.iterdir() if is_image_file(p)
                     and image_stem(p) == image_stem(image) + MASK_SUFFIX]
            if masks:
                pairs.append((image, masks[0]))
                found += 1
        if not found:
            raise SaDeployError(f"{folder}: no <stem>.tif with a <stem>_masks.tif next to it")
    return pairs


def read_pairs(pairs: Sequence[tuple[Path, Path]], nchan: int, pad: bool, channels, channel_axis,
               series) -> list[tuple[np.ndarray, np.ndarray]]:
    """(C×Y×X image with the network's channels, Y×X labels) per pair; a pair whose sizes differ
    is an error naming both files."""
    out = []
    for image_path, masks_path in pairs:
        images = read_network_images([image_path], nchan, pad, channels, channel_axis, series)
        if len(images) != 1:
            raise SaDeployError(f"{image_path} holds {len(images)} images; a labelled image is one "
                                "2-D image (pass --series to pick one)")
        labels = read_label_image(masks_path)
        if labels.shape != images[0].shape[1:]:
            raise SaDeployError(f"{masks_path}: labels are {labels.shape[0]}×{labels.shape[1]} but "
                                f"{image_path} is {images[0].shape[1]}×{images[0].shape[2]}")
        out.append((images[0], labels))
    return out


def labels_at_scale(labels: np.ndarray, rescale: float) -> np.ndarray:
    """Labels resized like ``prepare_image`` resizes the image (nearest: labels stay labels)."""
    if rescale == 1.0:
        return labels
    ly, lx = labels.shape
    size = (max(1, int(lx * rescale)), max(1, int(ly * rescale)))
    return cv2.resize(labels.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
