"""Ray Data engine (``--engine ray``): the build's tasks as a Ray Data pipeline, on a local instance or a cluster.

Each task becomes one item (one block) of a Ray ``Dataset``: the task id plus its pickled rows, or just a row range
when the source has cheap random access. ``Dataset.map`` runs :func:`mmdata.task.run_task` on it as a Ray task,
at most ``num_proc`` at a time, with the :class:`~mmdata.task.TaskContext` as its argument (Ray ships it through the object
store); the driver streams the returned stats. Tasks write their files and completion markers exactly as with the
local engine, so the output is byte-identical and resume, ``--shard`` and ``mmdata merge`` work the same.

Where it runs: ``ray.init()`` connects to ``RAY_ADDRESS`` when it is set (``auto`` on a cluster node, or
``ray://head:10001``); otherwise it starts a local instance with ``num_proc`` CPUs and stops it at the end. An
instance already started by the caller (``ray.init(...)`` before ``build``) is used as is. On a cluster every node
needs mmdata installed and the recipe's source paths and ``output.dir`` on a shared filesystem (see docs/scale.md).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterable, Iterator

from ..errors import BuildError
from ..task import RowRange, TaskContext, TaskStats, run_task

#: Tasks whose rows travel with them are submitted this many per worker at a time (bounded driver memory);
#: row-range tasks are a few bytes each and go in windows of ``RANGE_WINDOW``.
ROWS_WINDOW_PER_WORKER = 4
RANGE_WINDOW = 100_000


def run_ray(ctx: TaskContext, tasks: Iterable[tuple[int, list | RowRange]], num_proc: int) -> Iterator[TaskStats]:
    """Run ``tasks`` on Ray Data, at most ``num_proc`` at a time; yields each task's stats as it finishes."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise BuildError("engine ray needs Ray Data: pip install 'mmdata[ray]'") from None
    started = _connect(ray, num_proc)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the build's own tqdm bar reports progress
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        for window in _windows(tasks, ROWS_WINDOW_PER_WORKER * max(1, num_proc)):
            items = [{"task": task, "payload": pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)}
                     for task, rows in window]
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(
                _run_item, fn_args=(ctx,), num_cpus=1, **_at_most(ray, max(1, min(num_proc, len(items)))),
            )
            for row in dataset.iter_rows():
                yield TaskStats.from_json(json.loads(row["stats"]))
    finally:
        if started:
            ray.shutdown()


def _run_item(item: dict, ctx: TaskContext) -> dict:
    """One Dataset item = one task: run it (it writes its files and marker), return its stats as JSON."""
    stats = run_task(ctx, int(item["task"]), pickle.loads(item["payload"]))
    return {"stats": json.dumps(stats.to_json())}


def _at_most(ray, n: int) -> dict:
    """``n`` concurrent tasks: ``compute=TaskPoolStrategy(n)`` on current Ray, ``concurrency=n`` on older ones."""
    strategy = getattr(ray.data, "TaskPoolStrategy", None)
    return {"compute": strategy(size=n)} if strategy is not None else {"concurrency": n}


def _connect(ray, num_proc: int) -> bool:
    """Use a running instance, else ``RAY_ADDRESS``, else start a local one; True when this call started it."""
    if ray.is_initialized():
        return False
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=max(1, num_proc), include_dashboard=False)
    ray.init(**kwargs)
    return True


def _windows(tasks: Iterable[tuple[int, list | RowRange]], rows_window: int) -> Iterator[list]:
    """Group tasks for submission: few at a time when rows travel with them, many when they are row ranges."""
    window: list = []
    for task, rows in tasks:
        window.append((task, rows))
        if len(window) >= (RANGE_WINDOW if isinstance(rows, RowRange) else rows_window):
            yield window
            window = []
    if window:
        yield window
