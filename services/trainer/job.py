"""The training job: what to train, on what, for how long, and where the results go, as versioned JSON.

An example (``task``, ``dataset`` and ``output`` are required; give ``epochs`` or ``steps``, not both)::

    {
      "schema": "tessera.training-job/v1",
      "job_id": "ships-2026-07-01",
      "task": "detector",
      "dataset": "s3://datasets/ships/",
      "params": {"batch_size": 16, "seed": 3},
      "steps": 2000,
      "checkpoint_every": 200,
      "output": "s3://models/ships/run-1/",
      "register": {"name": "ships"},
      "device": "auto"
    }

``dataset`` is an S3 prefix (fetched into a local cache first), a local directory, or a word a task knows
(the detector's ``"synthetic"``). ``output`` is the job's own S3 prefix or local directory: checkpoints,
the ONNX model, curves, pictures, TensorBoard logs and metrics land there, and a restarted job finds its
checkpoints there. ``params`` are the task's hyper-parameters (checked by the task). Unknown fields and bad
values raise one :class:`~services.errors.UserError` listing every problem with its JSON path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.jobs import trust
from services.jobs.documents import (
    NAME_PATTERN,
    DocumentChecker,
    is_int,
    kind,
    load_document,
    s3_url_problem,
)
from services.jobs.trust import policy_in_force

SCHEMA = "tessera.training-job/v1"
#: The dataset a task generates itself (``services.trainer.storage.SYNTHETIC``).
SYNTHETIC_DATASET = "synthetic"
DEVICES = ("auto", "cpu", "cuda", "hpu")
#: Checkpoints every this many optimiser steps unless the job says otherwise.
DEFAULT_CHECKPOINT_EVERY = 500
MAX_STEPS = 100_000_000
_TOP = (
    "schema",
    "job_id",
    "task",
    "dataset",
    "params",
    "epochs",
    "steps",
    "checkpoint_every",
    "output",
    "register",
    "device",
)


@dataclass(frozen=True)
class TrainingJob:
    """A validated training job. Exactly one of ``epochs`` and ``steps`` is set."""

    job_id: str
    task: str
    dataset: str
    output: str
    params: Mapping[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    steps: int | None = None
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    register_name: str | None = None
    device: str = "auto"

    def to_json(self) -> dict[str, Any]:
        """The job as JSON with every default written out (what is queued and stored with the job)."""
        body: dict[str, Any] = {
            "schema": SCHEMA,
            "job_id": self.job_id,
            "task": self.task,
            "dataset": self.dataset,
            "params": dict(self.params),
        }
        if self.epochs is not None:
            body["epochs"] = self.epochs
        if self.steps is not None:
            body["steps"] = self.steps
        body["checkpoint_every"] = self.checkpoint_every
        body["output"] = self.output
        if self.register_name is not None:
            body["register"] = {"name": self.register_name}
        body["device"] = self.device
        return body


def _dataset_prefix(value: str, policy: trust.TrustPolicy) -> str:
    trust.s3_location(value, policy, what="the dataset", prefix=True)
    return value


def _dataset_directory(value: str, policy: trust.TrustPolicy) -> str:
    return trust.source(value, policy, what="the dataset")


def parse_job(data: str | bytes | Mapping[str, Any]) -> TrainingJob:
    """Validate a training job (JSON text or a decoded object); UserError lists every problem."""
    return _Checker("the training job").job(load_document(data, "the training job"))


class _Checker(DocumentChecker):
    """The training job's fields (see the module doc)."""

    def job(self, data: Mapping[str, Any]) -> TrainingJob:
        job_id = self.header(data, fields=_TOP, schema=SCHEMA, reader="this trainer")
        task = data.get("task")
        if task is None:
            self.problem("$.task", "required: the task to train (e.g. detector, dcgan, classifier)")
        elif not isinstance(task, str) or not NAME_PATTERN.match(task):
            self.problem("$.task", f"must be a task name, got {kind(task)}")
        dataset = self.location(
            "$.dataset", data.get("dataset"), "the dataset: an s3:// prefix or a path", writes=False
        )
        output = self.location(
            "$.output",
            data.get("output"),
            "where results go: s3://bucket/prefix or a local directory",
            writes=True,
        )
        params = data.get("params", {})
        if not isinstance(params, Mapping):
            self.problem("$.params", f"must be an object of the task's hyper-parameters, got {kind(params)}")
            params = {}
        epochs, steps = data.get("epochs"), data.get("steps")
        if epochs is None and steps is None:
            self.problem("$.epochs", "give epochs or steps: how long to train")
        if epochs is not None and steps is not None:
            self.problem("$.steps", "give epochs or steps, not both")
        for path, value in (("$.epochs", epochs), ("$.steps", steps)):
            if value is not None and (not is_int(value) or not 1 <= value <= MAX_STEPS):
                self.problem(path, f"must be a whole number 1..{MAX_STEPS}, got {kind(value)}")
        every = data.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
        if not is_int(every) or not 1 <= every <= MAX_STEPS:
            self.problem("$.checkpoint_every", f"must be a whole number of steps >= 1, got {kind(every)}")
        register_name = self.register(data.get("register"))
        device = data.get("device", "auto")
        if device not in DEVICES:
            self.problem("$.device", f"must be one of {', '.join(DEVICES)}, got {kind(device)}")
        self.done()
        return TrainingJob(
            job_id=str(job_id),
            task=str(task),
            dataset=dataset,
            output=output,
            params=dict(params),
            epochs=epochs,
            steps=steps,
            checkpoint_every=int(every),
            register_name=register_name,
            device=str(device),
        )

    def location(self, path: str, value: Any, what: str, *, writes: bool) -> str:
        """A dataset (``writes`` False) or output location: its form, then the trust policy in force
        (:func:`~services.jobs.trust.policy_in_force`): a queued job reads and writes only the deployment's
        buckets, and local paths only under the worker's configured roots; ``tessera train`` here, any."""
        if value is None:
            self.problem(path, f"required: {what}")
            return ""
        if not isinstance(value, str) or not value.strip():
            self.problem(path, f"must be {what}, got {kind(value)}")
            return ""
        if "://" in value:
            if not value.startswith("s3://"):
                self.problem(path, f"{value!r}: only s3:// URLs and local paths are read")
                return value
            if (problem := s3_url_problem(value)) is not None:
                self.problem(path, problem)
                return value
        if value == SYNTHETIC_DATASET and not writes:
            return value  # generated by the task: nothing is read
        if value.startswith("s3://"):
            check = trust.output_s3 if writes else _dataset_prefix
        else:
            check = trust.output_directory if writes else _dataset_directory
        confined = self.trusted(path, check, value, policy_in_force())
        return value if confined is None else confined

    def register(self, register: Any) -> str | None:
        if register is None:
            return None
        if not isinstance(register, Mapping):
            self.problem("$.register", f'must be an object {{"name": MODEL_NAME}}, got {kind(register)}')
            return None
        self.unknown_fields("$.register", register, ("name",))
        return self.name("$.register.name", register.get("name"))
