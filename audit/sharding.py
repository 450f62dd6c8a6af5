"""The seed axis over many devices, with JAX's own machinery (``jax.sharding``, ``shard_map``).

Seeds, and organisms x seeds in the suites, are independent runs stacked on a leading
axis and vmapped. :func:`seed_parallel` runs that vmap with the leading axis sharded
over a one-dimensional mesh (axis ``"seeds"``) of the available devices: each device
vmaps its own block of runs, and the blocks never communicate. With one device it is
``jax.jit(jax.vmap(fn))``.

Devices come from JAX: the accelerators of one host, or on a CPU-only machine as many
host devices as asked for with ``JAX_NUM_CPU_DEVICES=<n>`` (or
``XLA_FLAGS=--xla_force_host_platform_device_count=<n>``) before JAX starts. XLA runs
a small program's operations mostly on one core, so on CPU one device per core is how
a vmapped run uses every core.

Several processes (``jax.distributed``, see :mod:`audit.distributed`) run the same
program: each passes the same inputs, the seed axis is split over the devices of every
process (as many from each), and every process gets the whole result back as arrays of
its own device, so what follows it is computed alike everywhere.

Example:
  >>> train = seed_parallel(train_one_seed)          # keys [S, ...] -> results [S, ...]
  >>> results = train(jax.random.split(key, 8))      # 8 seeds over the devices
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SEED_AXIS = "seeds"


def devices_for(count: int, devices: Sequence[Any] | None = None) -> list[Any]:
    """The devices a leading axis of ``count`` runs is split over: the most of
    ``devices`` (default ``jax.devices()``) that divide ``count`` evenly.

    Args:
      count: the length of the seed axis (>= 1).
      devices: the devices to choose from.

    Returns:
      the first ``d`` devices, ``d`` the largest divisor of ``count`` not above their
      number (1 device when nothing larger divides it). Devices of several processes:
      the first ``d`` of each process, ``d`` the largest divisor of ``count / processes``
      that every process has; when the processes do not divide ``count``, this process's
      own devices as above.
    """
    if count < 1:
        raise ValueError(f"count: expected a seed axis of length >= 1, got {count}")
    devices = list(jax.devices() if devices is None else devices)
    processes = sorted({getattr(device, "process_index", 0) for device in devices})
    if len(processes) > 1:
        by_process = {index: [device for device in devices
                              if getattr(device, "process_index", 0) == index]
                      for index in processes}
        if count % len(processes) == 0:
            # As many devices from each process, process by process: every process holds
            # a block of the seed axis and none waits on another's extra devices.
            share = count // len(processes)
            fewest = min(len(own) for own in by_process.values())
            each = max(used for used in range(1, min(share, fewest) + 1) if share % used == 0)
            return [device for index in processes for device in by_process[index][:each]]
        # Seeds that do not split over the processes: each process runs all of them on
        # its own devices (the same numbers everywhere, nothing gained).
        devices = by_process.get(jax.process_index(), by_process[processes[0]])
    for used in range(min(count, len(devices)), 0, -1):
        if count % used == 0:
            return devices[:used]
    return devices[:1]


def seed_parallel(fn: Callable, in_axes: int | None | Sequence[int | None] = 0,
                  devices: Sequence[Any] | None = None) -> Callable:
    """``jax.jit(jax.vmap(fn, in_axes))``, its mapped axis sharded over the devices.

    Args:
      fn: the function of one run (one seed).
      in_axes: per positional argument, 0 (its leading axis is the seed axis) or None
        (the same for every run: replicated on every device), as for ``jax.vmap``.
      devices: the devices to use (default ``jax.devices()``); of them, the most that
        divide the seed count evenly are used (:func:`devices_for`).

    Returns:
      a jitted function of ``fn``'s arguments with the seed axis added, returning
      ``fn``'s outputs with the seed axis leading. The device split is chosen at each
      call from the seed count (one compilation per count).

    Each device computes ``vmap(fn)`` on its block of the seed axis. A run's numbers do
    not depend on the other runs, but XLA may compile a block of fewer runs into a
    program whose floating-point rounding differs from the whole batch's; the suites'
    numbers on several devices equal those on one within the tolerance the tests state
    (tests/test_sharding.py).
    """
    compiled: dict[tuple[int, int], Callable] = {}

    def jitted_for(args) -> Callable:
        axes = in_axes if isinstance(in_axes, Sequence) else (in_axes,) * len(args)
        if len(axes) != len(args):
            raise ValueError(f"in_axes: {len(axes)} entries for {len(args)} arguments")
        sizes = {np.shape(leaf)[0] for arg, axis in zip(args, axes, strict=True)
                 if axis is not None for leaf in jax.tree.leaves(arg)}
        if len(sizes) != 1:
            raise ValueError("seed_parallel: the mapped arguments must share one leading "
                             f"(seed) axis length, got {sorted(sizes)}")
        count = sizes.pop()
        used = devices_for(count, devices)
        if (count, len(used)) not in compiled:
            compiled[count, len(used)] = _compile(fn, tuple(axes), used)
        return compiled[count, len(used)]

    @functools.wraps(fn)
    def run(*args):
        return jitted_for(args)(*args)

    # Ahead-of-time, to time compilation apart from running: run.lower(*args).compile().
    run.lower = lambda *args: jitted_for(args).lower(*args)
    return run


def _compile(fn: Callable, axes: tuple[int | None, ...], devices: list[Any]) -> Callable:
    mapped = jax.vmap(fn, in_axes=axes)
    if len(devices) == 1:
        return jax.jit(mapped)
    mesh = Mesh(np.array(devices), (SEED_AXIS,))
    specs = tuple(PartitionSpec() if axis is None else PartitionSpec(SEED_AXIS)
                  for axis in axes)
    # Each device vmaps its own block of runs; the blocks never communicate.
    sharded = jax.shard_map(mapped, mesh=mesh, in_specs=specs,
                            out_specs=PartitionSpec(SEED_AXIS), check_vma=False)
    if len({getattr(device, "process_index", 0) for device in devices}) == 1:
        return jax.jit(sharded)
    return _across_processes(sharded, mesh)


def _across_processes(sharded: Callable, mesh: Mesh) -> Callable:
    """``sharded`` over devices of several processes, as a function of this process's
    arrays returning this process's arrays.

    Every process passes the same values; they enter as host arrays (a global computation
    takes no array committed to one process's device) and PRNG keys as their raw bits.
    The result is gathered to every device (``out_shardings`` replicated) and each process
    keeps its own copy, so the processes go on alike.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    outputs: dict[Any, tuple] = {}  # per input structure: the output's tree and key types

    def on_host(args):
        leaves, tree = jax.tree.flatten(args)
        impls = [jax.random.key_impl(leaf) if _is_key(leaf) else None for leaf in leaves]
        plain = [np.asarray(jax.random.key_data(leaf) if impl is not None else leaf)
                 for leaf, impl in zip(leaves, impls, strict=True)]
        return plain, tree, impls

    def unkeyed(leaves, tree, impls):
        return jax.tree.unflatten(tree, [
            leaf if impl is None else jax.random.wrap_key_data(leaf, impl=impl)
            for leaf, impl in zip(leaves, impls, strict=True)])

    compiled: dict[Any, Callable] = {}

    def run(*args):
        plain, tree, impls = on_host(args)
        index = (tree, tuple(str(impl) for impl in impls))
        if index not in compiled:
            def as_bits(*leaves):
                result = sharded(*unkeyed(leaves, tree, impls))
                result_leaves, result_tree = jax.tree.flatten(result)
                outputs[index] = (result_tree, [
                    jax.random.key_impl(leaf) if _is_key(leaf) else None
                    for leaf in result_leaves])
                return [jax.random.key_data(leaf) if _is_key(leaf) else leaf
                        for leaf in result_leaves]

            compiled[index] = jax.jit(as_bits, out_shardings=replicated)
        gathered = compiled[index](*plain)
        local = [leaf.addressable_data(0) for leaf in gathered]
        return unkeyed(local, *outputs[index])

    def lower(*args):
        raise NotImplementedError("seed_parallel(...).lower: ahead-of-time compilation is "
                                  "for a run of one process")

    run.lower = lower
    return run


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                 jax.dtypes.prng_key)


def use_all_cores() -> int:
    """Asks JAX for one CPU device per core (before its backend starts); the device count.

    Once the backend has started (e.g. inside a test session) the count cannot change
    and the devices already there are used. ``JAX_NUM_CPU_DEVICES`` set by the user
    wins.
    """
    if "JAX_NUM_CPU_DEVICES" not in os.environ:
        try:
            jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)
        except RuntimeError:  # the backend has started: keep its devices
            pass
    return len(jax.devices())
