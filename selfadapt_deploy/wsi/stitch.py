"""Stitching block labels into one label image: every pixel takes the label its own block gave
it (the block whose core holds it), and labels that are one cell across a block border are
merged.

Each block is segmented with a halo of context, so a cell crossing a border is whole in both
neighbours' segmentations. Along the border, both segmentations are known on a strip reaching
``strip`` pixels into either core; an object of one block and an object of the other that overlap
there with IoU ≥ ``MIN_IOU`` are the same cell. Union-find over (block, label) ids joins them
(cells over a corner join through the row and column borders), and the final labels are numbered
1..N in block order.
"""

from __future__ import annotations

import numpy as np

MIN_IOU = 0.5


class UnionFind:
    """Disjoint sets over ids 0..n−1 (path halving, union by smaller root: deterministic)."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def matching_labels(a: np.ndarray, b: np.ndarray, min_iou: float = MIN_IOU) -> list[tuple[int, int]]:
    """(label in ``a``, label in ``b``) pairs that are one object: two segmentations of the same
    strip of pixels, objects overlapping with IoU ≥ ``min_iou`` inside it."""
    both = (a > 0) & (b > 0)
    if not both.any():
        return []
    pairs, overlap = np.unique(np.stack([a[both], b[both]]).astype(np.int64), axis=1,
                               return_counts=True)
    labels_a, size_a = np.unique(a[a > 0], return_counts=True)
    labels_b, size_b = np.unique(b[b > 0], return_counts=True)
    sa = size_a[np.searchsorted(labels_a, pairs[0])]
    sb = size_b[np.searchsorted(labels_b, pairs[1])]
    keep = overlap / (sa + sb - overlap) >= min_iou
    return [(int(x), int(y)) for x, y in pairs[:, keep].T]


def cut_labels(region: np.ndarray, core: tuple[slice, slice], open_edges: tuple[bool, bool, bool, bool]
               ) -> np.ndarray:
    """Labels with pixels in the core that reach an edge of the region where the slide goes on
    (``open_edges``: top, bottom, left, right) — cells the halo was too small to hold whole."""
    edges = []
    for is_open, edge in zip(open_edges, (region[0], region[-1], region[:, 0], region[:, -1]), strict=True):
        if is_open:
            edges.append(edge)
    if not edges:
        return np.zeros(0, region.dtype)
    on_edge = np.unique(np.concatenate(edges))
    return np.intersect1d(on_edge[on_edge > 0], np.unique(region[core]))


def final_numbering(offsets: np.ndarray, core_labels: list[np.ndarray], uf: UnionFind) -> list[np.ndarray]:
    """Per block, a lookup local label → final label (0 for labels without core pixels): the
    merged objects numbered 1..N in block order, then label order."""
    new_id = np.zeros(len(uf.parent), np.int64)
    next_id = 1
    mappings = []
    for k, labels in enumerate(core_labels):
        n = int(offsets[k + 1] - offsets[k])
        mapping = np.zeros(n + 1, np.uint32)
        for local in labels.tolist():
            root = uf.find(int(offsets[k]) + local)
            if new_id[root] == 0:
                new_id[root] = next_id
                next_id += 1
            mapping[local] = new_id[root]
        mappings.append(mapping)
    return mappings
