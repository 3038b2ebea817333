"""The sight catalog's refresher: one pass over every city, what ``tessera worker sight-catalog`` repeats.

A pass (:meth:`Refresher.run_pass`)

1. **collects** finished trainings (:func:`~services.sight_catalog.training.collect`): a model the registry
   holds becomes READY (so this pass already labels with it), one trained too long ago FAILED;
2. **refreshes** the data marts and reads the city mart (a pass with no city does nothing more);
3. **labels** (:func:`~services.sight_catalog.labelling.label_city`, up to
   :attr:`RefresherSettings.label_images` images a city): cities with images nobody labelled, those never
   labelled first, then those with the most images waiting, until :attr:`RefresherSettings.label_cities`
   cities were labelled. A city's labeller is its newest READY model (:class:`DetectorLabeller`), else
   Amazon Rekognition when TESSERA_REKOGNITION_PROJECT_VERSIONS names a model version for the city; else
   the city is skipped, and so is a city whose budget of paid calls is used up (neither counts against the
   cap);
4. **trains** (:func:`~services.sight_catalog.training.start_training`) up to
   :attr:`RefresherSettings.train_cities` cities not training already that have labels newer than their
   newest model and enough of them (:func:`~services.sight_catalog.training.plan_training`): cities without
   a model first, then those with the most labels.

What a pass did is its :class:`PassSummary`, skipped cities with their reason. An error in one city is
logged and recorded in the summary, and the pass goes on with the next; an error that says the database,
S3 or SQS cannot be reached (:func:`~services.jobs.queue_worker.outage`) ends the pass, raised, for the
worker to back off and try again. ``should_stop`` is asked between cities: a pass asked to stop ends after
the city in hand. A city's name is only ever shown: ``True``, ``0`` or ``None`` are cities like any other.

Settings (:meth:`RefresherSettings.from_env`): ``TESSERA_CATALOG_LABEL_CITIES`` (default 5),
``TESSERA_CATALOG_LABEL_IMAGES`` (50), ``TESSERA_CATALOG_TRAIN_CITIES`` (2), and the training's
(:class:`~services.sight_catalog.training.TrainingSettings`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import psycopg

from services.cloud import objects
from services.errors import UserError
from services.jobs.queue_worker import outage
from services.sight_catalog import labels, warehouse
from services.sight_catalog.labelling import (
    DetectorLabeller,
    ImageStore,
    Labeller,
    LabelRun,
    S3ImageStore,
    label_city,
)
from services.sight_catalog.rekognition import RekognitionLabeller, project_version_arn, rekognition_client
from services.sight_catalog.training import (
    Collected,
    Started,
    TrainingSettings,
    collect,
    due_for_training,
    plan_training,
    start_training,
)
from services.sight_catalog.warehouse import City, CityMart

log = logging.getLogger(__name__)
T = TypeVar("T")

LABEL_CITIES_ENV = "TESSERA_CATALOG_LABEL_CITIES"
LABEL_IMAGES_ENV = "TESSERA_CATALOG_LABEL_IMAGES"
TRAIN_CITIES_ENV = "TESSERA_CATALOG_TRAIN_CITIES"

#: Chooses a city's labeller: the labeller, or why the city has none now (it is skipped).
LabellerChoice = Callable[[psycopg.Connection[Any], City], Labeller | str]


@dataclass(frozen=True)
class RefresherSettings:
    """How much one pass does (see the module doc), and how the city's trainings go."""

    label_cities: int = 5
    label_images: int = 50
    train_cities: int = 2
    providers: str = "auto"
    training: TrainingSettings = field(default_factory=TrainingSettings)

    def __post_init__(self) -> None:
        for name in ("label_cities", "label_images", "train_cities"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name} must be a whole number of 0 or more, got {value!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RefresherSettings:
        """Settings from the environment (see the module doc); ``overrides`` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for key, name in (
            ("label_cities", LABEL_CITIES_ENV),
            ("label_images", LABEL_IMAGES_ENV),
            ("train_cities", TRAIN_CITIES_ENV),
        ):
            text = env.get(name, "").strip()
            if text:
                try:
                    values[key] = int(text)
                except ValueError:
                    raise UserError(f"{name} must be a whole number, got {text!r}") from None
        if "training" not in overrides:
            values["training"] = TrainingSettings.from_env(env)
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class Skipped:
    """A city a step passed over, and why."""

    city_id: int
    name: str
    reason: str


@dataclass(frozen=True)
class CityError:
    """An error a step met in a city (``city_id`` None: in no city, e.g. while collecting)."""

    city_id: int | None
    name: str
    stage: str
    error: str


@dataclass
class PassSummary:
    """What one pass did (see the module doc)."""

    cities: int = 0
    collected: Collected = field(default_factory=Collected)
    labelled: list[LabelRun] = field(default_factory=list)
    label_skipped: list[Skipped] = field(default_factory=list)
    trained: list[Started] = field(default_factory=list)
    train_skipped: list[Skipped] = field(default_factory=list)
    errors: list[CityError] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0

    @property
    def idle(self) -> bool:
        """Whether the pass changed nothing and met no error."""
        return not (
            any(run.labelled or run.failed for run in self.labelled)
            or self.trained
            or self.collected.ready
            or self.collected.failed
            or self.errors
        )

    def line(self) -> str:
        """One line for the log."""
        images = sum(run.labelled for run in self.labelled)
        collected = self.collected
        text = (
            f"{self.cities} cities; collected {len(collected.ready)} ready, {len(collected.failed)} failed, "
            f"{collected.waiting} training; labelled {images} images in {len(self.labelled)} cities "
            f"({len(self.label_skipped)} skipped); started {len(self.trained)} trainings; "
            f"{len(self.errors)} errors; {self.seconds:.1f} s"
        )
        return f"{text}; stopped early" if self.stopped_early else text


def cities_to_label(marts: Sequence[CityMart]) -> list[CityMart]:
    """Cities with images nobody labelled: never labelled first, then the most images waiting, then by id."""
    waiting = [c for c in marts if c.unlabelled_images > 0]
    return sorted(waiting, key=lambda c: (c.last_labelled_at is not None, -c.unlabelled_images, c.city_id))


def cities_to_train(marts: Sequence[CityMart], min_images: int) -> list[CityMart]:
    """Cities that may be ready to train (not training, ``min_images`` labelled): those without a READY
    model first, then the most labels, then by id. Whether they are is :func:`due_for_training`'s and
    :func:`plan_training`'s to say."""
    candidates = [c for c in marts if not c.training and c.labelled_images >= min_images]
    return sorted(candidates, key=lambda c: (c.model_version is not None, -c.labels, c.city_id))


class Refresher:
    """Runs passes (see the module doc) with one set of clients and a cache of the cities' detectors.

    ``labellers`` replaces how a city's labeller is chosen (:meth:`choose_labeller`); ``should_stop`` is
    asked between cities.
    """

    def __init__(
        self,
        settings: RefresherSettings,
        *,
        store: ImageStore | None = None,
        s3: Any = None,
        sqs: Any = None,
        labellers: LabellerChoice | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.s3 = s3 if s3 is not None else objects.s3_client()
        self.sqs = sqs
        self._store = store
        self.labellers: LabellerChoice = labellers or self.choose_labeller
        self.should_stop = should_stop or (lambda: False)
        self._detectors: dict[int, tuple[tuple[str, int | None], DetectorLabeller]] = {}
        self._rekognition: Any = None

    @property
    def store(self) -> ImageStore:
        """Where the images are (the datasets bucket), made when first needed."""
        if self._store is None:
            self._store = S3ImageStore(self.settings.training.datasets_bucket, client=self.s3)
        return self._store

    def run_pass(self, conn: psycopg.Connection[Any]) -> PassSummary:
        """One pass (see the module doc); ``conn`` must be autocommit."""
        started = time.monotonic()
        summary = PassSummary()
        collected = self._guard(summary, None, "", "collect", lambda: collect(conn, self.settings.training))
        if collected is not None:
            summary.collected = collected
        warehouse.refresh_marts(conn)
        marts = warehouse.all_city_marts(conn)
        summary.cities = len(marts)
        if marts:
            self._label(conn, marts, summary)
            if not summary.stopped_early:
                if any(run.labelled for run in summary.labelled):
                    warehouse.refresh_marts(conn)
                    marts = warehouse.all_city_marts(conn)
                self._train(conn, marts, summary)
        if summary.trained or summary.collected.ready or summary.collected.failed:
            warehouse.refresh_marts(conn)
        summary.seconds = time.monotonic() - started
        log.info("refresher pass: %s", summary.line())
        return summary

    def choose_labeller(self, conn: psycopg.Connection[Any], city: City) -> Labeller | str:
        """The city's newest READY model (loaded from the models bucket, kept while it stays the newest),
        else Rekognition with the city's Custom Labels model version; else why there is none."""
        model = warehouse.ready_model(conn, city.id)
        if model is not None and model.model_uri is not None:
            key = (model.registry_name, model.registry_version)
            cached = self._detectors.get(city.id)
            if cached is not None and cached[0] == key:
                return cached[1]
            detector = DetectorLabeller.open(
                objects.read_object(model.model_uri, self.s3),
                version=model.registry_version or model.version,
                name=model.registry_name,
                providers=self.settings.providers,
            )
            self._detectors[city.id] = (key, detector)
            return detector
        try:
            arn = project_version_arn(city.slug)
        except UserError as exc:
            return f"no READY model, and {exc}"
        if self._rekognition is None:
            self._rekognition = rekognition_client()
        return RekognitionLabeller(arn, client=self._rekognition)

    def _label(self, conn: psycopg.Connection[Any], marts: Sequence[CityMart], summary: PassSummary) -> None:
        cap = self.settings.label_cities
        for mart in cities_to_label(marts):
            if len(summary.labelled) >= cap:
                return
            if self.should_stop():
                summary.stopped_early = True
                return
            self._guard(
                summary, mart.city_id, mart.name, "label", partial(self._label_city, conn, mart, summary)
            )

    def _label_city(self, conn: psycopg.Connection[Any], mart: CityMart, summary: PassSummary) -> None:
        city = warehouse.city_by_id(conn, mart.city_id)
        labeller = self.labellers(conn, city)
        if isinstance(labeller, str):
            summary.label_skipped.append(Skipped(city.id, city.name, labeller))
            log.info("city %s (%r) not labelled: %s", city.id, city.name, labeller)
            return
        if labeller.external:
            budget = labels.budget_of(conn, city.id)
            if budget.remaining <= 0:
                reason = (
                    f"its budget of {budget.budget} calls to {labeller.name} is used up; raise it to label "
                    f"its {mart.unlabelled_images} waiting images"
                )
                summary.label_skipped.append(Skipped(city.id, city.name, reason))
                log.info("city %s (%r) not labelled: %s", city.id, city.name, reason)
                return
        # Only images nobody labelled: a new model version must not relabel, ahead of the new images, what
        # a person, Rekognition or an earlier version labelled.
        run = label_city(
            conn, city.id, labeller, self.store, limit=self.settings.label_images, unlabelled_only=True
        )
        summary.labelled.append(run)

    def _train(self, conn: psycopg.Connection[Any], marts: Sequence[CityMart], summary: PassSummary) -> None:
        settings = self.settings.training
        for mart in cities_to_train(marts, settings.min_images):
            if len(summary.trained) >= self.settings.train_cities:
                return
            if self.should_stop():
                summary.stopped_early = True
                return
            self._guard(
                summary, mart.city_id, mart.name, "train", partial(self._train_city, conn, mart, summary)
            )

    def _train_city(self, conn: psycopg.Connection[Any], mart: CityMart, summary: PassSummary) -> None:
        settings = self.settings.training
        city = warehouse.city_by_id(conn, mart.city_id)
        why_not = due_for_training(conn, city, settings)
        plan = None
        if why_not is None:
            plan = plan_training(conn, city, settings)
            why_not = plan.reason
        if why_not is not None or plan is None:
            summary.train_skipped.append(Skipped(city.id, city.name, why_not or "not ready"))
            log.info("city %s (%r) not trained: %s", city.id, city.name, why_not)
            return
        started = start_training(conn, city, settings, plan=plan, store=self.store, s3=self.s3, sqs=self.sqs)
        summary.trained.append(started)

    def _guard(
        self, summary: PassSummary, city_id: int | None, name: str, stage: str, step: Callable[[], T]
    ) -> T | None:
        """``step()``; an error that is not an outage is logged and recorded, and None returned."""
        try:
            return step()
        except Exception as exc:
            if outage(exc) is not None:
                raise
            where = f"city {city_id} ({name!r})" if city_id is not None else "the refresher"
            if isinstance(exc, UserError):
                log.warning("%s: %s failed: %s", where, stage, exc)
            else:
                log.exception("%s: %s failed", where, stage)
            summary.errors.append(CityError(city_id, name, stage, f"{type(exc).__name__}: {exc}"))
            return None
