"""Spawned worker processes that carry the parent's plug-ins and end with it.

The suites run their environments in worker processes (:mod:`audit.protocol`) and the
report draws its episode strips in one (:mod:`audit.html_report`). Both need the same
three things, which :func:`pool` gives: the ``spawn`` start method (a forked JAX
runtime is unsafe), the plug-ins this process loaded (``audit --plugin``: a worker
starts bare, and a suite or environment registered by a plug-in must resolve there
too), and no worker left computing once the parent stops: on an exception,
``KeyboardInterrupt`` or the CLI's ``Stopped`` the workers are terminated, not left to
finish their work (and killed if they have not exited after :data:`STOP_SECONDS`), and
a worker whose parent was killed outright (SIGKILL) exits by itself within
:data:`ORPHAN_CHECK_SECONDS`.

Spawning re-imports the caller's ``__main__`` module in each worker: a script of your
own that reaches a pool needs the ``if __name__ == "__main__":`` guard.

Example:
  >>> with pool(2) as executor:  # doctest: +SKIP
  ...     futures = [executor.submit(work, item) for item in items]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from audit import plugins

# How often a worker checks that its parent is alive (it exits once the parent is gone).
ORPHAN_CHECK_SECONDS = 1.0
# How long a pool left by an exception waits for its terminated workers before killing them.
STOP_SECONDS = 10.0


def available_cores() -> int:
    """The CPU cores this process may run on.

    Returns:
      the size of its CPU affinity set where the platform has one, else
      ``os.cpu_count()``; at least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # a platform without affinity (macOS)
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def pool(max_workers: int, initializer: Callable[..., Any] | None = None,
         initargs: Sequence[Any] = ()) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """A ``spawn`` process pool whose workers load this process's plug-ins first.

    Args:
      max_workers: worker processes (started as work is submitted).
      initializer: run in each worker after the plug-ins are loaded, with ``initargs``.
      initargs: its arguments (pickled).

    Yields:
      the ``concurrent.futures.ProcessPoolExecutor``. Leaving the block normally waits
      for the submitted work; leaving it by an exception cancels the work not started,
      terminates the workers and waits for them to exit (killing any still there after
      :data:`STOP_SECONDS`), then re-raises.
    """
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(plugins.loaded(), os.getpid(), initializer, tuple(initargs))) as executor:
        try:
            yield executor
        except BaseException:
            processes = list((getattr(executor, "_processes", None) or {}).values())
            executor.shutdown(wait=False, cancel_futures=True)  # nothing more starts
            for process in processes:
                process.terminate()
            # Exits are read from the sentinels: the executor's own thread reaps the
            # workers, so their is_alive() can lag behind (and a reaped pid can be reused).
            running = {process.sentinel: process for process in processes}
            deadline = time.monotonic() + STOP_SECONDS
            while running and time.monotonic() < deadline:
                for sentinel in multiprocessing.connection.wait(
                        list(running), timeout=max(0.0, deadline - time.monotonic())):
                    running.pop(sentinel)
            for process in running.values():
                process.kill()
            raise


def _start(plugin_sources: Sequence[str], parent: int,
           initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    """A worker's start: the parent's plug-ins, a watch that ends the worker once its
    parent is gone, then the caller's own initializer."""
    plugins.load_all(plugin_sources)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_SECONDS)
        os._exit(1)  # the parent was killed: its result has nowhere to go

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    if initializer is not None:
        initializer(*initargs)
