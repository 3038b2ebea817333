"""What the catalog API answers: the bodies of its responses (pydantic models, for the OpenAPI document), the
warehouse's rows as those bodies, and a city's live status."""

from __future__ import annotations

import datetime as dt
from typing import Any, Generic, TypeVar

import psycopg
from pydantic import BaseModel, Field, StrictStr

from services.sight_catalog import warehouse

T = TypeVar("T")


class CityOut(BaseModel):
    """A city."""

    id: int
    name: str
    slug: str
    url: str = Field(description="this city's resource (by slug)")
    requested_by: str | None
    label_budget: int = Field(description="external labelling calls the city may spend")
    label_calls_used: int
    created_at: dt.datetime


class CityStatus(BaseModel):
    """Where a city stands (live counts)."""

    state: str = Field(description="no-images | collecting | training | ready")
    sights: int
    images: int
    labelled_images: int = Field(description="images some labeller has looked at")
    labels: int = Field(description="boxes drawn on its images")
    model_version: int | None = Field(description="the newest READY model's version (what recognitions use)")
    training: bool = Field(description="a model version is training now")
    training_version: int | None


class CityDetail(CityOut):
    """A city and its status."""

    status: CityStatus


class SightOut(BaseModel):
    """A sight of a city (a class name of its models)."""

    id: int
    name: str
    created_at: dt.datetime


class ImageOut(BaseModel):
    """An image of a city, stored once by MD5 in the datasets bucket."""

    id: int
    sight_id: int | None
    md5: str
    media_type: str
    width: int
    height: int
    size_bytes: int
    held_out: bool
    source: str
    created_at: dt.datetime


class UploadOut(BaseModel):
    """An uploaded photo: the image stored (or the one the city held already, ``duplicate``)."""

    duplicate: bool
    image: ImageOut


class ModelOut(BaseModel):
    """A city's model version."""

    version: int
    status: str = Field(description="TRAINING | READY | FAILED")
    registry_name: str
    registry_version: int | None
    classes: list[str] = Field(description="the sight names it finds")
    images: int = Field(description="images it was trained on")
    metrics: dict[str, Any]
    reason: str | None = Field(description="why it failed")
    training_job_id: str
    created_at: dt.datetime
    updated_at: dt.datetime


class Page(BaseModel, Generic[T]):
    """A page of a listing; ``next`` (null on the last page) is the URL of the next one."""

    items: list[T]
    next: str | None


class BoxOut(BaseModel):
    """A box in the photo's pixels (EXIF orientation applied): x0 < x1, y0 < y1."""

    x0: float
    y0: float
    x1: float
    y1: float


class FoundOut(BaseModel):
    """A sight on the photo."""

    sight: str
    score: float
    box: BoxOut


class ModelRef(BaseModel):
    """The model version that looked."""

    version: int
    registry_name: str
    registry_version: int | None


class CityRef(BaseModel):
    """Which city."""

    id: int
    name: str
    slug: str


class RecognitionOut(BaseModel):
    """The sights found on a photo, best first."""

    city: CityRef
    model: ModelRef
    width: int
    height: int
    sights: list[FoundOut]


class CityRequest(BaseModel):
    """A city to collect."""

    name: StrictStr = Field(description="the city's name, 1 to 100 characters (any text: it is never parsed)")


class Health(BaseModel):
    """The process is up / the database answers."""

    status: str


def city_out(city: warehouse.City) -> dict[str, Any]:
    return {
        "id": city.id,
        "name": city.name,
        "slug": city.slug,
        "url": f"/api/cities/{city.slug}",
        "requested_by": city.requested_by,
        "label_budget": city.label_budget,
        "label_calls_used": city.label_calls_used,
        "created_at": city.created_at,
    }


def image_out(image: warehouse.Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "sight_id": image.sight_id,
        "md5": image.md5,
        "media_type": image.media_type,
        "width": image.width,
        "height": image.height,
        "size_bytes": image.size_bytes,
        "held_out": image.held_out,
        "source": image.source,
        "created_at": image.created_at,
    }


def model_out(model: warehouse.Model) -> dict[str, Any]:
    return {
        "version": model.version,
        "status": model.status,
        "registry_name": model.registry_name,
        "registry_version": model.registry_version,
        "classes": [str(c) for c in model.classes],
        "images": model.images,
        "metrics": model.metrics,
        "reason": model.reason,
        "training_job_id": model.training_job_id,
        "created_at": model.created_at,
        "updated_at": model.updated_at,
    }


def city_status(conn: psycopg.Connection[Any], city: warehouse.City) -> dict[str, Any]:
    """The city's live status (see :class:`CityStatus`)."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM sight_sights WHERE city_id = %(city)s),"
        " (SELECT count(*) FROM sight_images WHERE city_id = %(city)s),"
        " (SELECT count(*) FROM sight_images i WHERE i.city_id = %(city)s"
        "   AND EXISTS (SELECT 1 FROM sight_labellings l WHERE l.image_id = i.id)),"
        " (SELECT count(*) FROM sight_labels b JOIN sight_images i ON i.id = b.image_id"
        "   WHERE i.city_id = %(city)s)",
        {"city": city.id},
    ).fetchone()
    sights, images, labelled, boxes = (int(v) for v in row) if row else (0, 0, 0, 0)
    ready = warehouse.ready_model(conn, city.id)
    training = warehouse.training_model(conn, city.id)
    if ready is not None:
        state = "ready"
    elif training is not None:
        state = "training"
    elif images:
        state = "collecting"
    else:
        state = "no-images"
    return {
        "state": state,
        "sights": sights,
        "images": images,
        "labelled_images": labelled,
        "labels": boxes,
        "model_version": None if ready is None else ready.version,
        "training": training is not None,
        "training_version": None if training is None else training.version,
    }
