"""Model parameters as ``.npz`` (flat ``path/to/leaf`` keys; no pickle)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from audit.modules import flat_state


def _flat(state) -> dict[str, np.ndarray]:
    return {key: np.asarray(value) for key, value in flat_state(state).items()}


def save_params(module: nnx.Module, path: str | os.PathLike) -> Path:
    """Writes the module's parameters to ``path`` atomically; returns the path."""
    return save_arrays(_flat(nnx.state(module, nnx.Param)), path)


def save_arrays(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Writes named arrays to the ``.npz`` file ``path`` atomically; returns the path."""
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz.tmp", delete=False) as tmp:
        np.savez(tmp, **{name: np.asarray(value) for name, value in arrays.items()})
    os.replace(tmp.name, path)
    return path


class _DoesNotFit(ValueError):
    pass


def load_params(module: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Loads parameters saved by :func:`save_params` into ``module`` (same architecture).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming the file and the parameters that are missing, have another
        shape or are not finite, or saying that it is not a readable ``.npz`` (empty,
        truncated, not a zip, an object array).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no parameters file at {path}")
    state = nnx.state(module, nnx.Param)
    expected = _flat(state)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = sorted(set(expected) - set(data.files))
            wrong = sorted(k for k in expected if k in data.files and data[k].shape
                           != expected[k].shape)
            if missing or wrong:
                raise _DoesNotFit(f"{path} does not fit {type(module).__name__}: missing "
                                  f"{missing or 'none'}, shape mismatch {wrong or 'none'}")
            loaded = {k: np.asarray(data[k]) for k in expected}
    except _DoesNotFit as error:
        raise ValueError(str(error)) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable parameters file ({type(error).__name__}: "
                         f"{error})") from None
    bad = sorted(k for k, v in loaded.items() if v.dtype.kind == "f" and not np.isfinite(v).all())
    if bad:
        raise ValueError(f"{path}: parameters {bad} are not finite")
    loaded = {k: jnp.asarray(v) for k, v in loaded.items()}
    for key_path, variable in nnx.to_flat_state(state):
        variable.set_value(loaded["/".join(str(part) for part in key_path)])
    nnx.update(module, state)
    return module


def save_pytree(tree, path: str | os.PathLike,
                extra: dict[str, np.ndarray] | None = None) -> Path:
    """Writes every leaf of a pytree of arrays to the ``.npz`` ``path`` atomically, in
    ``jax.tree.leaves`` order (``leaf_00000``, ...), with the ``extra`` named arrays
    beside them; :func:`load_pytree` reads the tree back into the same structure."""
    leaves = jax.tree.leaves(tree)
    arrays = {f"leaf_{index:05d}": np.asarray(leaf) for index, leaf in enumerate(leaves)}
    clash = set(arrays) & set(extra or {})
    if clash:
        raise ValueError(f"extra arrays may not be named like leaves: {sorted(clash)}")
    return save_arrays({**arrays, **(extra or {})}, path)


def load_pytree(like, path: str | os.PathLike):
    """Reads a pytree written by :func:`save_pytree` into the structure of ``like``.

    Args:
      like: a pytree of the same structure (arrays or ``jax.ShapeDtypeStruct``, e.g.
        from ``jax.eval_shape``).
      path: the file.

    Returns:
      ``like``'s structure holding the saved arrays (as ``jax.Array``).

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming the file, if it is unreadable or its leaves do not match
        ``like``'s in number, shape or dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    expected, treedef = jax.tree.flatten(like)
    try:
        with np.load(path, allow_pickle=False) as data:
            count = sum(name.startswith("leaf_") for name in data.files)
            leaves = [data[f"leaf_{index:05d}"] for index in range(count)]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: "
                         f"{error})") from None
    if len(leaves) != len(expected):
        raise ValueError(f"{path} holds {len(leaves)} arrays; the run's state has "
                         f"{len(expected)}")
    for index, (leaf, want) in enumerate(zip(leaves, expected, strict=True)):
        if leaf.shape != tuple(want.shape) or leaf.dtype != np.dtype(want.dtype):
            raise ValueError(f"{path}: array {index} is {leaf.dtype}{list(leaf.shape)}, the "
                             f"run's state needs {np.dtype(want.dtype)}{list(want.shape)}")
    return jax.tree.unflatten(treedef, [jnp.asarray(leaf) for leaf in leaves])
