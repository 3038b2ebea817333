"""Shared inference library: detections as columns, ONNX detectors, remote endpoints, tile merging.

No AWS or SQL in here; the model runner and the CLI build on it.
"""

from services.inference.detections import Detections
from services.inference.detector import Detector, OnnxDetector
from services.inference.endpoint import EndpointDetector, endpoint_server, serve_endpoint
from services.inference.merge import drop_edge_truncated, image_edges, merge_detections

__all__ = [
    "Detections",
    "Detector",
    "EndpointDetector",
    "OnnxDetector",
    "drop_edge_truncated",
    "endpoint_server",
    "image_edges",
    "merge_detections",
    "serve_endpoint",
]
