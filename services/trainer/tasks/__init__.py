"""The task table: every task the trainer knows, by the name jobs use, imported only when asked for.

Each entry is a module path; the module defines one class whose ``name`` is the task's name (or a module
attribute ``TASK`` naming that class). Importing lazily keeps ``tessera --help`` quick and lets a task whose
module is missing fail with a message naming it, while the others work.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from services.errors import UserError
from services.trainer.task import Task

#: Task name -> module that implements it.
TASKS: dict[str, str] = {
    "detector": "services.trainer.tasks.detector",
    "dcgan": "services.trainer.tasks.dcgan",
    "classifier": "services.trainer.tasks.classifier",
    "sky-position": "services.trainer.tasks.sky_position",
}


def task_names() -> list[str]:
    """The names jobs may use, sorted."""
    return sorted(TASKS)


def task_class(name: str) -> type[Any]:
    """The class implementing task ``name``; UserError for an unknown name or a module that is missing."""
    module_path = TASKS.get(name) or TASKS.get(name.replace("_", "-"))
    if module_path is None:
        raise UserError(f"unknown task {name!r}; the tasks are {', '.join(task_names())}")
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name and module_path.startswith(exc.name):
            raise UserError(
                f"task {name!r} is listed but its module {module_path} is not installed in this build"
            ) from None
        raise
    explicit = getattr(module, "TASK", None)
    if inspect.isclass(explicit):
        return explicit
    for _, candidate in inspect.getmembers(module, inspect.isclass):
        spelled = getattr(candidate, "name", None)
        if candidate.__module__ == module.__name__ and spelled in {
            name,
            name.replace("_", "-"),
            name.replace("-", "_"),
        }:
            return candidate
    raise UserError(f"module {module_path} defines no task class whose name is {name!r}")


def make_task(name: str) -> Task:
    """A fresh instance of task ``name``."""
    task: Task = task_class(name)()
    return task
