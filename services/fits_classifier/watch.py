"""``tessera fits watch DIR``: the cron job replaced. New frames in a folder are classified once each.

A frame is judged only when it is complete. A camera (or rsync) writes a file over seconds, so a file is
taken when its size and modification time have not changed for ``settle_s`` seconds. A file that is still
unreadable then, in a way a file being written would be (cut short: fewer bytes than its header
declares), is given ``patience_s`` more seconds to grow before its UNREADABLE verdict is recorded; any
other unreadable file is recorded at once.

What was judged is remembered in the report (JSON lines, one per frame: path, size, modification time and
the verdict), which the watcher reads back when it starts: a restarted watcher judges only what is new or
what changed since (a file rewritten in place is a new frame). Files whose names do not look like FITS
(see :data:`~services.fits_classifier.sources.FITS_SUFFIXES`) and hidden files are ignored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.errors import UserError
from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.output import AnnotatedStore
from services.fits_classifier.sources import is_fits_name, local_source, oversized_reason, streamed_checksum
from services.fits_classifier.verdicts import CLASSIFIED, UNREADABLE, Verdict, judge, unreadable

log = logging.getLogger(__name__)

DEFAULT_SETTLE_S = 2.0
DEFAULT_PATIENCE_S = 60.0
DEFAULT_POLL_S = 1.0
#: What read_frame says of a file cut short (its data ends before its header says it does).
_CUT_SHORT = ("is truncated", "truncated or corrupt gzip", "is empty (0 bytes)", "stream is empty")


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # when this size and time were first seen
    unreadable_since: float | None = None


class Watcher:
    """Watches ``directory`` (recursively) and judges each complete new frame once; see the module."""

    def __init__(
        self,
        directory: Path,
        classifier: FrameClassifier,
        report: Path,
        *,
        settle_s: float = DEFAULT_SETTLE_S,
        patience_s: float = DEFAULT_PATIENCE_S,
        annotated: AnnotatedStore | None = None,
        on_verdict: Callable[[Verdict], None] | None = None,
        database: Any = None,
    ) -> None:
        if not directory.is_dir():
            raise UserError(f"{directory} is not a folder: `tessera fits watch` watches a folder of frames")
        self.directory = directory
        self.classifier = classifier
        self.settle_s, self.patience_s = settle_s, patience_s
        self.annotated = annotated
        self.on_verdict = on_verdict
        self.database = database
        self.pending: dict[Path, _Seen] = {}
        self.done: dict[str, tuple[int, int]] = _read_report(report)
        try:
            report.parent.mkdir(parents=True, exist_ok=True)
            self._report: IO[str] = report.open("a", encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot write the report {report}: {error.strerror or error}") from None

    def close(self) -> None:
        """Close the report."""
        self._report.close()

    def scan(self, now: float | None = None) -> list[Verdict]:
        """Look once: note new and changed files, judge those complete; the verdicts recorded now."""
        now = time.monotonic() if now is None else now
        present: set[Path] = set()
        for path in sorted(self.directory.rglob("*")):
            relative = path.relative_to(self.directory)
            if any(p.startswith(".") for p in relative.parts) or not is_fits_name(path.name):
                continue
            try:
                stat = path.stat()
            except OSError:
                continue  # gone between the listing and the stat
            if not path.is_file() or self.done.get(str(path)) == (stat.st_size, stat.st_mtime_ns):
                continue
            present.add(path)
            seen = self.pending.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self.pending[path] = _Seen(stat.st_size, stat.st_mtime_ns, now)
        for gone in set(self.pending) - present:
            del self.pending[gone]
        verdicts = []
        for path, seen in sorted(self.pending.items()):
            if now - seen.since < self.settle_s:
                continue
            verdict = self._judge(path, seen, now)
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts

    def run(self, stop: threading.Event, poll_s: float = DEFAULT_POLL_S) -> None:
        """:meth:`scan` every ``poll_s`` seconds until ``stop`` is set."""
        while not stop.is_set():
            self.scan()
            stop.wait(poll_s)

    def _judge(self, path: Path, seen: _Seen, now: float) -> Verdict | None:
        source = local_source(path)
        oversized = oversized_reason(source)
        if oversized:
            raw = b""
            digest = streamed_checksum(source)
            verdict = unreadable(
                self.classifier,
                str(path),
                raw,
                oversized,
                started=time.perf_counter(),
                digest=digest,
                size=seen.size,
            )
        else:
            try:
                raw = path.read_bytes()
            except OSError as error:
                log.warning("%s cannot be read yet: %s", path, error.strerror or error)
                return None
            if len(raw) != seen.size:
                seen.size, seen.since = len(raw), now  # still growing
                return None
            [verdict] = judge(self.classifier, [(str(path), raw)])
        if verdict.status == UNREADABLE and _cut_short(verdict.reason):
            if seen.unreadable_since is None:
                seen.unreadable_since = now
            if now - seen.unreadable_since < self.patience_s:
                return None  # perhaps still being written: wait for it
        annotated = (
            self.annotated.put(verdict, raw) if self.annotated and verdict.status == CLASSIFIED else None
        )
        if self.database is not None:
            from services.fits_classifier.records import record

            record(self.database, verdict, annotated=annotated)
        line = {**verdict.as_json(), "size": seen.size, "mtime_ns": seen.mtime_ns, "annotated": annotated}
        self._report.write(json.dumps(line) + "\n")
        self._report.flush()
        self.done[str(path)] = (seen.size, seen.mtime_ns)
        del self.pending[path]
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        return verdict


def _cut_short(reason: str | None) -> bool:
    text = (reason or "").lower()
    return any(marker.lower() in text for marker in _CUT_SHORT)


def _read_report(report: Path) -> dict[str, tuple[int, int]]:
    """The frames an earlier watcher judged: path -> (size, mtime_ns)."""
    done: dict[str, tuple[int, int]] = {}
    if not report.exists():
        return done
    try:
        text = report.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read the report {report}: {error.strerror or error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            done[str(entry["source"])] = (int(entry["size"]), int(entry["mtime_ns"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("%s line %d is not a watcher's verdict; ignored", report, number)
    return done
