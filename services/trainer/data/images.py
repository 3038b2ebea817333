"""Image folders: find the pictures, decode them at training size as uint8 arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.errors import UserError

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_files(folder: Path, suffixes: Sequence[str], what: str) -> list[Path]:
    """Files under ``folder`` (recursively) whose names end in one of ``suffixes``, sorted.

    A missing folder, or one holding no such file, raises UserError saying what ``what`` should hold.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset {folder} does not exist or is not a directory; expected {what}")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(tuple(suffixes)))
    if not found:
        raise UserError(f"dataset {folder} is empty; expected {what} ({', '.join(suffixes)} files)")
    return found


def open_picture(path: Path) -> Image.Image:
    """The picture at ``path``, decoded; an unreadable file raises UserError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"cannot read image {path}: {error}") from error


def read_square_rgb(path: Path, size: int) -> np.ndarray:
    """``path`` as uint8 [3, size, size]: the shorter side resized to ``size``, then centre-cropped."""
    picture = ImageOps.fit(open_picture(path).convert("RGB"), (size, size), Image.Resampling.BILINEAR)
    return np.asarray(picture, dtype=np.uint8).transpose(2, 0, 1)


def read_resized(path: Path, size: int, channels: int) -> np.ndarray:
    """``path`` as uint8 [channels, size, size] (1: grey, 3: RGB), the whole picture squeezed to a square."""
    picture = open_picture(path).convert("L" if channels == 1 else "RGB")
    array = np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_all(paths: Sequence[Path], decode: Callable[[Path], np.ndarray]) -> np.ndarray:
    """``decode`` over ``paths`` on a few threads (decoders release the GIL), stacked in order."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return np.stack(list(pool.map(decode, paths)))
