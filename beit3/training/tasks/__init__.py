"""The fine-tuning tasks, one module each, and ``TASKS``: {name: task class}, the registry every program reads.

A new task is one module here, ``<task>.py``, whose ``FinetuneTask`` subclass carries ``@register_task`` (see
``base.py`` for what it declares), plus its script ``tasks/<task>.py`` and configs ``configs/tasks/<task>_*.yaml``
for users; every module of this package is imported below, so nothing else is edited. A task of another package
registers through an entry point of the group ``beit3.tasks`` (``toy = my_package.toy:ToyTask``, in that package's
metadata): importing it is enough, its class registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from .base import TASKS, EvalOptions, FinetuneTask, TaskData, register_task

ENTRY_POINT_GROUP = "beit3.tasks"

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
for _entry in entry_points(group=ENTRY_POINT_GROUP):
    _entry.load()  # (its module's @register_task does the registering)


def task_named(name: str) -> type[FinetuneTask]:
    """The task called ``name``, or by its ``beit3 predict`` verb (``caption``: captioning); KeyError names the
    known ones."""
    for task_class in TASKS.values():
        if name in (task_class.name, task_class.predict_verb):
            return task_class
    raise KeyError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")


__all__ = ["ENTRY_POINT_GROUP", "TASKS", "EvalOptions", "FinetuneTask", "TaskData", "register_task", "task_named"]
