"""``tessera sights demo``: the sight catalog's loop closed on the embedded default, with honest figures.

1. start moto's server (S3, SQS) and an embedded PostgreSQL with the platform's buckets and queues
   (:class:`~services.cloud.embedded.EmbeddedPlatform`), and request a city;
2. generate a few hundred photos of its sights (:mod:`services.sight_catalog.photos`: distinct landmark
   shapes in varied scenes, some stored turned with an EXIF orientation, some as PNG) into
   ``<out>/photos/<sight>/``, and ingest them (:func:`~services.sight_catalog.ingest.ingest`: checked,
   turned upright, stored once in the datasets bucket); hold a seeded share out of training;
3. label the other photos with the boxes the generator drew, as a person would, recorded as
   ``annotator:generator`` (there is no model yet to label with, and no Rekognition offline);
4. start a trainer worker (``python -m services.cli worker trainer``), the catalog's refresher
   (``python -m services.cli worker sight-catalog``) and the API (``python -m services.cli sights serve``)
   as processes of their own; the refresher sends the city's training job to the training-jobs queue, the
   trainer trains a tiny detector on the CPU and registers it, the refresher marks the city's model READY;
   the demo follows it in PostgreSQL;
5. stop the workers (the CPUs are the API's now), post every held-out photo to
   ``/api/cities/{city}/recognitions`` and score the answers against the generator's boxes (IoU 0.5, same
   sight): precision and recall as counts, recognitions a second, p50 and p99 latency; write
   ``<out>/result.json`` and ``<out>/recognitions.png`` (a few photos, true boxes green, found ones orange);
6. unless told not to (``serve=False``), keep the API and web UI up on loopback until Ctrl-C.

Every process and server is stopped on the way out, Ctrl-C included. Their logs are in ``<out>/logs``.

The processes are :mod:`services.sight_catalog.demo_processes`', the recognitions, the picture and the
summary :mod:`services.sight_catalog.demo_figures`'.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import UserError
from services.jobs.crew import Crew
from services.sight_catalog.demo_figures import draw_sheet, print_summary, recognise_held_out, warm_up_photo
from services.sight_catalog.demo_processes import Api, follow_training, model_json, training_seconds

TRAINER_COMMAND: tuple[str, ...] = ("-m", "services.cli", "worker", "trainer")
REFRESHER_COMMAND: tuple[str, ...] = ("-m", "services.cli", "worker", "sight-catalog")
#: Who labelled the training photos: the generator's own boxes, drawn as a person would draw them.
LABELLER = "annotator:generator"
#: The landmarks in the order a demo city takes them (the first ``sights``).
KINDS: tuple[str, ...] = ("tower", "arch", "wheel", "dome", "pyramid", "bridge")
#: What the landmarks are called in Paris; elsewhere they are called by their shape.
PARIS_SIGHTS: Mapping[str, str] = {
    "tower": "Eiffel Tower",
    "arch": "Arc de Triomphe",
    "wheel": "Grande Roue",
    "dome": "Sacré-Cœur",
    "pyramid": "Louvre Pyramid",
    "bridge": "Pont Alexandre III",
}
#: Photos per sight at least (a fifth are held out; each sight needs two labelled photos to be a class).
MIN_PHOTOS_PER_SIGHT = 5
#: Every how many photos one is stored turned (EXIF orientation 6 or 8), and one as PNG.
EXIF_EVERY, PNG_EVERY = 7, 5
#: Marks a directory this demo made, so a rerun may empty it (and never a directory it did not make).
MARKER = ".tessera-sights-demo"
#: The variables a demo's processes must not inherit: they would point them at paid or other resources.
INHERITED_OUT = ("TESSERA_CATALOG_", "TESSERA_REKOGNITION_", "TESSERA_TRAINER_", "TESSERA_DATA_DIR")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo generates, trains and serves."""

    out_dir: Path = Path("out/sights-demo")
    city: str = "Paris"
    photos: int = 240
    sights: int = 4
    #: Optimiser steps of the city's training (the catalog's ``small`` detector: crops of 128 px, width 16).
    steps: int = 400
    seed: int = 12
    #: Photo width and height in pixels. 256 wide: the ``small`` detector's tile, so the API's detector
    #: sees a photo at the scale it trained on (a narrower photo is scaled up to the tile's width).
    size: tuple[int, int] = (256, 160)
    #: The share of the photos held out of training, to recognise through the API.
    held_out: float = 0.2
    timeout_s: float = 600.0
    #: Keep the API and the web UI up after the figures, until Ctrl-C.
    serve: bool = True
    #: The catalog's training size (``services/sight_catalog/training.py`` SIZES).
    train_size: str = "small"
    #: Seconds between two refresher passes.
    refresh_s: float = 1.0


@dataclass
class DemoResult:
    """What the demo found (printed by :func:`print_summary`, written to ``result.json``)."""

    city: str
    slug: str
    sights: dict[str, str]
    photos: int
    ingested: int
    rejected: list[dict[str, Any]]
    training_photos: int
    held_out_photos: int
    labelled: int
    labeller: str
    model: dict[str, Any] = field(default_factory=dict)
    #: Seconds from the workers serving to the model READY, and the trainer's own (job started to finished).
    seconds_to_ready: float = 0.0
    training_seconds: float = 0.0
    recognitions: int = 0
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    precision: float = 0.0
    recall: float = 0.0
    recognitions_per_second: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    warm_up_ms: float = 0.0
    api: str = ""
    per_photo: list[dict[str, Any]] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Generated:
    """A photo written for ingest: its file, the seed and main landmark it was drawn from, its true boxes
    (sight name, upright pixels) and the media type posted to the API."""

    path: Path
    seed: int
    main: str
    truth: tuple[tuple[str, tuple[int, int, int, int]], ...]
    media_type: str
    orientation: int | None


# --- running ----------------------------------------------------------------------------------------------


def run_demo(settings: DemoSettings, *, platform: Any = None) -> int:
    """Run the demo and print its figures; with ``serve``, keep the API up until Ctrl-C. The exit status
    (``platform``: see :func:`demo`)."""
    from rich.console import Console

    console = Console()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does: everything
    try:
        demo(
            settings,
            console=console,
            platform=platform,
            on_figures=lambda result: print_summary(result, console),
        )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; workers, the API and the servers are stopped[/]")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def demo(
    settings: DemoSettings, *, console: Any = None, platform: Any = None, on_figures: Any = None
) -> DemoResult:
    """Everything :func:`run_demo` does; ``on_figures(result)`` is called once the figures are written
    (before serving, when ``settings.serve``). Returns when every process it started is stopped.

    ``platform``: an :class:`~services.cloud.embedded.EmbeddedPlatform` already started, used and left
    running (its caller reads and stops it); by default the demo starts one and stops it on the way out.
    """
    from rich.console import Console

    from services.cloud.database import apply_migrations, connect
    from services.cloud.embedded import EmbeddedPlatform
    from services.sight_catalog import warehouse

    console = console or Console()
    started = time.monotonic()
    kinds = check(settings)
    out_dir = settings.out_dir
    _fresh(out_dir)
    logs = out_dir / "logs"
    logs.mkdir()
    owned = platform is None
    platform = platform if platform is not None else EmbeddedPlatform()
    crews: list[Crew] = []
    api: Api | None = None
    try:
        with console.status("starting moto (S3, SQS) and PostgreSQL"):
            if owned:
                platform.start()
            with connect(platform.database_url) as conn:
                apply_migrations(conn)
        console.print(
            f"embedded platform: moto at {platform.endpoint_url}, PostgreSQL in {platform.directory}"
        )
        names = sight_names(settings.city, kinds)
        generated = _generate(settings, kinds, names, out_dir / "photos", console)
        with connect(platform.database_url) as conn:
            city, _ = warehouse.request_city(conn, settings.city, requested_by="demo")
            result = _ingest_and_label(
                conn,
                city,
                settings,
                generated,
                names,
                platform.bucket("datasets"),
                platform.client("s3"),
                console,
            )
        env = demo_environment(platform.env, settings, out_dir)
        api = Api(env, logs / "api.log")
        api.start()
        trainer = Crew(TRAINER_COMMAND, 1, {**env, "TESSERA_SERVICE": "trainer"}, logs, prefix="trainer")
        refresher = Crew(
            REFRESHER_COMMAND, 1, {**env, "TESSERA_SERVICE": "sight-catalog"}, logs, prefix="refresher"
        )
        for crew in (trainer, refresher):
            crews.append(crew)
            crew.start()
        with console.status("starting the trainer, the refresher and the API"):
            for crew in crews:
                crew.wait_until_serving(settings.timeout_s)
            result.api = api.wait_until_serving(settings.timeout_s)
        result.pids = {"trainer": trainer.processes[0].pid, "refresher": refresher.processes[0].pid}
        result.pids["api"] = api.pid
        console.print(
            f"a trainer worker, the catalog's refresher (a pass every {settings.refresh_s:g} s) and the API "
            f"({result.api}/) are running; logs in {logs}"
        )
        serving = time.monotonic()
        model = follow_training(platform.database_url, city.id, settings, crews, api, logs, console)
        result.seconds_to_ready = time.monotonic() - serving
        result.model = model_json(model)
        result.training_seconds = training_seconds(platform.database_url, model.training_job_id)
        console.print(
            f"{city.name}'s model v{model.version} is READY, registered as "
            f"{model.registry_name}:{model.registry_version} ({model.model_uri}); trained in "
            f"{result.training_seconds:.1f} s, {result.seconds_to_ready:.1f} s after the workers started"
        )
        for crew in crews:
            crew.stop()
        console.print("workers stopped: the CPUs are the API's now")
        held = [g for g in generated if str(g.path.resolve()) in _held_sources(result)]
        recognise_held_out(result, api.url, city.slug, held, warm_up_photo(generated, held), console)
        draw_sheet(result, held, out_dir / "recognitions.png")
        result.files.update(
            {
                "recognitions": str(out_dir / "recognitions.png"),
                "result": str(out_dir / "result.json"),
                "photos": str(out_dir / "photos"),
                "logs": str(logs),
                "api_log": str(api.log),
            }
        )
        result.seconds = time.monotonic() - started
        (out_dir / "result.json").write_text(json.dumps(asdict(result), indent=2, ensure_ascii=False) + "\n")
        if on_figures is not None:
            on_figures(result)
        if settings.serve:
            console.print(
                f"[bold]the sight catalog's web UI: {api.url}/[/] (API at {api.url}/api, docs at "
                f"{api.url}/docs); Ctrl-C stops it"
            )
            api.wait()
            console.print(f"[yellow]the API exited by itself; see {api.log}[/]")
        return result
    finally:
        for crew in crews:
            crew.stop()
        if api is not None:
            api.stop()
        if owned:
            platform.stop()


def check(settings: DemoSettings) -> list[str]:
    """Refuse, before anything starts, what cannot work; the landmark kinds of the city's sights."""
    from services.sight_catalog.photos import LANDMARKS
    from services.sight_catalog.training import SIZES
    from services.sight_catalog.warehouse import clean_name

    clean_name(settings.city)
    if not 1 <= settings.sights <= len(KINDS):
        raise UserError(
            f"--sights must be 1 to {len(KINDS)} (the landmarks photos show), got {settings.sights}"
        )
    least = MIN_PHOTOS_PER_SIGHT * settings.sights
    if settings.photos < least:
        raise UserError(
            f"--photos must be at least {least} for {settings.sights} sights ({MIN_PHOTOS_PER_SIGHT} a "
            f"sight: a share is held out, and a sight needs two labelled photos), got {settings.photos}"
        )
    if settings.steps < 1:
        raise UserError(f"--steps must be at least 1, got {settings.steps}")
    if not settings.timeout_s > 0:
        raise UserError(f"--timeout must be over 0 seconds, got {settings.timeout_s}")
    if settings.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {settings.seed}")
    if not 0.0 < settings.held_out < 1.0:
        raise UserError(f"the held-out share must be between 0 and 1, got {settings.held_out}")
    if settings.train_size not in SIZES:
        raise UserError(f"the training size is one of {', '.join(SIZES)}, not {settings.train_size!r}")
    width, height = settings.size
    if min(width, height) < 64:
        raise UserError(f"photos are at least 64 x 64 pixels, not {width} x {height}")
    kinds = list(KINDS[: settings.sights])
    assert set(kinds) <= set(LANDMARKS)
    return kinds


def sight_names(city: str, kinds: Sequence[str]) -> dict[str, str]:
    """The sight each landmark stands for in ``city`` (Paris's names in Paris, the shapes' elsewhere)."""
    if city.strip().casefold() == "paris":
        return {kind: PARIS_SIGHTS[kind] for kind in kinds}
    return {kind: kind.title() for kind in kinds}


def demo_environment(
    platform_env: Mapping[str, str], settings: DemoSettings, out_dir: Path
) -> dict[str, str]:
    """The environment of the demo's processes: this one's, less what would send them elsewhere (a
    Rekognition model, the catalog's and trainer's own settings), plus the platform's and the demo's."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_OUT)}
    for name in ("TESSERA_CATALOG_TOKEN", "TESSERA_CATALOG_TOKEN_FILE", "TESSERA_CATALOG_TOKEN_SECRET_ARN"):
        inherited.pop(name, None)
    return {
        **inherited,
        **platform_env,
        "PYTHONUNBUFFERED": "1",
        "TESSERA_CATALOG_REFRESH_S": f"{settings.refresh_s:g}",
        "TESSERA_CATALOG_TRAIN_SIZE": settings.train_size,
        "TESSERA_CATALOG_TRAIN_STEPS": str(settings.steps),
        "TESSERA_TRAINER_STATE": str((out_dir / "logs" / "trainer-state.json").resolve()),
        "TESSERA_TRAINER_CACHE": str((out_dir / "trainer-cache").resolve()),
    }


def _fresh(out_dir: Path) -> None:
    """``out_dir``, emptied if an earlier demo made it; UserError when it holds files it did not make."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"{out_dir} is a file; give another --out-dir")
        if any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
            raise UserError(f"{out_dir} holds files the sights demo did not make; give another --out-dir")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / MARKER).write_text("made by tessera sights demo; replaced when it runs again\n")


# --- photos, ingest, labels -------------------------------------------------------------------------------


def _generate(
    settings: DemoSettings, kinds: Sequence[str], names: Mapping[str, str], folder: Path, console: Any
) -> list[Generated]:
    """Draw the photos and write them in a folder per sight (the main landmark's): JPEG mostly, every
    :data:`PNG_EVERY` th as PNG, every :data:`EXIF_EVERY` th as a JPEG stored turned with the EXIF
    orientation that turns it upright (ingest and the API apply it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.sight_catalog.photos import draw_photo, exif_oriented_jpeg

    columns = (TextColumn("[bold]drawing photos"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    generated: list[Generated] = []
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("photos", total=settings.photos)
        for index in range(settings.photos):
            seed = settings.seed * 100_000 + index
            main = kinds[index % len(kinds)]
            photo = draw_photo(seed, kinds=kinds, main=main, size=settings.size)
            orientation: int | None = None
            if index % EXIF_EVERY == EXIF_EVERY - 1:
                orientation = 6 if index % 2 else 8
                data, suffix, media_type = exif_oriented_jpeg(photo.image, orientation), "jpg", "image/jpeg"
            elif index % PNG_EVERY == PNG_EVERY - 1:
                data, suffix, media_type = photo.png(), "png", "image/png"
            else:
                data, suffix, media_type = photo.jpeg(), "jpg", "image/jpeg"
            path = folder / names[main] / f"{index:05d}-{seed}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            truth = tuple((names[m.kind], m.box) for m in photo.landmarks)
            generated.append(Generated(path, seed, main, truth, media_type, orientation))
            bar.advance(task)
    turned = sum(g.orientation is not None for g in generated)
    boxes = sum(len(g.truth) for g in generated)
    console.print(
        f"drew {len(generated)} photos of {settings.size[0]} x {settings.size[1]} px showing {boxes} sights "
        f"({', '.join(names.values())}) into {folder}; {turned} stored turned with an EXIF orientation"
    )
    return generated


def _ingest_and_label(  # noqa: PLR0917 (one caller, what it set up)
    conn: Any,
    city: Any,
    settings: DemoSettings,
    generated: Sequence[Generated],
    names: Mapping[str, str],
    bucket: str,
    s3: Any,
    console: Any,
) -> DemoResult:
    """Ingest the photo folder into the city, hold a seeded share out, label the rest with their true
    boxes as ``annotator:generator``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.sight_catalog import ingest, labels, warehouse

    folder = generated[0].path.parents[1]
    items = ingest.folder_items(folder)
    columns = (TextColumn("[bold]ingesting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("ingest", total=len(items))
        report = ingest.ingest(
            conn, city, items, bucket=bucket, s3_client=s3, progress=lambda *_: bar.advance(task)
        )
    console.print(f"ingested into s3://{bucket}/: {report.summary()}")
    accepted = {o.source: o for o in report.accepted}
    if not accepted:
        raise RuntimeError(f"no photo was ingested: {report.summary()}")
    by_source = {str(g.path.resolve()): g for g in generated}
    sources = sorted(accepted)
    rng = np.random.default_rng(settings.seed)
    count = min(len(sources) - 1, max(1, round(settings.held_out * len(sources))))
    held = {sources[i] for i in rng.choice(len(sources), size=count, replace=False)}
    warehouse.set_held_out(conn, [image_id for s in held if (image_id := accepted[s].image_id) is not None])
    labelled = 0
    for source in sources:
        if source in held:
            continue
        image_id = accepted[source].image_id
        assert image_id is not None
        boxes = [labels.Box(sight, *map(float, box)) for sight, box in by_source[source].truth]
        labels.record_labelling(conn, image_id, LABELLER, boxes)
        labelled += 1
    console.print(
        f"labelled {labelled} training photos with the boxes the generator drew, as a person would "
        f"(labeller {LABELLER!r}: no model yet, and no Rekognition offline); {len(held)} held out"
    )
    return DemoResult(
        city=city.name,
        slug=city.slug,
        sights=dict(names),
        photos=len(generated),
        ingested=len(accepted),
        rejected=[{"source": o.source, "reason": o.reason} for o in report.rejected],
        training_photos=len(sources) - len(held),
        held_out_photos=len(held),
        labelled=labelled,
        labeller=LABELLER,
        per_photo=[{"source": s, "image_id": accepted[s].image_id, "held_out": True} for s in sorted(held)],
    )


def _held_sources(result: DemoResult) -> set[str]:
    return {str(p["source"]) for p in result.per_photo if p.get("held_out")}
