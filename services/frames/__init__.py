"""Telescope frames: reading FITS, the one preprocessing shared by training and serving, generated frames.

- :mod:`services.frames.reading`: :func:`read_frame` -> :class:`Frame` (float32 2-D, header, HDU), or a
  UserError saying what is wrong with the file;
- :mod:`services.frames.preprocess`: :func:`prepare` (NaN fill, boxcar median binning, stretch, crop/pad)
  and :class:`PreprocessSpec`, the parameters a model records in its ONNX metadata;
- :mod:`services.frames.synthetic`: realistic generated frames (stars, seeing, sky, noise, cosmic rays) that
  are good or show a mirror wobble or a shutter fault, written as FITS like a CCD would.
"""

from services.frames.preprocess import (
    STRETCHES,
    VERSION,
    PreprocessSpec,
    auto_bin_factor,
    bin_median,
    fill_missing,
    fit_square,
    prepare,
    stretch_frame,
    zscale_limits,
)
from services.frames.reading import Frame, read_frame
from services.frames.synthetic import (
    CLASSES,
    FULL_SHAPE,
    Conditions,
    SyntheticFrame,
    generate_frame,
    make_dataset,
    write_fits,
)

__all__ = [
    "CLASSES",
    "FULL_SHAPE",
    "STRETCHES",
    "VERSION",
    "Conditions",
    "Frame",
    "PreprocessSpec",
    "SyntheticFrame",
    "auto_bin_factor",
    "bin_median",
    "fill_missing",
    "fit_square",
    "generate_frame",
    "make_dataset",
    "prepare",
    "read_frame",
    "stretch_frame",
    "write_fits",
    "zscale_limits",
]
