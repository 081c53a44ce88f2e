"""Engines that run a build's tasks somewhere other than this process's pool.

An engine is one function ``run(ctx, tasks, num_proc) -> Iterator[TaskStats]``: it receives the
:class:`~mmdata.pipeline.TaskContext` and an iterator of ``(task, rows)`` pairs (rows are ``(position, row)`` pairs or
a :class:`~mmdata.pipeline.RowRange` the worker reads itself), calls :func:`~mmdata.pipeline.run_task` on each, and
yields the stats in any order. Tasks write their own files and completion markers, so an engine decides only *where*
tasks run, never *what* they write: every engine gives the same bytes. The local process pool lives in
``mmdata.pipeline.run_local``; ``ray`` is in :mod:`mmdata.engines.ray` (optional extra ``mmdata[ray]``).
"""
