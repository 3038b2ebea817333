"""Frames classified in batches, from wherever :mod:`services.fits_classifier.sources` found them.

:func:`classify_sources` reads up to ``batch_size`` frames, judges them together (one model call) and hands
each verdict to ``on_verdict`` as soon as its batch is done. A frame too large to load is streamed for its
checksum and judged unreadable without being loaded; a local file that vanished or cannot be read is
unreadable with the reason (the file gone, permission denied, the operating system's error). The model is
never called on a frame that failed to read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.sources import FrameSource, batched, oversized_reason, streamed_checksum
from services.fits_classifier.verdicts import Verdict, judge, unreadable

DEFAULT_BATCH = 8


def classify_sources(
    classifier: FrameClassifier,
    sources: Sequence[FrameSource],
    *,
    batch_size: int = DEFAULT_BATCH,
    hdu: int | str | None = None,
    on_verdict: Callable[[Verdict, bytes], None] | None = None,
) -> list[Verdict]:
    """A verdict per source, in order; ``on_verdict(verdict, raw)`` after each batch (``raw`` is ``b""`` for
    a frame that was not loaded)."""
    verdicts: list[Verdict] = []
    for group in batched(sources, max(1, batch_size)):
        loaded: list[tuple[str, bytes]] = []
        early: dict[str, Verdict] = {}
        for source in group:
            started = time.perf_counter()
            reason = oversized_reason(source)
            if reason is not None:
                early[source.name] = unreadable(
                    classifier,
                    source.name,
                    b"",
                    reason,
                    started=started,
                    digest=streamed_checksum(source),
                    size=source.size,
                )
                continue
            try:
                loaded.append((source.name, source.load()))
            except OSError as error:
                early[source.name] = unreadable(
                    classifier, source.name, b"", _load_failure(error), started=started
                )
        judged = {
            v.source: (v, raw) for v, (_, raw) in zip(judge(classifier, loaded, hdu=hdu), loaded, strict=True)
        }
        for source in group:
            verdict, raw = judged.get(source.name) or (early[source.name], b"")
            verdicts.append(verdict)
            if on_verdict is not None:
                on_verdict(verdict, raw)
    return verdicts


def _load_failure(error: OSError) -> str:
    """Why a listed frame could not be loaded, and what to do about it."""
    if isinstance(error, FileNotFoundError):
        return (
            "the file is gone: it was listed but deleted or moved before its turn came; classify it again "
            "where it is now"
        )
    if isinstance(error, PermissionError):
        return "the file cannot be read: permission denied; let this user read it, then classify it again"
    return (
        f"the file cannot be read: {error.strerror or error}; check the disk or share, then classify it again"
    )
