"""The local engine: tasks in this process, or in a forked process pool with a bounded number in flight."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from ..task import RowRange, TaskContext, TaskStats, run_task

_WORKER_CTX: TaskContext | None = None


def _init_worker(ctx: TaskContext, parent: int | None = None) -> None:
    global _WORKER_CTX
    _WORKER_CTX = ctx
    if parent is not None:
        _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: a worker gets SIGKILL when the build process dies (``kill -9``), so no orphan keeps writing files
    while the build is resumed."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def _run_in_worker(task: int, rows: list[tuple[int, dict]] | RowRange) -> TaskStats:
    assert _WORKER_CTX is not None
    return run_task(_WORKER_CTX, task, rows)


def run_local(ctx: TaskContext, tasks: Iterable[tuple[int, list | RowRange]], num_proc: int) -> Iterator[TaskStats]:
    """Run tasks in this process (``num_proc == 1``) or a forked process pool with a bounded number in flight."""
    if num_proc <= 1:
        for task, rows in tasks:
            yield run_task(ctx, task, rows)
        return
    import multiprocessing

    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork"),
                             initializer=_init_worker, initargs=(ctx, os.getpid())) as pool:
        pending = set()
        for task, rows in tasks:
            pending.add(pool.submit(_run_in_worker, task, rows))
            if len(pending) >= 2 * num_proc:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        for fut in pending:
            yield fut.result()
