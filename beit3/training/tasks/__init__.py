"""The fine-tuning tasks, one module each, and ``TASKS``: {name: task class}, the registry the training programs read.

A new task is its ``TaskSpec`` in ``beit3/task_catalogue.py`` (what it is: name, head, metric, files, ``beit3
predict``) and one module here, ``<task>.py``, whose ``FinetuneTask`` subclass of that spec carries
``@register_task`` (see ``base.py`` for what it declares), plus its script ``tasks/<task>.py`` and configs
``configs/tasks/<task>_*.yaml`` for users; every module of this package is imported below. A task of another package
registers through an entry point of the group ``beit3.tasks`` (``toy = my_package.toy:ToyTask``, in that package's
metadata): importing it is enough, its class registers itself as its own spec and its training.
"""

from __future__ import annotations

import importlib
import pkgutil

from ...task_catalogue import ENTRY_POINT_GROUP, load_outside_tasks
from .base import TASKS, EvalOptions, FinetuneTask, TaskData, register_task

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
load_outside_tasks()


def task_named(name: str) -> type[FinetuneTask]:
    """The task called ``name``, or by its ``beit3 predict`` verb (``caption``: captioning); KeyError names the
    known ones."""
    for task_class in TASKS.values():
        if name in (task_class.name, task_class.predict_verb):
            return task_class
    raise KeyError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")


__all__ = ["ENTRY_POINT_GROUP", "TASKS", "EvalOptions", "FinetuneTask", "TaskData", "register_task", "task_named"]
