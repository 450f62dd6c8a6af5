"""Several processes (hosts) as one JAX runtime, through ``jax.distributed``.

A run over several processes is SPMD: every process runs the same command with the same
arguments, and JAX joins their devices into one list (``jax.devices()``; a process owns
its ``jax.local_devices()``). :func:`audit.sharding.seed_parallel` then splits the seed
axis over the devices of every process, and hands each process the whole result, so
everything after it (scoring, figures) is computed alike everywhere; only the
coordinator (process 0) writes the run directory.

:func:`initialize` reads the coordinator's address, the number of processes and this
process's id from its arguments (``audit --coordinator-address HOST:PORT --num-processes
N --process-id I``), else from the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. ``--distributed auto`` (or
``AUDIT_DISTRIBUTED=auto``) leaves all three to JAX's own cluster detection (SLURM, Open
MPI, Kubernetes, Cloud TPU). On CPU the processes exchange arrays through gloo.

Example (two processes on one machine, 4 CPU devices each)::

  JAX_NUM_CPU_DEVICES=4 audit --coordinator-address localhost:1234 --num-processes 2 \\
      --process-id 0 bench --suite quick --out runs/two &
  JAX_NUM_CPU_DEVICES=4 audit --coordinator-address localhost:1234 --num-processes 2 \\
      --process-id 1 bench --suite quick --out runs/two
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

AUTO = "auto"


class DistributedError(ValueError):
    """Settings of a multi-process run that cannot work (named in the message)."""


def settings_from(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None,
                  environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The arguments of ``jax.distributed.initialize`` from flags, else the environment.

    Args:
      coordinator_address: ``HOST:PORT`` of process 0's coordination service, or
        ``"auto"`` for JAX's cluster detection.
      num_processes: how many processes take part (>= 1).
      process_id: this process's index in ``[0, num_processes)``.
      environ: the environment to read (default ``os.environ``).

    Returns:
      None for a run of one process (nothing given anywhere), ``{}`` for cluster detection,
      else ``{"coordinator_address", "num_processes", "process_id"}``.

    Raises:
      DistributedError: a partial or invalid set, naming the flag and its variable.
    """
    environ = os.environ if environ is None else environ
    if coordinator_address is None and environ.get("AUDIT_DISTRIBUTED") == AUTO:
        coordinator_address = AUTO
    given = {
        "coordinator_address": (coordinator_address, "JAX_COORDINATOR_ADDRESS"),
        "num_processes": (num_processes, "JAX_NUM_PROCESSES"),
        "process_id": (process_id, "JAX_PROCESS_ID"),
    }
    values: dict[str, Any] = {}
    for name, (value, variable) in given.items():
        if value is None and environ.get(variable, "") != "":
            value = environ[variable]
            if name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise DistributedError(f"{variable}: expected an integer, got "
                                           f"{environ[variable]!r}") from None
        values[name] = value
    if values["coordinator_address"] == AUTO:
        if values["num_processes"] is not None or values["process_id"] is not None:
            raise DistributedError("--coordinator-address auto: JAX's cluster detection "
                                   "sets --num-processes and --process-id; give neither")
        return {}
    if all(value is None for value in values.values()):
        return None
    missing = [f"--{name.replace('_', '-')} ({variable})"
               for name, (_, variable) in given.items() if values[name] is None]
    if missing:
        raise DistributedError("a run over several processes needs all of --coordinator-"
                               "address, --num-processes and --process-id; missing: "
                               + ", ".join(missing))
    count, index = values["num_processes"], values["process_id"]
    if count < 1:
        raise DistributedError(f"--num-processes: expected an integer >= 1, got {count}")
    if not 0 <= index < count:
        raise DistributedError(f"--process-id: expected an integer in [0, {count}), "
                               f"got {index}")
    host, _, port = str(values["coordinator_address"]).rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError("--coordinator-address: expected HOST:PORT, got "
                               f"{values['coordinator_address']!r}")
    return values


def initialize(settings: dict[str, Any] | None) -> bool:
    """Joins this process to the others (``jax.distributed.initialize``), before JAX's
    backend starts. Returns whether a multi-process runtime was set up.

    Args:
      settings: what :func:`settings_from` returned (None: one process, nothing done).
    """
    if settings is None:
        return False
    # CPU devices of several processes exchange arrays through gloo (XLA's default CPU
    # client has no cross-process collectives); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    return True


def process_count() -> int:
    """How many processes run this program (1 unless :func:`initialize` joined others)."""
    return jax.process_count()


def is_coordinator() -> bool:
    """Whether this is process 0, the one that writes run directories."""
    return jax.process_index() == 0


def all_agree(flag: bool) -> bool:
    """Whether ``flag`` holds in every process (a collective: every process must call it
    at the same point). With one process, ``flag`` itself.

    Used where processes could see different files (an organism cache on disks that are
    not shared): they must still take the same branch, or their collectives diverge.
    """
    if process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(bool(flag)))
    return bool(np.all(flags))


def from_coordinator(tree):
    """Process 0's ``tree`` of arrays in every process (a collective: every process must
    call it at the same point, with a tree of the same structure, shapes and dtypes; the
    other processes' values are ignored). With one process, ``tree`` itself.

    Used where only process 0 can read something (a checkpoint on its disk) and every
    process must act on it alike.
    """
    if process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    leaves, treedef = jax.tree.flatten(tree)
    # Booleans travel as bytes: the collectives move numbers.
    sent = [np.asarray(leaf).astype(np.uint8) if np.asarray(leaf).dtype == bool
            else np.asarray(leaf) for leaf in leaves]
    received = multihost_utils.broadcast_one_to_all(sent, is_source=is_coordinator())
    return jax.tree.unflatten(treedef, [
        np.asarray(value).astype(bool) if np.asarray(leaf).dtype == bool else np.asarray(value)
        for leaf, value in zip(leaves, received, strict=True)])
