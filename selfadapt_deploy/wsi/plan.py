"""The block grid of a slide: each block's core (the pixels it answers for) and its region (the
core plus a halo of context it is segmented with), and the halo a model needs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from selfadapt_deploy.errors import SaDeployError

TILE = 256  # output tiles (BigTIFF) and zarr chunks; block sizes are multiples of it
MIN_HALO = 32


@dataclass(frozen=True)
class Block:
    """Block ``index`` at grid position (row, col): core [y0, y1) × [x0, x1); region = core ±
    ``halo`` clipped to the slide."""

    index: int
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int
    ry0: int
    ry1: int
    rx0: int
    rx1: int

    @property
    def key(self) -> str:
        return f"{self.row:04d}_{self.col:04d}"

    def to_dict(self) -> dict:
        return asdict(self)


def default_halo(diameter_px: float) -> int:
    """Context around a block: twice the cell diameter in image pixels (a border cell is then
    whole in both neighbours' regions, and so is every pixel's flow path into its cell), at least
    MIN_HALO, rounded up to a multiple of 16."""
    return 16 * math.ceil(max(2 * diameter_px, MIN_HALO) / 16)


def block_grid(height: int, width: int, block_size: int, halo: int) -> list[Block]:
    """Blocks of ``block_size`` (a multiple of TILE) in row-major order, the last row/column
    smaller; regions extend ``halo`` pixels beyond each core inside the slide."""
    if block_size < TILE or block_size % TILE:
        raise SaDeployError(f"--block-size must be a positive multiple of {TILE}, got {block_size}")
    if halo < 0:
        raise SaDeployError(f"--halo must be ≥ 0, got {halo}")
    blocks = []
    for row, y0 in enumerate(range(0, height, block_size)):
        for col, x0 in enumerate(range(0, width, block_size)):
            y1, x1 = min(y0 + block_size, height), min(x0 + block_size, width)
            blocks.append(Block(len(blocks), row, col, y0, y1, x0, x1, max(0, y0 - halo),
                                min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)))
    return blocks
