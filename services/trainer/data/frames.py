"""Telescope frames on disk (FITS, or PNG) as the classifier's input, through the shared frame library.

FITS files (plain, gzipped or tile-compressed ``.fz``) are read by :func:`services.frames.read_frame` (the
first image HDU with data; BZERO/BSCALE applied; 2-D after dropping size-1 axes); PNGs are averaged over
their colour channels. Either way the frame then goes through :func:`services.frames.prepare` with the
model's :class:`~services.frames.PreprocessSpec`: the very function the classifier service runs, so a
model never sees a frame prepared differently from those it learnt on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.errors import UserError
from services.frames import PreprocessSpec
from services.frames import read_frame as read_fits
from services.trainer.data.images import open_picture

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fz")
FRAME_SUFFIXES = (*FITS_SUFFIXES, ".png")


def read_frame(path: Path) -> np.ndarray:
    """A FITS frame or a PNG (averaged over colour channels) as a 2-D float32 array (NaNs kept)."""
    if path.name.lower().endswith(FITS_SUFFIXES):
        return read_fits(path).data
    array = np.asarray(open_picture(path), dtype=np.float32)
    return array[..., :3].mean(axis=-1) if array.ndim == 3 else array


def prepared_frame(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """``path`` read and prepared by ``spec``: float32 ``[1, size, size]`` in [0, 1], the network input."""
    frame = read_frame(path)
    try:
        return spec.apply(frame)[None]
    except UserError as error:  # reading errors name the file already; preparing ones do not
        raise UserError(f"{path}: {error}") from error
