"""Worker processes for the demos: started together, awaited until serving, stopped in order.

A :class:`Crew` runs ``count`` copies of a worker command (``python -m services.cli worker SERVICE``) in
sessions of their own, so Ctrl-C reaches the demo only, which then stops them: SIGTERM (each finishes the
message in hand), then SIGKILL for whatever is left after a grace period. Each worker's stderr (its log)
goes to ``<log_dir>/<name>.log`` and its stdout (the EMF metrics) to ``<name>.metrics.jsonl``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
#: What a worker logs when it takes its first message (services.jobs.queue_worker.QueueWorker.serve).
SERVING = "serving"


class Crew:
    """Worker processes of one command; a context manager that stops them on the way out."""

    def __init__(
        self,
        command: Sequence[str],
        count: int,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        prefix: str = "worker",
    ) -> None:
        if count < 1:
            raise ValueError(f"a crew needs at least one worker, got {count}")
        self.command, self.count, self.env, self.log_dir, self.prefix = (
            list(command),
            count,
            dict(env),
            log_dir,
            prefix,
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self._handles: list[IO[bytes]] = []

    def __enter__(self) -> Crew:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the workers, named ``<prefix>-1`` ... (their ``--worker-id``)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            name = f"{self.prefix}-{index + 1}"
            metrics = (self.log_dir / f"{name}.metrics.jsonl").open("wb")
            log = (self.log_dir / f"{name}.log").open("wb")
            self._handles += [metrics, log]
            self.logs.append(self.log_dir / f"{name}.log")
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, *self.command, "--worker-id", name],
                    cwd=ROOT,
                    env=self.env,
                    stdout=metrics,
                    stderr=log,
                    start_new_session=True,
                )
            )

    def wait_until_serving(self, timeout_s: float) -> None:
        """Return when every worker has logged that it is serving; RuntimeError (with the log's tail) when
        one exits first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        waiting = set(range(len(self.processes)))
        while waiting:
            for index in sorted(waiting):
                if SERVING in self.logs[index].read_text(encoding="utf-8", errors="replace"):
                    waiting.discard(index)
                elif self.processes[index].poll() is not None:
                    raise RuntimeError(
                        f"worker {index + 1} exited with status {self.processes[index].returncode}:\n"
                        f"{self.tail(index)}"
                    )
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(
                    f"workers {sorted(w + 1 for w in waiting)} did not start within {timeout_s:.0f} s"
                )
            time.sleep(0.1)

    def tail(self, index: int, size: int = 2000) -> str:
        """The end of worker ``index``'s log."""
        return self.logs[index].read_text(encoding="utf-8", errors="replace")[-size:]

    def all_exited(self) -> bool:
        """Whether every worker has exited."""
        return all(p.poll() is not None for p in self.processes)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (a worker finishes its message), then SIGKILL whatever is left after ``grace_s``."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for handle in self._handles:
            handle.close()
        self._handles.clear()
