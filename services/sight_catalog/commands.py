"""``tessera sights ...``: the sight catalog from the command line.

- ``serve``: the HTTP API and web UI (:mod:`services.sight_catalog.api`), what the platform runs;
- ``cities``: list the cities with their status, or request new ones (``--add``);
- ``ingest``: photos into a city from folders, ``s3://`` prefixes, URLs or files listing URLs;
- ``label``: one labelling round over a city's unlabelled images, with a detector or Amazon Rekognition;
- ``demo``: the whole loop on the embedded default (:mod:`services.sight_catalog.demo`): generated photos
  ingested and labelled, a training through the queue, recognitions through the API, then the web UI.

Each verb connects to the database of ``TESSERA_DB_URL`` (or the platform's ``TESSERA_DB_*``), applying the
migrations first where this process may (:func:`~services.cloud.database.apply_migrations`); ``demo``
starts a platform of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.errors import UserError
from services.jobs.commands import user_errors


def _connect() -> Any:
    from services.cloud.database import apply_migrations, connect

    conn = connect()
    apply_migrations(conn)
    return conn


def _serve(args: argparse.Namespace) -> int:
    from services.cloud.database import apply_migrations, connect, database_url
    from services.jobs.commands import log_to_stderr
    from services.sight_catalog.api import Rate, Settings, catalog_token, serve

    log_to_stderr()
    token = catalog_token(token_file=args.token_file)
    settings = Settings(
        database_url=database_url(),
        token=token,
        host=args.host,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        upload_rate=Rate(args.upload_burst, args.upload_rate),
        recognition_rate=Rate(args.recognition_burst, args.recognition_rate),
        pool_size=args.connections,
        providers=args.providers,
    )
    try:
        with connect(settings.database_url) as conn:
            apply_migrations(conn)
    except Exception as exc:  # psycopg's errors; the server still starts, and /ready says why
        print(
            f"tessera sights serve: the database is not reachable yet ({exc}); /ready will say so",
            file=sys.stderr,
        )
    return serve(settings, port=args.port, forwarded_allow_ips=args.forwarded_allow_ips)


def _cities(args: argparse.Namespace) -> int:
    from services.sight_catalog import warehouse
    from services.sight_catalog.api import city_status

    with _connect() as conn:
        for name in args.add or []:
            city, created = warehouse.request_city(conn, name, requested_by="cli")
            print(f"{'requested' if created else 'known'}: {city.name} ({city.slug})", file=sys.stderr)
        cities: list[Any] = []
        after = None
        while True:
            page = warehouse.list_cities(conn, limit=warehouse.MAX_PAGE, after=after)
            cities += [(city, city_status(conn, city)) for city in page.items]
            after = page.next_after
            if after is None:
                break
    if args.json:
        print(
            json.dumps(
                [{"id": c.id, "name": c.name, "slug": c.slug, "status": status} for c, status in cities],
                indent=2,
            )
        )
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for column in ("city", "slug", "state", "sights", "images", "labelled", "labels", "model", "training"):
        table.add_column(column, justify="left" if column in ("city", "slug", "state") else "right")
    for city, s in cities:
        table.add_row(
            city.name,
            city.slug,
            s["state"],
            str(s["sights"]),
            str(s["images"]),
            str(s["labelled_images"]),
            str(s["labels"]),
            "-" if s["model_version"] is None else f"v{s['model_version']}",
            f"v{s['training_version']}" if s["training"] else "-",
        )
    Console(file=sys.stdout, width=160, soft_wrap=True).print(table)
    if not cities:
        print("no cities yet: tessera sights cities --add NAME", file=sys.stderr)
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from services.sight_catalog import ingest, warehouse

    items: list[ingest.Item] = []
    for source in args.sources:
        if source.startswith("s3://"):
            items += ingest.s3_items(source)
        elif source.startswith(("http://", "https://")):
            items += ingest.url_items([source])
        elif Path(source).is_file():
            text = Path(source).read_text(encoding="utf-8")
            items += ingest.url_items(ingest.parse_url_list(text))
        else:
            items += ingest.folder_items(source)
    bucket = args.bucket or ingest.datasets_bucket()
    limits = ingest.Limits(per_city=args.per_city, per_sight=args.per_sight)
    with _connect() as conn:
        if args.create:
            city, _ = warehouse.request_city(conn, args.city, requested_by="cli")
        else:
            city = warehouse.get_city(conn, args.city)

        def progress(done: int, total: int, outcome: ingest.Outcome) -> None:
            reason = f": {outcome.reason}" if outcome.reason else ""
            print(f"[{done}/{total}] {outcome.status} {outcome.source}{reason}", file=sys.stderr)

        report = ingest.ingest(
            conn, city, items, bucket=bucket, sight=args.sight, limits=limits, progress=progress
        )
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(report.summary())
    return 0


def _label(args: argparse.Namespace) -> int:
    from services.sight_catalog import warehouse
    from services.sight_catalog.labelling import DetectorLabeller, Labeller, S3ImageStore, label_city

    with _connect() as conn:
        city = warehouse.get_city(conn, args.city)
        labeller: Labeller
        if args.rekognition:
            from services.sight_catalog.rekognition import RekognitionLabeller

            labeller = RekognitionLabeller(args.rekognition)
        else:
            model_uri, version = args.model, "cli"
            if model_uri is None:
                ready = warehouse.ready_model(conn, city.id)
                if ready is None or ready.model_uri is None:
                    raise UserError(
                        f"{city.name} has no READY model to label with; give --model PATH or "
                        "--rekognition ARN"
                    )
                model_uri, version = ready.model_uri, str(ready.version)
            source: Any = model_uri
            if model_uri.startswith("s3://"):
                from services.cloud.objects import read_object

                source = read_object(model_uri)
            labeller = DetectorLabeller.open(
                source, version=version, score_threshold=args.min_score, providers=args.providers
            )
        run = label_city(conn, city.id, labeller, S3ImageStore(args.bucket), limit=args.limit)
    print(run.summary())
    for failure in run.failed:
        print(f"image {failure.image_id}: {failure.reason}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.sight_catalog.demo import DemoSettings, run_demo

    settings = DemoSettings(
        out_dir=Path(args.out_dir),
        city=args.city,
        photos=args.photos,
        sights=args.sights,
        steps=args.steps,
        seed=args.seed,
        timeout_s=args.timeout,
        serve=not args.no_serve,
    )
    return run_demo(settings)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sights`` (``serve``, ``cities``, ``ingest``, ``label``, ``demo``) to the ``tessera`` command
    parser's subparsers; returns the ``sights`` parser, whose ``get_default("verbs")`` takes more verbs."""
    sights = subparsers.add_parser(
        "sights", help="the sight catalog: cities, their photos and labels, recognition (API and web UI)"
    )
    verbs = sights.add_subparsers(dest="verb", required=True, metavar="VERB")
    sights.set_defaults(verbs=verbs)

    serve = verbs.add_parser(
        "serve",
        help="serve the catalog's HTTP API and web UI (GET /health, /ready, /api/..., /docs)",
        description=(
            "Serve the sight catalog: the API under /api (OpenAPI at /openapi.json, a page at /docs), the "
            "web UI at /, GET /health (the process is up) and GET /ready (the database answers). Binds "
            "127.0.0.1 unless --host says otherwise; any other address needs a token "
            "($TESSERA_CATALOG_TOKEN, $TESSERA_CATALOG_TOKEN_FILE, $TESSERA_CATALOG_TOKEN_SECRET_ARN or "
            "--token-file), which every write and recognition then needs ('Authorization: Bearer <token>'), "
            "and reads too. Uploads go to $TESSERA_BUCKET_DATASETS. SIGTERM or Ctrl-C stops."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    serve.add_argument(
        "--port", type=int, default=8080, help="port (default %(default)s; 0 picks a free one)"
    )
    serve.add_argument("--token-file", help="read the bearer token from this file's first line")
    serve.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest photo accepted, MiB (default %(default)s)"
    )
    serve.add_argument("--upload-burst", type=int, default=20, help="uploads a client may send at once (20)")
    serve.add_argument("--upload-rate", type=float, default=1.0, help="uploads a second after the burst (1)")
    serve.add_argument("--recognition-burst", type=int, default=10, help="recognitions at once (10)")
    serve.add_argument("--recognition-rate", type=float, default=1.0, help="recognitions a second (1)")
    serve.add_argument(
        "--connections", type=int, default=4, help="database connections (default %(default)s)"
    )
    serve.add_argument(
        "--providers", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime providers (auto)"
    )
    serve.add_argument(
        "--forwarded-allow-ips",
        help="proxies whose X-Forwarded-For names the client (rate limits go by it); default: loopback, or "
        "$FORWARDED_ALLOW_IPS",
    )
    serve.set_defaults(handler=user_errors("sights serve", _serve))

    cities = verbs.add_parser("cities", help="list the cities with their status, or request new ones")
    cities.add_argument("--add", action="append", metavar="NAME", help="request this city (repeatable)")
    cities.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cities.set_defaults(handler=user_errors("sights cities", _cities))

    ingest = verbs.add_parser(
        "ingest",
        help="add photos to a city from folders, s3:// prefixes, URLs or files of URLs",
        description=(
            "Add photos to CITY. A folder (or s3:// prefix) holds a folder per sight "
            "('photos/Eiffel Tower/1.jpg'); a .txt file lists URLs, one a line ('URL<TAB>sight' names "
            "the sight). Every file is checked (a JPEG, PNG or WebP that decodes, within the size limits), "
            "stored upright once per city in $TESSERA_BUCKET_DATASETS, and listed with what became of it."
        ),
    )
    ingest.add_argument("city", help="the city's name or slug")
    ingest.add_argument("sources", nargs="+", metavar="FOLDER|s3://prefix|URL|urls.txt")
    ingest.add_argument("--sight", help="the sight of photos whose source names none")
    ingest.add_argument("--create", action="store_true", help="request the city when it does not exist")
    ingest.add_argument("--per-city", type=int, help="stop once the city holds this many images")
    ingest.add_argument("--per-sight", type=int, help="stop once a sight holds this many images")
    ingest.add_argument("--bucket", help="the datasets bucket (default $TESSERA_BUCKET_DATASETS)")
    ingest.set_defaults(handler=user_errors("sights ingest", _ingest))

    label = verbs.add_parser(
        "label",
        help="label a city's unlabelled images with a detector (its READY model by default) or Rekognition",
    )
    label.add_argument("city", help="the city's name or slug")
    label.add_argument(
        "--model", help="a detector (.onnx path or s3:// URL); default: the city's READY model"
    )
    label.add_argument(
        "--rekognition",
        metavar="ARN",
        help="label with this Rekognition Custom Labels project version (paid)",
    )
    label.add_argument("--limit", type=int, default=100, help="images this round (default %(default)s)")
    label.add_argument("--min-score", type=float, default=0.25, help="a detector's score threshold (0.25)")
    label.add_argument("--providers", choices=("auto", "cpu", "cuda"), default="auto")
    label.add_argument("--bucket", help="the datasets bucket (default $TESSERA_BUCKET_DATASETS)")
    label.set_defaults(handler=user_errors("sights label", _label))

    demo = verbs.add_parser(
        "demo",
        help="the whole loop on the embedded default: photos, labels, a training, recognitions, the web UI",
        description=(
            "Start moto and an embedded PostgreSQL, request CITY, ingest generated photos of its sights "
            "(nothing is downloaded), label the training share with the generator's boxes, let the refresher "
            "train a tiny detector on the CPU through the training-jobs queue, recognise the held-out photos "
            "through the API and print precision, recall and latency; then serve the API and web UI on "
            "127.0.0.1 until Ctrl-C (--no-serve: stop after the figures). Everything goes to --out-dir."
        ),
    )
    demo.add_argument(
        "--out-dir", default="out/sights-demo", help="where photos, logs and figures go (%(default)s)"
    )
    demo.add_argument("--city", default="Paris", help="the city to request (default %(default)s)")
    demo.add_argument("--photos", type=int, default=240, help="photos to generate (default %(default)s)")
    demo.add_argument(
        "--sights", type=int, default=4, help="sights of the city, 1 to 6 (default %(default)s)"
    )
    demo.add_argument("--steps", type=int, default=400, help="training steps (default %(default)s)")
    demo.add_argument("--seed", type=int, default=12, help="the photos' seed (default %(default)s)")
    demo.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the model (default %(default)s)"
    )
    demo.add_argument("--no-serve", action="store_true", help="stop after the figures (tests, CI)")
    demo.set_defaults(handler=user_errors("sights demo", _demo))
    return sights


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.sight_catalog.commands ...``."""
    from services.cli import main as cli_main

    return cli_main(["sights", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
