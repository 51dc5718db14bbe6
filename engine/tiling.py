"""How the upscalers cut a side into overlapping tiles (no torch here).

`tile` is the most pixels a tile may have on a side (it bounds the model's memory). Rather than
packing full tiles from the start and squeezing the last one against the edge, which can redo most
of a tile (512 px in 256 px tiles overlapping by 16: starts 0, 240, 256, so 2.25 times the pixels),
the side gets as few tiles as the overlap allows, all of one size, spread evenly: 512 px becomes
three 182 px tiles at 0, 165 and 330, 1.07 times the pixels.
"""
from __future__ import annotations


def tile_span(length: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(start offsets, tile size) covering 0..length: tiles of at most `tile` pixels, neighbours
    sharing at least `overlap` of them. `tile` <= 0 or a side that fits: one tile, the whole side."""
    if tile <= 0 or length <= tile:
        return [0], length
    count = -(-(length - overlap) // (tile - overlap))        # fewest tiles that keep the overlap
    size = min(tile, -(-(length + (count - 1) * overlap) // count))  # the smallest size that covers the side
    return [round(i * (length - size) / (count - 1)) for i in range(count)], size
