"""Telescope frames (FITS, or PNG) as float32 arrays, with the robust scaling the classifier expects.

Scaling (``robust_scale``): the frame's 0.5th and 99.5th percentiles (NaNs ignored) map to 0 and 1 and
values outside are clipped; NaNs become 0; a flat frame becomes all zeros. Percentiles rather than min/max
so a few hot pixels or saturated stars do not squash the sky background to one grey level. Scaling happens
at the frame's own resolution, before resizing (bilinear, antialiased) to the network's input size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch spelling)
from astropy.io import fits

from services.errors import UserError
from services.trainer.data.images import open_picture

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
FRAME_SUFFIXES = (*FITS_SUFFIXES, ".png")
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
#: How the exported classifier's input is made, for its ONNX metadata.
SCALING = (
    f"percentiles {LOW_PERCENTILE}-{HIGH_PERCENTILE} of the frame -> [0, 1], clipped, NaN -> 0; "
    "then bilinear (antialiased) resize to the input size"
)


def read_fits_frame(path: Path) -> np.ndarray:
    """The first image HDU of ``path`` holding data, as a 2-D float32 array (size-1 axes dropped)."""
    try:
        with fits.open(path, memmap=False) as hdus:
            images = [np.asarray(h.data, dtype=np.float32) for h in hdus if h.is_image and h.data is not None]
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"cannot read FITS file {path}: {error}") from error
    if not images:
        raise UserError(f"FITS file {path} has no image HDU with data")
    data = np.squeeze(images[0])
    if data.ndim != 2:
        raise UserError(f"FITS file {path} holds a {data.ndim}-D image; expected a 2-D frame")
    return data


def read_frame(path: Path) -> np.ndarray:
    """A FITS frame or a PNG (averaged over colour channels) as a 2-D float32 array."""
    if path.name.lower().endswith(FITS_SUFFIXES):
        return read_fits_frame(path)
    array = np.asarray(open_picture(path), dtype=np.float32)
    return array[..., :3].mean(axis=-1) if array.ndim == 3 else array


def robust_scale(frame: np.ndarray) -> np.ndarray:
    """``frame`` mapped to [0, 1] by its 0.5th-99.5th percentiles (see the module docstring)."""
    finite = frame[np.isfinite(frame)]
    if finite.size == 0:
        return np.zeros(frame.shape, np.float32)
    low, high = np.percentile(finite, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:
        return np.zeros(frame.shape, np.float32)
    scaled = np.clip((frame - low) / (high - low), 0.0, 1.0)
    return np.nan_to_num(scaled, nan=0.0).astype(np.float32)


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """A 2-D float32 frame resized to [size, size] (bilinear, antialiased when shrinking)."""
    tensor = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0, 0].numpy()


def prepared_frame(path: Path, size: int) -> np.ndarray:
    """``path`` read, robustly scaled and resized: float32 [1, size, size], the classifier's input."""
    return resize_frame(robust_scale(read_frame(path)), size)[None]
