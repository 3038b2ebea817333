"""The sights demo's processes: the API it starts (:class:`Api`), and the city's training followed in
PostgreSQL while the trainer worker and the refresher run (:func:`follow_training`)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from services.jobs.crew import ROOT, Crew

if TYPE_CHECKING:
    from services.sight_catalog.demo import DemoSettings

API_COMMAND: tuple[str, ...] = ("-m", "services.cli", "sights", "serve")
_SERVING = re.compile(r"serving the sight catalog on (http://[\d.]+:\d+)")


class Api:
    """``tessera sights serve`` on 127.0.0.1 (a free port), its log in ``log``; rate limits opened up for
    one demo client."""

    def __init__(self, env: Mapping[str, str], log: Path) -> None:
        self.env, self.log = dict(env), log
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._handle: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.process is not None, "start() first"
        return self.process.pid

    def start(self) -> None:
        """Start the server (port 0: it picks a free one and logs it)."""
        self._handle = self.log.open("wb")
        command = [sys.executable, *API_COMMAND, "--host", "127.0.0.1", "--port", "0", "--providers", "cpu"]
        command += ["--recognition-burst", "100000", "--recognition-rate", "100000"]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until_serving(self, timeout_s: float) -> str:
        """The server's address once ``/health`` answers; RuntimeError (with the log's tail) when it exits
        first or ``timeout_s`` passes."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited with status {self.process.returncode}:\n{self.tail()}")
            if not self.url:
                found = _SERVING.search(self.log.read_text(encoding="utf-8", errors="replace"))
                self.url = found[1] if found else ""
            if self.url:
                try:
                    with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                        if response.status == 200:
                            return self.url
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start within {timeout_s:.0f} s; see {self.log}")
            time.sleep(0.1)

    def tail(self, size: int = 2000) -> str:
        """The end of the server's log."""
        return self.log.read_text(encoding="utf-8", errors="replace")[-size:]

    def exited(self) -> bool:
        """Whether the server has exited."""
        return self.process is not None and self.process.poll() is not None

    def wait(self) -> None:
        """Until the server exits (or Ctrl-C reaches this process)."""
        assert self.process is not None, "start() first"
        while self.process.poll() is None:
            time.sleep(0.5)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def follow_training(  # noqa: PLR0917 (one caller, what it watches)
    database_url: str,
    city_id: int,
    settings: DemoSettings,
    crews: Sequence[Crew],
    api: Api,
    logs: Path,
    console: Any,
) -> Any:
    """The city's first READY model; a bar of the training's steps meanwhile. RuntimeError naming the logs
    when a process dies, the model fails or ``timeout_s`` passes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.cloud.database import connect
    from services.sight_catalog import warehouse

    deadline = time.monotonic() + settings.timeout_s
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with connect(database_url) as conn, Progress(*columns, console=console) as bar:
        task = bar.add_task("waiting for the refresher to send the training job", total=None)
        while True:
            models = warehouse.list_models(conn, city_id)
            if models:
                newest = models[0]
                if newest.status == "READY":
                    bar.update(task, completed=settings.steps, total=settings.steps)
                    return newest
                if newest.status == "FAILED":
                    raise RuntimeError(
                        f"the city's model v{newest.version} FAILED: {newest.reason}; logs in {logs}"
                    )
                row = conn.execute(
                    "SELECT status, step FROM training_jobs WHERE id = %s", (newest.training_job_id,)
                ).fetchone()
                what = "queued on training-jobs" if row is None or row[0] == "QUEUED" else "training"
                if row is not None and row[0] == "SUCCESS":
                    what = "registered; the refresher collects it"
                step = int(row[1] or 0) if row is not None else 0
                bar.update(
                    task, description=f"model v{newest.version}: {what}", total=settings.steps, completed=step
                )
            for crew in crews:
                if crew.all_exited():
                    raise RuntimeError(
                        f"a worker exited before the model was READY:\n{crew.tail(0)}\nlogs in {logs}"
                    )
            if api.exited():
                raise RuntimeError(f"the API exited before the model was READY; see {api.log}")
            if time.monotonic() > deadline:
                state = f"v{models[0].version} {models[0].status}" if models else "no training started"
                raise RuntimeError(
                    f"the city's model was not READY after {settings.timeout_s:.0f} s ({state}); "
                    f"see the worker logs in {logs}"
                )
            time.sleep(0.5)


def model_json(model: Any) -> dict[str, Any]:
    """The READY model as ``result.json`` records it."""
    return {
        "version": model.version,
        "status": model.status,
        "registry_name": model.registry_name,
        "registry_version": model.registry_version,
        "model_uri": model.model_uri,
        "training_job_id": model.training_job_id,
        "classes": list(model.classes),
        "images": model.images,
        "metrics": model.metrics,
    }


def training_seconds(database_url: str, job_id: str) -> float:
    """The trainer's own time on the job: from its start to its end, as it recorded them."""
    from services.cloud.database import connect

    with connect(database_url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM finished_at - started_at) FROM training_jobs WHERE id = %s", (job_id,)
        ).fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0
