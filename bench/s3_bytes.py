"""S3 bytes: bytes the pipeline fetches from S3 / compressed bytes of the file's blocks its tiles cover.

Run: ``.venv/bin/python bench/s3_bytes.py`` (a 4,096 x 4,096 px tiled DEFLATE GeoTIFF; ``--quick`` for a
smoke run).

moto's S3 server runs in this process behind a WSGI wrapper that records every response: method, key,
``Range`` header, body bytes and (approximately) header bytes. The GeoTIFF is uploaded, and
:func:`services.model_runner.pipeline.run_image` runs on its ``s3://`` URL (GDAL ``/vsis3`` range reads)
twice: over the whole image, and with a region of interest (a triangle in map coordinates) covering part
of it, so that the blocks covered are a subset of the file. Each case reads its own copy of the object
(GDAL caches ranges per URL within a process).

The denominator comes from the file itself: the TIFF's ``TileOffsets``/``TileByteCounts`` (parsed with the
standard library), summed over the blocks that the job's tiles (after the ROI) touch. The fetched bytes
are also broken down: file header, covered blocks, other blocks, and bytes fetched more than once.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

GOAL = 1.15
BUCKET = "bench-imagery"
REGION = "us-east-1"


# --- counting what the S3 server sends ---------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """One response of the S3 server."""

    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int
    header_bytes: int


class CountingApp:
    """A WSGI wrapper that records each response's body and header sizes."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.responses: list[Response] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        seen: dict[str, Any] = {}

        def counting_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen["status"] = int(status.split(maxsplit=1)[0])
            # "HTTP/1.1 " + status line, "k: v\r\n" per header, the blank line.
            seen["header_bytes"] = 9 + len(status) + 2 + sum(len(k) + len(v) + 4 for k, v in headers) + 2
            return start_response(status, headers, exc_info)

        body = self.app(environ, counting_start)
        return self._count(environ, body, seen)

    def _count(self, environ: dict[str, Any], body: Iterable[bytes], seen: dict[str, Any]) -> Iterator[bytes]:
        sent = 0
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            response = Response(
                method=environ["REQUEST_METHOD"],
                path=environ.get("PATH_INFO", ""),
                range=environ.get("HTTP_RANGE"),
                status=int(seen.get("status", 0)),
                body_bytes=sent,
                header_bytes=int(seen.get("header_bytes", 0)),
            )
            with self.lock:
                self.responses.append(response)

    def take(self) -> list[Response]:
        """The responses recorded since the last call."""
        with self.lock:
            taken, self.responses = self.responses, []
        return taken


class CountingMotoServer:
    """moto's S3 (and everything else moto serves) on loopback, every response counted."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self.counter = CountingApp(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            "127.0.0.1", 0, self.counter, threaded=True, request_handler=MotoRequestHandler
        )
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)

    def __enter__(self) -> CountingMotoServer:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join()


# --- what the file holds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TiffBlocks:
    """The first IFD's block layout: image and block size, and where each block's bytes lie."""

    width: int
    height: int
    block_w: int
    block_h: int
    planes: int  # 1 for pixel-interleaved (one block holds every band), else the band count
    offsets: np.ndarray  # int64 [planes * blocks_down * blocks_across]
    byte_counts: np.ndarray  # int64, same order (0: a sparse block, absent from the file)

    @property
    def blocks_across(self) -> int:
        """Blocks per block row."""
        return -(-self.width // self.block_w)

    @property
    def blocks_down(self) -> int:
        """Block rows."""
        return -(-self.height // self.block_h)


_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 16: 8}  # BYTE, ASCII, SHORT, LONG, LONG8
_TYPE_CODES = {1: "B", 2: "B", 3: "H", 4: "I", 16: "Q"}


def read_tiff_blocks(path: Path) -> TiffBlocks:
    """Parse the first IFD of a tiled (Big)TIFF with the standard library: sizes, offsets, byte counts."""
    with path.open("rb") as f:
        head = f.read(16)
        order = {b"II": "<", b"MM": ">"}[head[:2]]
        magic = struct.unpack(order + "H", head[2:4])[0]
        big = magic == 43
        ifd = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
        f.seek(ifd)
        count_fmt, entry_size = ("Q", 20) if big else ("H", 12)
        n = struct.unpack(order + count_fmt, f.read(8 if big else 2))[0]
        entries = f.read(n * entry_size)
        tags: dict[int, list[int]] = {}
        for i in range(n):
            e = entries[i * entry_size : (i + 1) * entry_size]
            tag, kind = struct.unpack(order + "HH", e[:4])
            if kind not in _TYPE_SIZES:
                continue
            if big:
                count = struct.unpack(order + "Q", e[4:12])[0]
                inline, slot = e[12:20], 8
            else:
                count = struct.unpack(order + "I", e[4:8])[0]
                inline, slot = e[8:12], 4
            size = _TYPE_SIZES[kind] * count
            if size <= slot:
                raw = inline[:size]
            else:
                where = struct.unpack(order + ("Q" if big else "I"), inline)[0]
                here = f.tell()
                f.seek(where)
                raw = f.read(size)
                f.seek(here)
            tags[tag] = list(struct.unpack(order + _TYPE_CODES[kind] * count, raw))
    if 322 not in tags or 324 not in tags:
        raise SystemExit(f"{path} is not a tiled TIFF (no TileWidth/TileOffsets)")
    planar = tags.get(284, [1])[0]
    return TiffBlocks(
        width=tags[256][0],
        height=tags[257][0],
        block_w=tags[322][0],
        block_h=tags[323][0],
        planes=tags[277][0] if planar == 2 else 1,
        offsets=np.array(tags[324], np.int64),
        byte_counts=np.array(tags[325], np.int64),
    )


def covered_blocks(layout: TiffBlocks, tiles: Iterable[Any]) -> np.ndarray:
    """Indexes (into offsets/byte_counts) of every block that one of ``tiles`` (Windows) touches."""
    across, down = layout.blocks_across, layout.blocks_down
    hit = np.zeros((down, across), bool)
    for t in tiles:
        r0, r1 = max(t.row_off, 0), min(t.row_end, layout.height)
        c0, c1 = max(t.col_off, 0), min(t.col_end, layout.width)
        if r1 > r0 and c1 > c0:
            hit[
                r0 // layout.block_h : (r1 - 1) // layout.block_h + 1,
                c0 // layout.block_w : (c1 - 1) // layout.block_w + 1,
            ] = True
    flat = np.flatnonzero(hit.ravel())
    return np.concatenate([flat + plane * across * down for plane in range(layout.planes)])


# --- one case ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What one run fetched and what its tiles needed."""

    name: str
    tiles: int
    blocks: int
    blocks_total: int
    covered_bytes: int
    requests: int
    fetched: int  # response body bytes
    header_bytes: int  # response header bytes (approximate)
    file_header: int  # fetched bytes before the first block
    in_covered: int  # fetched bytes inside covered blocks (once)
    in_other: int  # fetched bytes inside blocks no tile covers
    refetched: int  # bytes fetched more than once

    @property
    def ratio(self) -> float:
        """Fetched body bytes / compressed bytes of the covered blocks."""
        return self.fetched / self.covered_bytes

    @property
    def ratio_on_wire(self) -> float:
        """Fetched body and header bytes / compressed bytes of the covered blocks."""
        return (self.fetched + self.header_bytes) / self.covered_bytes


_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def analyse(
    name: str,
    *,
    responses: list[Response],
    key: str,
    layout: TiffBlocks,
    blocks: np.ndarray,
    tiles: int,
    size: int,
) -> Case:
    """Sum the responses for ``key`` and split the fetched bytes by what they hold."""
    mine = [r for r in responses if r.path.endswith("/" + key)]
    times = np.zeros(size, np.uint16)  # how often each byte of the object was sent
    for r in mine:
        if r.method != "GET" or r.body_bytes == 0:
            continue
        m = _RANGE.match(r.range or "")
        start = int(m.group(1)) if m else 0
        times[start : start + r.body_bytes] += 1
    covered = np.zeros(size, bool)
    for b in blocks:
        covered[layout.offsets[b] : layout.offsets[b] + layout.byte_counts[b]] = True
    in_blocks = np.zeros(size, bool)
    for off, n in zip(layout.offsets, layout.byte_counts, strict=True):
        in_blocks[off : off + n] = True
    first_block = int(layout.offsets[layout.byte_counts > 0].min())
    fetched_once = times > 0
    return Case(
        name=name,
        tiles=tiles,
        blocks=len(blocks),
        blocks_total=len(layout.offsets),
        covered_bytes=int(layout.byte_counts[blocks].sum()),
        requests=len(mine),
        fetched=sum(r.body_bytes for r in mine),
        header_bytes=sum(r.header_bytes for r in mine),
        file_header=int(fetched_once[:first_block].sum()),
        in_covered=int((fetched_once & covered).sum()),
        in_other=int((fetched_once & in_blocks & ~covered).sum()),
        refetched=int(times.sum() - fetched_once.sum()),
    )


def triangle_wkt(transform: Any, width: int, height: int) -> str:
    """A triangle over part of the image (pixel corners chosen off the block grid), in map coordinates."""
    corners = [(0.13 * width, 0.21 * height), (0.83 * width, 0.37 * height), (0.41 * width, 0.88 * height)]
    xy = [transform * (c, r) for c, r in corners]
    ring = ", ".join(f"{x:.3f} {y:.3f}" for x, y in [*xy, xy[0]])
    return f"POLYGON (({ring}))"


def run_case(
    server: CountingMotoServer,
    name: str,
    *,
    key: str,
    local: Path,
    layout: TiffBlocks,
    data_dir: Path,
    roi: str | None,
) -> Case:
    """run_image on ``s3://BUCKET/key`` (with ``roi``); what it fetched against what its tiles cover."""
    from services.model_runner import model_setup, pipeline
    from services.model_runner.request import parse_request
    from services.tiling.reader import RasterSource

    slug = name.replace(" ", "-").lower()
    body: dict[str, Any] = {
        "job_id": f"bench-s3-{slug}",
        "image": f"s3://{BUCKET}/{key}",
        "model": str(harness.MODEL),
        "outputs": {"path": str(data_dir / f"s3-bytes-{slug}.geojson")},
    }
    if roi is not None:
        body["roi"] = {"geometry": roi, "crs": "map"}
    request = parse_request(body)
    server.counter.take()
    summary = pipeline.run_image(request, providers="cpu", s3_endpoint=server.endpoint)
    responses = server.counter.take()
    # The tiles the job ran, by the pipeline's own functions (on the local copy: no requests counted).
    detector = model_setup.open_detector(request, providers="cpu")
    with RasterSource.open(str(local)) as source:
        grid = model_setup.settle_grid(request, detector)
        polygon = pipeline.roi_polygon(request, source)
        plan = pipeline.plan_job(grid, source, polygon)
        tiles = [
            t
            for r in plan.regions
            for t in pipeline.region_tiles(grid, r, source.width, source.height, polygon)
        ]
    assert len(tiles) == summary.tiles
    blocks = covered_blocks(layout, tiles)
    return analyse(
        name,
        responses=responses,
        key=key,
        layout=layout,
        blocks=blocks,
        tiles=len(tiles),
        size=local.stat().st_size,
    )


def main(argv: list[str] | None = None) -> int:
    """Generate (or reuse) the scene, serve it from moto, run the pipeline twice, print the byte counts."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="image width and height in px (4096)")
    p.add_argument("--compress", choices=("deflate", "jpeg"), default="deflate")
    p.add_argument("--data-dir", type=Path, default=harness.DEFAULT_DATA_DIR)
    p.add_argument("--quick", action="store_true", help="smoke run: a 1536 px image")
    args = p.parse_args(argv)
    if args.quick:
        args.size = 1536

    scene = harness.scene_file(args.data_dir, args.size, args.size, compress=args.compress)
    layout = read_tiff_blocks(scene.path)
    # GDAL's /vsis3 reads credentials and region from the environment; moto accepts any.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_REGION", REGION)
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)

    import boto3
    import rasterio

    with rasterio.open(scene.path) as ds:
        transform = ds.transform
    cases: list[Case] = []
    with CountingMotoServer() as server:
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        for name, roi in (
            ("whole image", None),
            ("ROI triangle", triangle_wkt(transform, args.size, args.size)),
        ):
            key = f"{name.split()[0].lower()}/{scene.path.name}"
            s3.upload_file(str(scene.path), BUCKET, key)
            case = run_case(
                server, name, key=key, local=scene.path, layout=layout, data_dir=args.data_dir, roi=roi
            )
            cases.append(case)

    print(
        f"image           {args.size:,} x {args.size:,} px, 3 x uint8, tiled {layout.block_w} px, "
        f"{args.compress.upper()}; object {harness.mb(scene.path.stat().st_size)}, "
        f"{len(layout.offsets)} blocks"
    )
    print(f"server          moto {_moto_version()} (S3, in process), GDAL {rasterio.__gdal_version__} /vsis3")
    print()
    print(f"{'':30}" + "".join(f"{c.name:>16}" for c in cases))
    rows: list[tuple[str, Callable[[Case], str]]] = [
        ("tiles run", lambda c: f"{c.tiles:,}"),
        ("blocks covered", lambda c: f"{c.blocks:,} / {c.blocks_total:,}"),
        ("compressed bytes covered", lambda c: f"{c.covered_bytes:,}"),
        ("requests", lambda c: f"{c.requests:,}"),
        ("bytes fetched (bodies)", lambda c: f"{c.fetched:,}"),
        ("  file header", lambda c: f"{c.file_header:,}"),
        ("  covered blocks", lambda c: f"{c.in_covered:,}"),
        ("  blocks no tile covers", lambda c: f"{c.in_other:,}"),
        ("  fetched again", lambda c: f"{c.refetched:,}"),
        ("response headers (approx.)", lambda c: f"{c.header_bytes:,}"),
        ("ratio (bodies)", lambda c: f"{c.ratio:.3f}"),
        ("ratio (with headers)", lambda c: f"{c.ratio_on_wire:.3f}"),
    ]
    for label, cell in rows:
        print(f"{label:30}" + "".join(f"{cell(c):>16}" for c in cases))
    print()
    worst = max(c.ratio for c in cases)
    print(harness.result_line("s3_bytes_ratio", worst, "<=", GOAL, digits=3))
    return 0


def _moto_version() -> str:
    from importlib.metadata import version

    return version("moto")


if __name__ == "__main__":
    raise SystemExit(main())
