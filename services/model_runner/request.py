"""The image request: what a client asks the model runner to do, as versioned, validated JSON.

An example (every field but ``image``, ``outputs`` and one of ``model`` / ``endpoint`` is optional)::

    {
      "schema": "tessera.image-request/v1",
      "job_id": "harbour-2026-07-01",
      "image": "s3://imagery/harbour.tif",
      "model": "s3://models/ships.onnx",
      "tile_size": [512, 512],
      "overlap": [64, 64],
      "region_size": [8192, 8192],
      "roi": {"geometry": "POLYGON ((...))", "crs": "lonlat"},
      "merge": {"algorithm": "nms+ios", "iou": 0.5, "ios": 0.8, "score_threshold": 0.25, "edge_margin": 1},
      "outputs": {"s3": "s3://results/harbour/", "path": "/data/harbour.geojson"},
      "properties": {"campaign": "july"},
      "batch_size": 2
    }

``model`` is a path, a ``file://`` or an ``s3://`` URI of an ONNX file, or a model registry name
(``NAME`` for the latest version, ``NAME:VERSION``), which the worker pins to that version's URI on arrival;
``endpoint`` instead points at a model served elsewhere (``{"url", "tile_size", "class_names"}``). Sizes
are ``[width, height]`` (or one number for both); ``overlap`` is ``[x, y]`` pixels. Without ``tile_size``
the model's input size is used; without ``overlap``, an eighth of the tile. ``roi`` is GeoJSON (a geometry,
Feature or FeatureCollection, as an object or text) or WKT, in lon/lat or in the image's map CRS.

``merge`` says how an object seen by several overlapping tiles comes out once, with its full extent:
boxes within ``edge_margin`` pixels of a tile side that is not the image's edge are dropped first (the tile
cut them; a neighbouring tile sees the object whole when the overlap is at least the largest object plus
``2 * edge_margin``; ``null`` keeps them), then ``algorithm`` merges what is left: ``"nms+ios"`` drops a box
lying inside a larger one of its class (IoS > ``ios``), then greedy NMS (IoU > ``iou``); ``"nms"`` only the
latter. Detections scoring below ``score_threshold`` are never kept.

``batch_size`` is the number of tiles per model call; left out, the runner picks it for where the model
runs: the model's fixed batch if it has one, else 8 on a GPU and, on a CPU, as many tiles as fit in 8 MiB
of float32 input (2 of 512 x 512 x 3), which keeps each session's tensors in the cache.

Unknown fields and bad values raise one :class:`~services.errors.UserError` listing every problem with its
JSON path (``$.merge.iou: ...``).

Trust: ``image``, ``model``, ``endpoint.url`` and ``outputs`` are checked against a
:class:`~services.jobs.trust.TrustPolicy` (the rules live in :mod:`services.jobs.trust`). A request taken
from a queue is confined (buckets of the deployment, local files only under ``TESSERA_LOCAL_ROOT``,
``outputs.path`` only under ``TESSERA_OUTPUT_ROOT``, endpoints only from ``TESSERA_ENDPOINT_URLS``; never
GDAL ``/vsi*`` paths, ``..`` or URL tricks); ``tessera run`` checks with the local policy (the user's own
paths). Without ``policy``, :func:`parse_request` applies :func:`~services.jobs.trust.policy_in_force`:
the worker's queue policy while a queue worker handles a message, else the local one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.errors import UserError
from services.jobs import trust
from services.jobs.documents import DocumentChecker, is_int, kind, load_document
from services.jobs.trust import TrustPolicy
from services.registry import is_registry_ref
from services.tiling.scaling import ScalingRule, rule_to_json

SCHEMA = "tessera.image-request/v1"
#: The merge algorithms a request may ask for (of :data:`services.inference.merge.ALGORITHMS`).
RequestMergeAlgorithm = Literal["nms+ios", "nms"]
MERGE_ALGORITHMS: tuple[RequestMergeAlgorithm, ...] = ("nms+ios", "nms")
ROI_CRS = ("lonlat", "map")
#: Feature properties the model runner writes itself; a request cannot override them.
RESERVED_PROPERTIES = frozenset({"class", "score", "pixel_bbox", "model", "job"})
DEFAULT_REGION = 8192
MAX_BATCH = 256
MAX_SIDE = 16384
_TOP = (
    "schema",
    "scaling",
    "job_id",
    "image",
    "model",
    "endpoint",
    "tile_size",
    "overlap",
    "region_size",
    "roi",
    "merge",
    "outputs",
    "properties",
    "batch_size",
)


@dataclass(frozen=True)
class Endpoint:
    """A model served elsewhere over HTTP (OSML-style ``POST /invocations``)."""

    url: str
    tile_size: tuple[int, int]
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class RegionOfInterest:
    """Where to look: ``geometry`` is GeoJSON or WKT text, in ``crs`` ``"lonlat"`` or ``"map"``."""

    geometry: str
    crs: str = "lonlat"


@dataclass(frozen=True)
class MergeSettings:
    """How duplicate detections in tile and region overlaps are merged."""

    algorithm: RequestMergeAlgorithm = "nms+ios"
    iou: float = 0.5
    ios: float = 0.8
    score_threshold: float = 0.25
    #: Boxes this close to an interior tile side are dropped as cut by the tile; None keeps them.
    edge_margin: float | None = 1.0


@dataclass(frozen=True)
class Outputs:
    """Where the GeoJSON goes: an S3 prefix (``<prefix>/<job_id>.geojson``) and/or a local file."""

    s3: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class ImageRequest:
    """A validated image request."""

    job_id: str
    image: str
    outputs: Outputs
    model: str | None = None
    endpoint: Endpoint | None = None
    tile_size: tuple[int, int] | None = None
    overlap: tuple[int, int] | None = None
    region_size: tuple[int, int] = (DEFAULT_REGION, DEFAULT_REGION)
    roi: RegionOfInterest | None = None
    merge: MergeSettings = MergeSettings()
    properties: Mapping[str, Any] = field(default_factory=dict)
    #: Tiles per model call; None: the model runner's default for where the model runs (the model's own
    #: fixed batch, else 8 on a GPU and 2 tiles of 512 x 512 x 3 on a CPU: ``default_batch_size``).
    batch_size: int | None = None
    #: How the image's pixels become model input where the model's metadata does not say (float, signed or
    #: single-band images): ``{"mode": "range", "min", "max"}``, ``{"mode": "none"}``, ``"bands"``.
    scaling: ScalingRule | None = None

    @property
    def model_name(self) -> str:
        """What the features' ``model`` property says: the model URI or the endpoint URL."""
        return self.model or (self.endpoint.url if self.endpoint else "")

    def to_json(self) -> dict[str, Any]:
        """The request as JSON, with every default written out (what is stored with the job)."""
        body: dict[str, Any] = {"schema": SCHEMA, "job_id": self.job_id, "image": self.image}
        if self.model is not None:
            body["model"] = self.model
        if self.endpoint is not None:
            body["endpoint"] = {
                "url": self.endpoint.url,
                "tile_size": list(self.endpoint.tile_size),
                "class_names": list(self.endpoint.class_names),
            }
        if self.tile_size is not None:
            body["tile_size"] = list(self.tile_size)
        if self.overlap is not None:
            body["overlap"] = list(self.overlap)
        body["region_size"] = list(self.region_size)
        if self.roi is not None:
            body["roi"] = {"geometry": self.roi.geometry, "crs": self.roi.crs}
        body["merge"] = {
            "algorithm": self.merge.algorithm,
            "iou": self.merge.iou,
            "ios": self.merge.ios,
            "score_threshold": self.merge.score_threshold,
            "edge_margin": self.merge.edge_margin,
        }
        body["outputs"] = {k: v for k, v in (("s3", self.outputs.s3), ("path", self.outputs.path)) if v}
        body["properties"] = dict(self.properties)
        if self.batch_size is not None:
            body["batch_size"] = self.batch_size
        if self.scaling is not None:
            body["scaling"] = rule_to_json(self.scaling)
        return body


def local_model_path(model: str) -> Path:
    """The file a local ``model`` names (a path or a ``file://`` URI); UserError when there is none (or it
    cannot be looked at)."""
    path = Path(model[len("file://") :] if model.startswith("file://") else model)
    try:
        found = path.is_file()
    except OSError:  # is_file() answers False for a missing path, and raises for one it may not look at
        found = False
    if not found:
        raise UserError(f"model {model} does not exist; give the path, file:// or s3:// URI of an ONNX file")
    return path


def parse_request(data: str | bytes | Mapping[str, Any], policy: TrustPolicy | None = None) -> ImageRequest:
    """Validate an image request (JSON text or a decoded object) under ``policy`` (default: the policy in
    force, see the module doc); UserError lists every problem."""
    checker = _Checker("the image request", policy or trust.policy_in_force())
    return checker.request(load_document(data, "the image request"))


class _Checker(DocumentChecker):
    """The image request's fields (see the module doc)."""

    def __init__(self, what: str, policy: TrustPolicy) -> None:
        super().__init__(what)
        self.policy = policy

    def request(self, data: Mapping[str, Any]) -> ImageRequest:
        job_id = self.header(data, fields=_TOP, schema=SCHEMA, reader="this model runner")
        image = self.image(data.get("image"))
        model = self.model(data.get("model"), "endpoint" in data)
        endpoint = self.endpoint(data["endpoint"]) if "endpoint" in data else None
        tile = self.size("$.tile_size", data["tile_size"], 1) if "tile_size" in data else None
        overlap = self.size("$.overlap", data["overlap"], 0) if "overlap" in data else None
        if tile and overlap and (overlap[0] >= tile[0] or overlap[1] >= tile[1]):
            self.problem(
                "$.overlap", f"must be smaller than the tile ({tile[0]} x {tile[1]}), got {list(overlap)}"
            )
        region = self.size("$.region_size", data.get("region_size", DEFAULT_REGION), 1)
        roi = self.roi(data["roi"]) if "roi" in data else None
        merge = self.merge(data.get("merge", {}))
        outputs = self.outputs(data.get("outputs"))
        properties = self.properties(data.get("properties", {}))
        batch = data.get("batch_size")
        if batch is not None and (not is_int(batch) or not 1 <= batch <= MAX_BATCH):
            self.problem("$.batch_size", f"must be a whole number 1..{MAX_BATCH}, got {kind(batch)}")
        scaling = self.scaling(data["scaling"]) if "scaling" in data else None
        self.done()
        return ImageRequest(
            job_id=job_id,
            image=image,
            outputs=outputs,
            model=model,
            endpoint=endpoint,
            tile_size=tile,
            overlap=overlap,
            region_size=region or (DEFAULT_REGION, DEFAULT_REGION),
            roi=roi,
            merge=merge,
            properties=properties,
            batch_size=batch,
            scaling=scaling,
        )

    def scaling(self, value: Any) -> ScalingRule | None:
        if not isinstance(value, Mapping):
            self.problem(
                "$.scaling",
                'must be an object such as {"mode": "range", "min": 0, "max": 4095}, got ' + kind(value),
            )
            return None
        try:
            return ScalingRule.parse(value)
        except UserError as error:
            self.problem("$.scaling", str(error))
            return None

    def image(self, image: Any) -> str:
        if image is None:
            self.problem("$.image", "required: the path or s3://bucket/key URL of the raster")
            return ""
        if not isinstance(image, str) or not image.strip():
            self.problem("$.image", f"must be a path or an s3:// URL, got {kind(image)}")
            return ""
        return self.trusted("$.image", trust.source, image, self.policy, what="the image") or image

    def model(self, model: Any, has_endpoint: bool) -> str | None:
        if model is None:
            if not has_endpoint:
                self.problem(
                    "$.model",
                    "required (or give an endpoint): the path, file:// or s3:// URI of an ONNX model",
                )
            return None
        if has_endpoint:
            self.problem("$.model", "give either model or endpoint, not both")
        if not isinstance(model, str) or not model.strip():
            self.problem("$.model", f"must be a path, file:// or s3:// URI, got {kind(model)}")
            return None
        if model.startswith(("http://", "https://")):
            self.problem(
                "$.model",
                f"{model[:64]!r}: models are read from a path, file:// or s3://; "
                "for a model served over HTTP give endpoint instead",
            )
            return model
        if "/" not in model and not model.lower().endswith(".onnx"):
            # A registry name is pinned to the URI the registry (not the request) holds.
            if not is_registry_ref(model):
                self.problem(
                    "$.model",
                    f"{model[:64]!r} is neither a path, a file:// or s3:// URI nor a model registry name "
                    "(NAME or NAME:VERSION, letters, digits, '.', '_' and '-')",
                )
            return model
        return self.trusted("$.model", trust.source, model, self.policy, what="the model") or model

    def endpoint(self, endpoint: Any) -> Endpoint | None:
        if not isinstance(endpoint, Mapping):
            self.problem(
                "$.endpoint", f"must be an object {{url, tile_size, class_names}}, got {kind(endpoint)}"
            )
            return None
        self.unknown_fields("$.endpoint", endpoint, ("url", "tile_size", "class_names"))
        url = endpoint.get("url")
        if not isinstance(url, str):
            self.problem("$.endpoint.url", f"must be an http:// or https:// URL, got {kind(url)}")
        else:
            url = self.trusted("$.endpoint.url", trust.endpoint_url, url, self.policy) or url
        tile = self.size("$.endpoint.tile_size", endpoint.get("tile_size"), 1)
        names = endpoint.get("class_names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            self.problem("$.endpoint.class_names", f"must be a list of strings, got {kind(names)}")
            names = []
        if not isinstance(url, str) or tile is None:
            return None
        return Endpoint(url=url, tile_size=tile, class_names=tuple(names))

    def size(self, path: str, value: Any, least: int) -> tuple[int, int] | None:
        pair = [value, value] if is_int(value) else value
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(
                is_int(v) and least <= v <= (MAX_SIDE if path != "$.region_size" else 10**7) for v in pair
            )
        ):
            top = MAX_SIDE if path != "$.region_size" else 10**7
            self.problem(
                path,
                f"must be [width, height] (or one number), whole numbers {least}..{top}; got {kind(value)}",
            )
            return None
        return int(pair[0]), int(pair[1])

    def roi(self, roi: Any) -> RegionOfInterest | None:
        if not isinstance(roi, Mapping):
            self.problem("$.roi", f"must be an object {{geometry, crs}}, got {kind(roi)}")
            return None
        self.unknown_fields("$.roi", roi, ("geometry", "crs"))
        crs = roi.get("crs", "lonlat")
        if crs not in ROI_CRS:
            self.problem("$.roi.crs", f"must be one of {', '.join(ROI_CRS)}, got {kind(crs)}")
        geometry = roi.get("geometry")
        if isinstance(geometry, Mapping):
            geometry = json.dumps(geometry)
        if not isinstance(geometry, str) or not geometry.strip():
            self.problem("$.roi.geometry", f"must be GeoJSON or WKT, got {kind(geometry)}")
            return None
        return RegionOfInterest(geometry=geometry, crs=str(crs))

    def merge(self, merge: Any) -> MergeSettings:
        if not isinstance(merge, Mapping):
            self.problem(
                "$.merge",
                f"must be an object {{algorithm, iou, ios, score_threshold, edge_margin}}, got {kind(merge)}",
            )
            return MergeSettings()
        known = ("algorithm", "iou", "ios", "score_threshold", "edge_margin")
        self.unknown_fields("$.merge", merge, known)
        algorithm = merge.get("algorithm", "nms+ios")
        if algorithm not in MERGE_ALGORITHMS:
            self.problem(
                "$.merge.algorithm", f"must be one of {', '.join(MERGE_ALGORITHMS)}, got {kind(algorithm)}"
            )
            algorithm = MergeSettings.algorithm  # a placeholder: done() refuses the request
        values = {}
        for key in ("iou", "ios", "score_threshold"):
            value = merge.get(key, getattr(MergeSettings, key))
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                self.problem(f"$.merge.{key}", f"must be a number 0..1, got {kind(value)}")
                value = getattr(MergeSettings, key)
            values[key] = float(value)
        margin = merge.get("edge_margin", MergeSettings.edge_margin)
        if margin is not None and (
            not isinstance(margin, int | float) or isinstance(margin, bool) or not 0.0 <= margin <= 64.0
        ):
            self.problem(
                "$.merge.edge_margin", f"must be a number of pixels 0..64 or null, got {kind(margin)}"
            )
            margin = MergeSettings.edge_margin
        return MergeSettings(
            algorithm=algorithm,
            edge_margin=None if margin is None else float(margin),
            **values,
        )

    def outputs(self, outputs: Any) -> Outputs:
        if outputs is None:
            self.problem("$.outputs", 'required: {"s3": "s3://bucket/prefix"} and/or {"path": "out.geojson"}')
            return Outputs()
        if not isinstance(outputs, Mapping):
            self.problem("$.outputs", f"must be an object {{s3, path}}, got {kind(outputs)}")
            return Outputs()
        self.unknown_fields("$.outputs", outputs, ("s3", "path"))
        s3, path = outputs.get("s3"), outputs.get("path")
        if s3 is not None:
            if not isinstance(s3, str):
                self.problem("$.outputs.s3", f"must be s3://BUCKET or s3://BUCKET/PREFIX, got {kind(s3)}")
                s3 = None
            else:
                s3 = self.trusted("$.outputs.s3", trust.output_s3, s3, self.policy)
        if path is not None:
            if not isinstance(path, str) or not path.strip():
                self.problem("$.outputs.path", f"must be a file path, got {kind(path)}")
                path = None
            else:
                path = self.trusted("$.outputs.path", trust.output_path, path, self.policy)
        if s3 is None and path is None and not any(k in outputs for k in ("s3", "path")):
            self.problem("$.outputs", "give s3 (s3://bucket/prefix) and/or path (a local .geojson file)")
        return Outputs(s3=s3, path=path)

    def properties(self, properties: Any) -> dict[str, Any]:
        if not isinstance(properties, Mapping):
            self.problem(
                "$.properties", f"must be an object of extra feature properties, got {kind(properties)}"
            )
            return {}
        clash = sorted(set(properties) & RESERVED_PROPERTIES)
        for key in clash:
            self.problem(f"$.properties.{key}", "is written by the model runner; choose another name")
        return dict(properties)
