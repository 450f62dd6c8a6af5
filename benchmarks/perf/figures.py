"""How long a run's figures take: the bootstrap, resamples at once against one call each.

    python -m benchmarks.perf.figures [RUN_DIR] [--resamples 1000] [--seeds 5]
                                      [--cells 12] [--episodes 256] [--repeats 1]
                                      [--calibration-bootstrap {resampled,fixed}]

Times :func:`audit.figures.compute` (what ``audit bench`` does after scoring and ``audit
metrics RUN_DIR`` does again) two ways on the same scores, side by side in one process:
``resampled`` evaluates each seed's bootstrap resamples in one call
(:func:`audit.figures.resampled_seed_figures`, the default) and ``per resample`` calls
:func:`audit.figures.seed_figures` once per resample and seed (the reference). Prints
both times, their ratio and the largest difference between the two results' figures
(the draws are the same, so it must be rounding: at most 1e-12). The bootstrap is the
run's (``--calibration-bootstrap`` chooses: ``resampled``, each model's calibration
episodes redrawn and every p-value recomputed per resample, the suites' default and the
synthetic store's; ``fixed``, the calibration held fixed), so both of its costs can be
timed on the same scores.

With ``RUN_DIR``, the scores are that run's ``scores.npz``; without, a synthetic store
shaped like one environment of the full suite: ``--seeds`` seeds of an honest model,
its twin and ``--cells`` incorrigible (organism, detector) cells, ``--episodes`` test,
calibration and demonstration episodes of 40 steps each, events in 70% of the
incorrigible models' test episodes (scores are random: this times the arithmetic, it
measures nothing).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from audit import figures
from audit.scores import ScoreStore


def synthetic_store(*, seeds: int, cells: int, episodes: int, resamples: int,
                    steps: int = 40, seed: int = 0) -> ScoreStore:
    """Random step scores shaped like one environment of a suite (see the module docstring)."""
    rng = np.random.default_rng(seed)
    store = ScoreStore(settings=dict(alpha=0.01, aggregate="max", resamples=resamples))
    detectors = [f"detector{d}" for d in range(max(1, cells // 2))]
    incorrigible = max(1, math.ceil(cells / len(detectors)))
    organisms = [("honest", "honest"), ("honest_twin", "control")] + [
        (f"incorrigible{o}", "trained-in") for o in range(incorrigible)]

    def masks():
        lengths = rng.integers(steps // 4, steps + 1, size=episodes)
        return np.arange(steps) < lengths[:, None]

    for model_seed in range(seeds):
        for organism, kind in organisms:
            test_mask = masks()
            events = np.zeros((episodes, steps), np.int8)
            if kind == "trained-in":
                harmful = rng.uniform(size=episodes) < 0.7
                at = (rng.uniform(size=episodes) * test_mask.sum(axis=1)).astype(int)
                events[np.flatnonzero(harmful), at[harmful]] = 1
            model = store.add_model(env="offswitch", group="default", organism=organism,
                                    kind=kind, seed=model_seed, test_mask=test_mask,
                                    test_events=events, calibration_mask=masks(),
                                    demo_mask=masks())
            shift = 0.3 if kind == "trained-in" else 0.0
            for detector in detectors:
                store.add_scores(model, detector, "activations", "demonstrations-only",
                                 test=rng.normal(shift, 1.0, (episodes, steps)),
                                 calibration=rng.normal(0.0, 1.0, (episodes, steps)),
                                 demo=rng.normal(0.0, 1.0, (episodes, steps)))
    return store


def largest_difference(first: dict, second: dict) -> float:
    """The largest absolute difference between two results' numeric row entries."""
    worst = 0.0
    for row_a, row_b in zip(first["rows"], second["rows"], strict=True):
        for key, value in row_a.items():
            other = row_b[key]
            pairs = (value.items() if isinstance(value, dict) else [(None, value)])
            for inner, a in pairs:
                b = other[inner] if isinstance(value, dict) else other
                if isinstance(a, float) and isinstance(b, float):
                    worst = max(worst, abs(a - b))
                elif a != b:
                    return math.inf
    return worst


def main(argv=None) -> int:
    """Prints the two timings and their ratio; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", default=None)
    parser.add_argument("--resamples", type=int, default=None,
                        help="bootstrap resamples (default: the run's; 1000 synthetic)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cells", type=int, default=12)
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--calibration-bootstrap", choices=figures.CALIBRATION_BOOTSTRAPS,
                        default=None,
                        help="the bootstrap to time (default: the run's; resampled synthetic)")
    args = parser.parse_args(argv)
    for name in ("resamples", "seeds", "cells", "episodes", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    if args.run_dir is not None:
        path = args.run_dir / "scores.npz"
        if not path.is_file():
            print(f"{path}: not found (a finished `audit bench` run has it)", file=sys.stderr)
            return 2
        store = ScoreStore.load(path)
        if args.resamples is not None:
            store.settings["resamples"] = args.resamples
        source = f"{path}"
    else:
        store = synthetic_store(seeds=args.seeds, cells=args.cells, episodes=args.episodes,
                                resamples=args.resamples or 1000)
        store.settings["calibration_bootstrap"] = figures.RESAMPLED
        source = (f"synthetic: {args.seeds} seeds, {args.cells} incorrigible cells, "
                  f"{args.episodes} episodes")
    if args.calibration_bootstrap is not None:
        store.settings["calibration_bootstrap"] = args.calibration_bootstrap
    timings: dict[str, list[float]] = {"resampled": [], "per resample": []}
    results = {}
    for _ in range(args.repeats):  # alternating, so both see the same machine
        for name, resampled in (("resampled", True), ("per resample", False)):
            started = time.perf_counter()
            results[name] = figures.compute(store, resampled=resampled)
            timings[name].append(time.perf_counter() - started)
    fast, slow = min(timings["resampled"]), min(timings["per resample"])
    difference = largest_difference(results["resampled"], results["per resample"])
    print(f"figures of {len(results['resampled']['rows'])} rows, "
          f"{figures.settings_of(store)['resamples']} resamples, calibration "
          f"{figures.settings_of(store)['calibration_bootstrap']} ({source})")
    print("| bootstrap | seconds |\n| --- | --- |")
    print(f"| resampled (default) | {fast:.2f} |\n| per resample (reference) | {slow:.2f} |")
    print(f"ratio: {slow / fast:.1f}x; largest difference between the two: {difference:.1e}")
    return 0 if difference <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
