"""Amazon Rekognition as an external labeller: ``DetectCustomLabels`` with the city's Custom Labels model.

Why Custom Labels: a city's sights are particular landmarks (a cathedral, a bridge), and the labels must
name them. ``DetectLabels`` knows only general categories ("Tower", "Building", "Architecture") and gives
instance boxes only for common objects, so it cannot tell one sight from another. A Custom Labels object
detection model trained on the city's sights returns the sights' own names with a box each
(``Geometry.BoundingBox``, as ratios of the image's width and height), which is what a labelling is. Its
model version (``ProjectVersionArn``) is per city: :func:`project_version_arn` reads them from
TESSERA_REKOGNITION_PROJECT_VERSIONS (JSON, city slug -> ARN).

Calls and the budget: the client is made with botocore's retries off (:func:`rekognition_client`), so every
request sent is one this module sent, after taking one call from the budget. Throttling
(``ThrottlingException``, ``ProvisionedThroughputExceededException``) and ``InternalServerError`` are
retried here with exponential backoff and jitter, each retry a new call from the budget; a request that
never left (no connection, no credentials) is refunded. An image Rekognition refuses
(``InvalidImageFormatException``, ``ImageTooLargeException``) is an ImageRejectedError: recorded, not sent
again. Anything else (model not running, wrong ARN, no permission) stops the round: LabellerUnavailableError.

Rekognition takes PNG or JPEG of at most 4 MB as bytes: other formats (WebP), larger files and images
turned by an EXIF orientation are sent re-encoded as JPEG (upright, shrunk until they fit). The boxes are
ratios, so they map back to the stored image.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
)
from PIL import Image

from services.errors import UserError
from services.sight_catalog import labels
from services.sight_catalog.labelling import (
    UNMETERED,
    BudgetExhaustedError,
    CallBudget,
    ImageRejectedError,
    LabellerUnavailableError,
    SightNames,
    open_image,
)
from services.sight_catalog.labels import Box

#: The labeller recorded for Rekognition's labellings.
LABELLER = "rekognition"
#: City slug -> Custom Labels model version ARN, as JSON.
PROJECT_VERSIONS_ENV = "TESSERA_REKOGNITION_PROJECT_VERSIONS"
#: The largest image DetectCustomLabels takes as bytes.
MAX_IMAGE_BYTES = 4 * 1024 * 1024
#: Errors worth another call after a pause.
RETRYABLE = frozenset(
    {"ThrottlingException", "ProvisionedThroughputExceededException", "InternalServerError"}
)
#: Errors about the image itself: it is recorded as rejected.
REJECTED = frozenset({"InvalidImageFormatException", "ImageTooLargeException"})
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_ORIENTATION = 0x0112  # the EXIF tag


def rekognition_client(endpoint_url: str | None = None, *, region: str | None = None) -> Any:
    """A Rekognition client with botocore's own retries off (this module retries, counting each call), made
    in a session of its own, so worker threads may each make theirs at once.

    ``endpoint_url`` points it at a stand-in; else botocore's AWS_ENDPOINT_URL(_REKOGNITION) applies.
    """
    import boto3.session
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=5, read_timeout=30)
    session = boto3.session.Session()
    return session.client("rekognition", endpoint_url=endpoint_url, region_name=region, config=config)


def project_version_arn(slug: str, env: Mapping[str, str] | None = None) -> str:
    """The Custom Labels model version of the city ``slug``, from TESSERA_REKOGNITION_PROJECT_VERSIONS."""
    env = os.environ if env is None else env
    text = env.get(PROJECT_VERSIONS_ENV, "")
    try:
        versions = json.loads(text) if text else {}
    except ValueError as exc:
        raise UserError(f"{PROJECT_VERSIONS_ENV} is not JSON: {exc}") from None
    if not isinstance(versions, dict):
        raise UserError(f"{PROJECT_VERSIONS_ENV} must be a JSON object: city slug -> model version ARN")
    arn = versions.get(slug)
    if not isinstance(arn, str) or not arn:
        raise UserError(
            f"no Rekognition Custom Labels model for city {slug!r}: add it to {PROJECT_VERSIONS_ENV} "
            f'({{"{slug}": "arn:aws:rekognition:REGION:ACCOUNT:project/NAME/version/VERSION/ID"}})'
        )
    return check_arn(arn)


def check_arn(arn: str) -> str:
    """``arn`` when it looks like a Custom Labels model version ARN; else a UserError."""
    if not (arn.startswith("arn:") and ":rekognition:" in arn and "/version/" in arn):
        raise UserError(
            f"{arn!r} is not a Rekognition Custom Labels model version ARN "
            f"(arn:aws:rekognition:REGION:ACCOUNT:project/NAME/version/VERSION/ID)"
        )
    return arn


class RekognitionLabeller:
    """DetectCustomLabels with one city's model version as a labeller (see the module docstring).

    ``aliases``: Custom Labels names -> sight names (beside exact and case-insensitive matches);
    ``min_confidence`` (0-100) is passed on (None: the model's own threshold per label); ``max_attempts``
    calls per image while throttled, pausing ``backoff_s`` doubled each time (at most ``max_backoff_s``,
    jittered). ``client`` must have botocore's retries off, as :func:`rekognition_client` makes it.
    """

    name = LABELLER
    external = True

    def __init__(
        self,
        project_version_arn: str,
        *,
        client: Any = None,
        aliases: Mapping[str, str] | None = None,
        min_confidence: float | None = None,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise UserError(f"max_attempts must be at least 1, got {max_attempts}")
        if min_confidence is not None and not 0 <= min_confidence <= 100:
            raise UserError(f"min_confidence is a percentage (0-100), got {min_confidence}")
        self.project_version_arn = check_arn(project_version_arn)
        self.client = client if client is not None else rekognition_client()
        self.aliases = dict(aliases or {})
        self.min_confidence = min_confidence
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep

    def label(self, image: bytes, sights: Sequence[str], *, budget: CallBudget = UNMETERED) -> list[Box]:
        """The sights Rekognition finds on ``image``, in its pixels; one budget call per request sent."""
        picture = open_image(image)
        width, height = picture.size
        request: dict[str, Any] = {
            "ProjectVersionArn": self.project_version_arn,
            "Image": {"Bytes": sendable(image, picture)},
        }
        if self.min_confidence is not None:
            request["MinConfidence"] = float(self.min_confidence)
        response = self._call(request, budget)
        return boxes_of(response, SightNames(sights, self.aliases), width, height)

    def _call(self, request: dict[str, Any], budget: CallBudget) -> dict[str, Any]:
        for attempt in range(1, self.max_attempts + 1):
            if not budget.take():
                raise BudgetExhaustedError()
            try:
                response: dict[str, Any] = self.client.detect_custom_labels(**request)
                return response
            except (EndpointConnectionError, ConnectTimeoutError) as exc:  # the request never left
                budget.refund()
                raise LabellerUnavailableError(f"Rekognition cannot be reached: {exc}") from exc
            except HTTPClientError as exc:  # sent, no answer: the call counts
                raise LabellerUnavailableError(f"Rekognition did not answer: {exc}") from exc
            except NoCredentialsError:
                budget.refund()
                raise LabellerUnavailableError(
                    "no AWS credentials for Rekognition: set AWS_PROFILE (or AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY), or run where an instance role gives them"
                ) from None
            except ParamValidationError as exc:
                budget.refund()
                raise UserError(f"a DetectCustomLabels request this labeller cannot send: {exc}") from exc
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code, message = str(error.get("Code", "")), str(error.get("Message", ""))
                if code in RETRYABLE and attempt < self.max_attempts:
                    self.sleep(self._pause(attempt))
                    continue
                if code in RETRYABLE:
                    raise LabellerUnavailableError(
                        f"Rekognition throttled {attempt} calls in a row ({code}); try again later"
                    ) from None
                if code in REJECTED:
                    raise ImageRejectedError(f"Rekognition rejected the image: {code}: {message}") from None
                raise LabellerUnavailableError(
                    f"Rekognition refused DetectCustomLabels with {self.project_version_arn}: {code}: "
                    f"{message} (is the model version running, and may this role call it?)"
                ) from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _pause(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th throttled call: doubling, capped, half of it jittered."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def sendable(image: bytes, picture: Image.Image) -> bytes:
    """``image`` as DetectCustomLabels takes it: PNG or JPEG bytes as they are when at most 4 MB and not
    turned by an EXIF orientation; anything else re-encoded as JPEG from ``picture`` (orientation applied,
    so the answer's ratios are of the pixels the boxes are stored in), shrunk until it fits."""
    if (
        len(image) <= MAX_IMAGE_BYTES
        and (image.startswith(_PNG) or image.startswith(_JPEG))
        and Image.open(io.BytesIO(image)).getexif().get(_ORIENTATION, 1) == 1
    ):
        return image
    rgb = picture.convert("RGB")
    while True:
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=90)
        if out.tell() <= MAX_IMAGE_BYTES:
            return out.getvalue()
        rgb = rgb.resize((max(1, rgb.width * 3 // 4), max(1, rgb.height * 3 // 4)), Image.Resampling.BILINEAR)


def boxes_of(response: Mapping[str, Any], sights: SightNames, width: int, height: int) -> list[Box]:
    """The boxes of a DetectCustomLabels response naming one of ``sights``, in pixels of a ``width`` x
    ``height`` image, scored ``Confidence / 100``. Labels without a box (image classification models) and
    unknown names are left out."""
    boxes = []
    for item in response.get("CustomLabels") or []:
        sight = sights.match(str(item.get("Name", "")))
        where = (item.get("Geometry") or {}).get("BoundingBox")
        if sight is None or not where:
            continue
        left, top, w, h = (float(where.get(k, math.nan)) for k in ("Left", "Top", "Width", "Height"))
        confidence = item.get("Confidence")
        score = None if confidence is None else float(confidence) / 100
        boxes.append(Box(sight, left * width, top * height, (left + w) * width, (top + h) * height, score))
    kept, _ = labels.clip_boxes(boxes, width, height)
    return kept
