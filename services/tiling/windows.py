"""Pixel windows, the global tile grid, and the regions that partition an image.

Every tile comes from one *global* grid over the whole image, so a tile is the same whichever region
(or worker) computes it. Along each axis the grid starts at 0 with ``stride = tile - overlap``; the last
tile is shifted back so that it ends exactly at the image edge, so every tile is full size and consecutive
tiles overlap by at least ``overlap`` pixels. Hence any object no larger than the overlap (on that axis)
lies wholly inside at least one tile.

Regions are rectangles of whole strides: a tile belongs to the region that holds its origin, so every tile
belongs to exactly one region, and a region's tiles reach past its right/bottom edge by at most the
overlap — that is how an object lying on a region seam is still seen whole by one tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.errors import UserError


@dataclass(frozen=True)
class Window:
    """A rectangle of pixels: columns ``[col_off, col_end)``, rows ``[row_off, row_end)``."""

    col_off: int
    row_off: int
    width: int
    height: int

    @property
    def col_end(self) -> int:
        """The first column past the window."""
        return self.col_off + self.width

    @property
    def row_end(self) -> int:
        """The first row past the window."""
        return self.row_off + self.height

    def intersection(self, other: Window) -> Window | None:
        """The pixels both windows hold, or None where they share none."""
        col_off = max(self.col_off, other.col_off)
        row_off = max(self.row_off, other.row_off)
        col_end = min(self.col_end, other.col_end)
        row_end = min(self.row_end, other.row_end)
        if col_end <= col_off or row_end <= row_off:
            return None
        return Window(col_off, row_off, col_end - col_off, row_end - row_off)

    def shifted(self, dx: int, dy: int) -> Window:
        """The same window moved by ``dx`` columns and ``dy`` rows."""
        return Window(self.col_off + dx, self.row_off + dy, self.width, self.height)


#: Region side when a grid names none (the request default, services/model_runner/request.py).
DEFAULT_REGION = 8192


def _axis_origins(size: int, tile: int, overlap: int) -> np.ndarray:
    if size <= tile:
        return np.zeros(1, dtype=np.int64)
    stride = tile - overlap
    count = (
        -(-(size - tile) // stride) + 1
    )  # ceil: the last regular origin is the first that reaches the edge
    origins = np.arange(count, dtype=np.int64) * stride
    origins[-1] = size - tile  # shifted back: full size, ending exactly at the edge
    return origins


def _axis_region_starts(size: int, region: int, tile: int, overlap: int) -> np.ndarray:
    stride = tile - overlap
    step = max(1, region // stride) * stride  # whole strides, at least one
    last_origin = int(_axis_origins(size, tile, overlap)[-1])
    # A trailing strip that holds no tile origin is merged into the region before it, so every region
    # has tiles and no tile reaches more than the overlap past its region.
    return np.arange(0, last_origin + 1, step, dtype=np.int64)


def _check_image(image_width: int, image_height: int) -> None:
    if image_width < 1 or image_height < 1:
        raise UserError(f"the image has no pixels ({image_width} x {image_height})")


@dataclass(frozen=True)
class Grid:
    """The global tile grid and its regions: tile size, overlap and region size, in pixels.

    Raises UserError for a non-positive tile or region, or an overlap outside ``[0, tile)``.
    """

    tile_w: int
    tile_h: int
    overlap_x: int = 0
    overlap_y: int = 0
    region_w: int = DEFAULT_REGION
    region_h: int = DEFAULT_REGION

    def __post_init__(self) -> None:
        if self.tile_w < 1 or self.tile_h < 1:
            raise UserError(f"tile size must be positive, got {self.tile_w} x {self.tile_h}")
        if not (0 <= self.overlap_x < self.tile_w and 0 <= self.overlap_y < self.tile_h):
            rule = (
                "must be smaller" if min(self.overlap_x, self.overlap_y) >= 0 else "must be >= 0 and smaller"
            )
            raise UserError(
                f"overlap ({self.overlap_x}, {self.overlap_y}) {rule} than the tile "
                f"({self.tile_w} x {self.tile_h})"
            )
        if self.region_w < 1 or self.region_h < 1:
            raise UserError(f"region size must be positive, got {self.region_w} x {self.region_h}")

    def origins(self, image_width: int, image_height: int) -> tuple[np.ndarray, np.ndarray]:
        """The tile grid over an image: the column origins and the row origins (int64, ascending).

        ``stride = tile - overlap``; the last tile along each axis is shifted back to end at the image edge.
        An axis shorter than the tile gets one tile at 0 (that tile is then the image's size on that axis).
        """
        _check_image(image_width, image_height)
        return (
            _axis_origins(image_width, self.tile_w, self.overlap_x),
            _axis_origins(image_height, self.tile_h, self.overlap_y),
        )

    def regions(self, image_width: int, image_height: int) -> list[Window]:
        """Regions partitioning the image, row by row.

        The region size is rounded down to whole tile strides (at least one stride), so every tile of the
        grid has its origin in exactly one region. A last strip too narrow to hold a tile origin joins the
        region before it, so the last region along an axis may be up to one region plus one tile long.
        """
        _check_image(image_width, image_height)
        xs = _axis_region_starts(image_width, self.region_w, self.tile_w, self.overlap_x)
        ys = _axis_region_starts(image_height, self.region_h, self.tile_h, self.overlap_y)
        x_ends = [*xs[1:].tolist(), image_width]
        y_ends = [*ys[1:].tolist(), image_height]
        return [
            Window(int(x), int(y), int(x_end - x), int(y_end - y))
            for y, y_end in zip(ys.tolist(), y_ends, strict=True)
            for x, x_end in zip(xs.tolist(), x_ends, strict=True)
        ]

    def tiles_of(self, region: Window, image_width: int, image_height: int) -> list[Window]:
        """The grid's tiles whose origin lies in ``region``, in row-major order.

        Tiles are ``min(tile, image)`` in size and may reach past the region's right/bottom edge by up to the
        overlap, so objects on a region seam are seen whole.
        """
        xs, ys = self.origins(image_width, image_height)
        width, height = min(self.tile_w, image_width), min(self.tile_h, image_height)
        cols = xs[(xs >= region.col_off) & (xs < region.col_end)].tolist()
        rows = ys[(ys >= region.row_off) & (ys < region.row_end)].tolist()
        return [Window(int(x), int(y), width, height) for y in rows for x in cols]
