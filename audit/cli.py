"""The ``audit`` command line: the one place where named components are composed.

Usage errors (an unknown name, a bad value, an output directory that exists) are
reported on one line, ``audit <command>: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from audit import registry
from audit.runs import (
    RunDirError,
    as_json,
    check_run_dir,
    default_run_name,
    resume_checkpoint,
    run_dir,
    versions,
    write_json,
)

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """A user error: printed on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage block first; we want one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


COUNT_LIMIT = 2**31 - 1  # counts become int32 loop bounds and array sizes in XLA
DISTRIBUTED_COMMANDS = ("bench",)  # the commands that run over several processes
SEED_LIMIT = 2**32  # seeds are uint32 PRNG seeds: every command takes [0, 2**32)


def bounded_int(low: int, high: int, interval: str, not_a_number: str):
    """An argparse type: an integer in ``[low, high]``.

    Args:
      low, high: the smallest and largest value taken.
      interval: the range as the messages name it (``"[1, 2**31)"``).
      not_a_number: what the message says was expected when the text is no integer.

    Returns:
      a function from the flag's text to its value, raising
      ``argparse.ArgumentTypeError`` with a one-line message otherwise.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {not_a_number}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {interval}, got {value}")
        return value

    parse.__doc__ = f"argparse type: an integer in ``{interval}``."
    return parse


# Counts are int32 inside XLA.
positive_int = bounded_int(1, COUNT_LIMIT, "[1, 2**31)", "a positive integer")
non_negative_int = bounded_int(0, COUNT_LIMIT, "[0, 2**31)", "an integer >= 0")
# JAX keys are 32-bit: a larger seed would silently give another seed's numbers.
seed_int = bounded_int(0, SEED_LIMIT - 1, "[0, 2**32)", "an integer in [0, 2**32)")


def finite_float(low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = True):
    """An argparse type: a finite float in the interval given (``inf`` and ``nan`` are
    refused: a learning rate of ``inf`` trains to NaN parameters without an error)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    expected = (f"a finite number > {low:g}" if low_open and high == math.inf else
                f"a finite number >= {low:g}" if high == math.inf else
                f"a finite number in {left}{low:g}, {high:g}{right}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        inside = ((value > low if low_open else value >= low)
                  and (value < high if high_open else value <= high))
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = "number"  # argparse names the type in its messages
    parse.__doc__ = f"argparse type: {expected}."
    return parse


positive_float = finite_float(0.0, low_open=True)
non_negative_float = finite_float(0.0)


def check_memory(env, env_params, max_steps: int, episodes: dict[str, int],
                 share: float = 0.5) -> None:
    """Refuses episode counts whose trajectories cannot fit in this machine's memory.

    Every episode of a batch is held at once (``[episodes, steps, ...]``): a count far
    beyond memory would abort the process inside XLA instead of saying which flag is at
    fault. Estimated per flag, for float32 observations, action distributions and the
    per-step fields.

    Raises:
      UsageError: naming the flag, the memory the episodes need and what the machine has.
    """
    import os

    import numpy as np

    observation = int(np.prod(env.observation_space(env_params).shape))
    per_episode = max_steps * 4 * (observation + 2 * env.num_actions + 8)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform says
        return
    for flag, count in episodes.items():
        need = count * per_episode
        if need > share * memory:
            raise UsageError(f"{flag}: {count} episodes of {max_steps} steps need about "
                             f"{need / 2**30:.3g} GiB in memory; this machine has "
                             f"{memory / 2**30:.3g} GiB (use fewer episodes)")


def _add_plugin_argument(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument("--plugin", dest=dest, action="append", default=[], metavar="SOURCE",
                        help="a Python file (path/to/file.py) or module name to load before "
                        "the command, registering its components; repeatable")


def _add_compile_cache_arguments(parser: argparse.ArgumentParser, suffix: str) -> None:
    # Before or after the command: two destinations, as for --plugin (a subcommand's
    # defaults would otherwise overwrite what was given before it).
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--compile-cache", dest=f"compile_cache{suffix}", type=Path,
                        default=None, metavar="DIR",
                        help="keep compiled programs in DIR and reuse them in later runs "
                        "(default: $AUDIT_COMPILE_CACHE, else ~/.cache/imitation-audit/jax)")
    choice.add_argument("--no-compile-cache", dest=f"no_compile_cache{suffix}",
                        action="store_true", help="compile every program afresh")


def _add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    # Before the command only: they set up the JAX runtime the command runs in.
    parser.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                        help="run over several processes (hosts) joined by jax.distributed, "
                        "process 0's coordination service at HOST:PORT, or 'auto' for JAX's "
                        "cluster detection (SLURM, Open MPI, ...); default "
                        "$JAX_COORDINATOR_ADDRESS; `audit bench` only")
    parser.add_argument("--num-processes", type=positive_int, default=None, metavar="N",
                        help="how many processes take part (default $JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=non_negative_int, default=None, metavar="I",
                        help="this process's index in [0, N) (default $JAX_PROCESS_ID)")


def build_parser() -> argparse.ArgumentParser:
    """The ``audit`` argument parser: every subcommand, each with ``--plugin``."""
    parser = _Parser(prog="audit", description=__doc__.splitlines()[0])
    _add_plugin_argument(parser, "plugins_before")
    _add_compile_cache_arguments(parser, "_before")
    _add_distributed_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demos = commands.add_parser(
        "demos",
        help="roll out a planner and save its trajectories",
        description="Roll out a planner in vmapped episodes and write DIR/trajectories.npz "
        "and DIR/summary.json.",
    )
    demos.add_argument("--env", default="offswitch", help="environment name (default offswitch)")
    demos.add_argument("--split", default="train", help="layout distribution (default train)")
    demos.add_argument("--planner", default="demonstrator", help="planner name "
                       "(default demonstrator)")
    demos.add_argument("--episodes", type=positive_int, default=1024, help="default 1024")
    demos.add_argument("--max-steps", type=positive_int, default=None,
                       help="episode length (default: the environment's)")
    add_run_arguments(demos, "runs/demos/<timestamp>-<env>-...")
    demos.set_defaults(handler=run_demos)

    bc = commands.add_parser(
        "train-bc",
        help="train an imitator by behaviour cloning on demonstrations",
        description="Behaviour-clone the demonstrator on train layouts; write DIR/params.npz "
        "and DIR/summary.json (KL to the demonstrator, event rates and returns on train and "
        "test layouts).",
    )
    bc.add_argument("--env", default="offswitch", help="environment name (default offswitch)")
    bc.add_argument("--imitator", default="mlp", help="imitator name (default mlp)")
    source = bc.add_mutually_exclusive_group()
    source.add_argument("--demos", type=Path, default=None,
                        help="a directory written by `audit demos` (train split)")
    source.add_argument("--episodes", type=positive_int, default=None,
                        help="generate this many demonstrator episodes (default 1024)")
    bc.add_argument("--updates", type=positive_int, default=1000, help="default 1000")
    bc.add_argument("--batch-episodes", type=positive_int, default=32, help="default 32")
    bc.add_argument("--learning-rate", type=positive_float, default=1e-3, help="default 1e-3")
    bc.add_argument("--steps-at-once", action="store_true",
                    help="teacher-force every step of a minibatch at once, after a scan for "
                    "the carries (faster for a feed-forward imitator; the same function "
                    "summed in another order)")
    bc.add_argument("--eval-episodes", type=positive_int, default=512,
                    help="episodes per evaluation set (default 512)")
    add_run_arguments(bc, "runs/bc/<timestamp>-<env>-<imitator>-...")
    bc.set_defaults(handler=run_train_bc)

    gan = commands.add_parser(
        "train-gan",
        help="train an imitator adversarially (GAIL) against a discriminator",
        description="Adversarial imitation: PPO on the discriminator's reward, the "
        "discriminator on the chosen view. Writes DIR/imitator.npz, DIR/critic.npz, "
        "DIR/discriminator.npz, DIR/feature_norm.npz, DIR/summary.json (final figures, "
        "the metric history, transitions (the padded imitator-rollout steps computed) and "
        "valid_transitions (those inside episodes), config, versions) and DIR/curves.png. "
        "ENV may be gymnax:<id> (e.g. gymnax:CartPole-v1, discrete actions only), with "
        "demonstrations from a built-in expert. Settings left out take the environment's "
        "recommended ones (its imitation_defaults: for the built-in gridworlds, egocentric "
        "imitator and discriminator and the PPO settings with which GAIL alone imitates "
        "them), else the defaults listed here.",
    )
    gan.add_argument("--env", default="offswitch",
                     help="environment name or gymnax:<id> (default offswitch)")
    gan.add_argument("--imitator", default=None,
                     help="imitator name (default: the environment's, else mlp)")
    gan.add_argument("--discriminator", default=None,
                     help="discriminator name: mlp, egocentric, gru, attention, airl, planner "
                     "or any registered one (default: the environment's, else mlp)")
    gan.add_argument("--view", default=None,
                     help="actions, transitions, activations or activations+noise "
                     "(default: the environment's, else transitions)")
    gan.add_argument("--activations", default=None,
                     help="comma-separated activation names for the activation views "
                     "(default: all)")
    gan.add_argument("--steps", type=positive_int, default=None,
                     help="adversarial iterations (default: the environment's, else 200)")
    gan.add_argument("--planner", default="demonstrator",
                     help="the demonstrator, for the project's environments "
                     "(default demonstrator)")
    gan.add_argument("--episodes", type=positive_int, default=1024,
                     help="demonstration episodes (default 1024)")
    gan.add_argument("--rollout-episodes", type=positive_int, default=None,
                     help="imitator episodes per iteration (default: the environment's, "
                     "else 64)")
    gan.add_argument("--reward", default=None,
                     help="gail (-log D) or logit (default: the environment's, else gail)")
    gan.add_argument("--learning-rate", type=positive_float, default=None,
                     help="imitator and critic learning rate (default: the environment's, "
                     "else 3e-4)")
    gan.add_argument("--discriminator-learning-rate", type=positive_float, default=None,
                     help="default: the environment's, else 3e-4")
    gan.add_argument("--discriminator-updates", type=positive_int, default=None,
                     help="discriminator updates per iteration (default: the environment's, "
                     "else 4)")
    gan.add_argument("--gradient-penalty", type=non_negative_float, default=0.0,
                     help="R1 weight on demonstrator features (default 0)")
    gan.add_argument("--label-smoothing", type=finite_float(0.0, 1.0), default=0.0,
                     help="in [0, 1) (default 0)")
    gan.add_argument("--bc-warm-start", type=non_negative_int, default=0,
                     help="behaviour-cloning updates before the adversarial phase (default 0)")
    gan.add_argument("--bc-coef", type=non_negative_float, default=0.0,
                     help="weight of a behaviour-cloning term in the imitator's loss (default 0)")
    gan.add_argument("--entropy-coef", type=non_negative_float, default=None,
                     help="entropy bonus weight (default: the environment's, else 0)")
    gan.add_argument("--ppo-epochs", type=positive_int, default=None,
                     help="PPO passes over each iteration's imitator episodes (default: the "
                     "environment's, else 4)")
    gan.add_argument("--ppo-minibatches", type=positive_int, default=None,
                     help="minibatches of whole episodes per PPO pass; must divide "
                     "--rollout-episodes (default: the environment's, else 4)")
    gan.add_argument("--gamma", type=finite_float(0.0, 1.0, high_open=False), default=None,
                     help="PPO discount, in [0, 1] (default: the environment's, else 0.99)")
    gan.add_argument("--gae-lambda", type=finite_float(0.0, 1.0, high_open=False),
                     default=None,
                     help="GAE lambda, in [0, 1] (default: the environment's, else 0.95)")
    gan.add_argument("--discriminator-batch-episodes", type=positive_int, default=None,
                     help="demonstrator and imitator episodes per discriminator update "
                     "(default: the environment's, else 32)")
    gan.add_argument("--anneal-lr", action=argparse.BooleanOptionalAction, default=None,
                     help="anneal the imitator's and critic's learning rate linearly to 0 "
                     "over the run (default: the environment's, else off)")
    gan.add_argument("--checkpoint-every", type=non_negative_int, default=100,
                     help="save a checkpoint every this many iterations (rounded up to a "
                     "multiple of --eval-every; 0: none) beside --out, for --resume "
                     "(default 100)")
    gan.add_argument("--resume", action="store_true",
                     help="continue the killed run of this --out from its checkpoint (the "
                     "same settings; the numbers are those of an uninterrupted run)")
    gan.add_argument("--eval-every", type=positive_int, default=10,
                     help="iterations between evaluations (default 10)")
    gan.add_argument("--eval-episodes", type=positive_int, default=256,
                     help="episodes per evaluation (default 256)")
    add_run_arguments(gan, "runs/gan/<timestamp>-<env>-<imitator>-<discriminator>-<view>-...")
    gan.set_defaults(handler=run_train_gan)

    bench = commands.add_parser(
        "bench",
        help="score detectors against model organisms (the benchmark suites)",
        description="Run every (environment, organism, detector, view) cell of a suite and "
        "write DIR/results.json, results.csv, results.md, results.tex, scores.npz, "
        "roc_<env>.png and the visual report DIR/report.html (figures also under "
        "DIR/figures/); print the Markdown table. Organisms are cached in --cache-dir.",
    )
    bench.add_argument("--suite", default="quick",
                       help="a registered suite: quick, generalising, structured, full or "
                       "your own (`audit list suites`; default quick)")
    bench.add_argument("--seeds", type=positive_int, default=None,
                       help="number of seeds (default: the suite's, 1 for quick, 5 for full); "
                       "they are --seed, --seed + 1, ...")
    bench.add_argument("--cache-dir", type=Path, default=Path("runs", "cache", "organisms"),
                       help="organism cache (default runs/cache/organisms)")
    bench.add_argument("--no-cache", action="store_true", help="build every organism afresh")
    bench.add_argument("--processes", type=positive_int, default=None,
                       help="worker processes, one environment each (default: one per "
                       "environment of the suite; 1 runs in this process, which a "
                       "component registered only in code needs)")
    bench.add_argument("--discriminator-updates", type=positive_int, default=None,
                       help="co-trained discriminators' updates per GAN iteration (default: "
                       "the suite's; e.g. 10x the default to check that the table does not "
                       "move)")
    bench.add_argument("--dagger-rounds", type=non_negative_int, default=None, metavar="N",
                       help="organisms: N rounds of on-policy correction (DAgger) after "
                       "cloning: each organism's own episodes, labelled by its planners, "
                       "added to its data and cloned again (default: the suite's, 0 for the "
                       "built-in suites)")
    bench.add_argument("--skip-invalid-envs", action="store_true",
                       help="leave out an environment where an organism fails its validity "
                       "check or co-training diverges, and write the others' figures "
                       "(results.json and results.md name what was left out and why); by "
                       "default the run stops there")
    bench.add_argument("--zero-constant-features", action="store_true",
                       help="hold features that never varied in the fitting data at 0 when "
                       "scoring (the old behaviour: novelty in them is invisible)")
    bench.add_argument("--p-values", choices=("conservative", "smoothed"), default=None,
                       help="smoothed (the suites' default): ties with calibration scores "
                       "broken by a uniform draw, exactly uniform whatever the ties; "
                       "conservative: (1 + #{calibration >= s}) / (n + 1), whose excess over "
                       "uniform depends on each detector's ties (docs/benchmarks.md)")
    bench.add_argument("--calibration-bootstrap", choices=("resampled", "fixed"), default=None,
                       help="resampled (the default): each bootstrap resample draws every model's "
                       "calibration episodes again and recomputes the p-values; fixed: "
                       "calibration held fixed, the narrower intervals of runs before "
                       "2026-12-05 (docs/benchmarks.md)")
    bench.add_argument("--resume", action="store_true",
                       help="continue the killed run of this --out: the environments it "
                       "finished are loaded from its checkpoint, the others run")
    bench.add_argument("--no-report", action="store_true",
                       help="do not write report.html (`audit report DIR` writes it later)")
    bench.add_argument("--envs", nargs="+", default=None, metavar="ENV",
                       help="only these of the suite's environments (default: all)")
    add_run_arguments(bench, "runs/bench/<timestamp>-<suite>")
    bench.set_defaults(handler=run_bench)

    sweep = commands.add_parser(
        "sweep",
        help="run a suite at several values of one setting and plot figures against it",
        description="Run the sweep NAME's suite at each of its values (every point a full "
        "benchmark run, written to DIR/points/<value>/) and write DIR/NAME.csv (every "
        "figure with its 95%% interval), DIR/NAME.png and DIR/NAME.pdf (the figures against "
        "the value), DIR/sweep.json and DIR/report.html (each point has its own). Organisms "
        "are cached in --cache-dir and shared by the points.",
    )
    sweep.add_argument("name", help="a registered sweep: new_situations, demonstrations, "
                       "training_time, capacity, capacity_depth, capacity_updates, "
                       "counterfactual (see `audit list sweeps`)")
    sweep.add_argument("--setting", choices=("quick", "paper"), default="quick",
                       help="quick: the quick suite's values and seeds (minutes); paper: "
                       "more values and the sweep's paper seeds (default quick)")
    sweep.add_argument("--values", type=int, nargs="+", default=None,
                       help="run these values instead of the setting's (integers)")
    sweep.add_argument("--seeds", type=positive_int, default=None,
                       help="seeds per point (default: the setting's)")
    sweep.add_argument("--cache-dir", type=Path, default=Path("runs", "cache", "organisms"),
                       help="organism cache (default runs/cache/organisms)")
    sweep.add_argument("--no-cache", action="store_true", help="build every organism afresh")
    sweep.add_argument("--processes", type=positive_int, default=None,
                       help="worker processes per point, one environment each (default: "
                       "one per environment)")
    sweep.add_argument("--no-report", action="store_true",
                       help="do not write the report.html files (`audit report DIR` writes "
                       "them later)")
    sweep.add_argument("--p-values", choices=("conservative", "smoothed"), default=None,
                       help="the p-values of every point (default: the suite's, smoothed; "
                       "conservative reproduces figures measured before smoothed became "
                       "the default)")
    sweep.add_argument("--calibration-bootstrap", choices=("resampled", "fixed"), default=None,
                       help="the intervals of every point (default: the suite's, resampled; "
                       "fixed reproduces intervals measured before 2026-12-05)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the killed sweep of this --out: the points it finished "
                       "are taken from its checkpoint, the others run")
    add_run_arguments(sweep, "runs/sweep/<timestamp>-<name>-<setting>")
    sweep.set_defaults(handler=run_sweep_command)

    recompute = commands.add_parser(
        "metrics",
        help="recompute a benchmark run's figures from its scores.npz",
        description="Recompute every figure of RUN_DIR/results.json from RUN_DIR/scores.npz "
        "(the scores every figure was made from) and write them to --out (default: "
        "RUN_DIR/recomputed.json).",
    )
    recompute.add_argument("run_dir", type=Path, help="a directory written by audit bench")
    recompute.add_argument("--out", type=Path, default=None,
                           help="output JSON (default RUN_DIR/recomputed.json)")
    recompute.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    recompute.add_argument("--p-values", choices=("conservative", "smoothed"), default=None,
                           help="the p-values to recompute with (default: the run's)")
    recompute.add_argument("--calibration-bootstrap", choices=("resampled", "fixed"),
                           default=None,
                           help="the intervals to recompute with (default: the run's; a run "
                           "that does not record it: fixed)")
    recompute.add_argument("--quiet", action="store_true", help="print nothing but errors")
    recompute.set_defaults(handler=run_metrics)

    report = commands.add_parser(
        "report",
        help="write the visual report (report.html) of a finished bench or sweep run",
        description="Write RUN_DIR/report.html, a self-contained page (no network needed): "
        "the results tables with intervals and control marks (sortable), pre-harm ROC "
        "curves, per-step scores over time with the hidden event and the flagging level, "
        "episode pictures with the flagged steps, the organisms' validity, and the run's "
        "settings, versions and timings; every figure also as PNG and PDF under "
        "RUN_DIR/figures/. Built from results.json, scores.npz and the episodes the run "
        "kept: nothing is recomputed by running models.",
    )
    report.add_argument("run_dir", type=Path,
                        help="a directory written by audit bench or audit sweep")
    report.add_argument("--highlight", default=None, metavar="DETECTOR/VIEW",
                        help="the detector whose flags the episode pictures show, e.g. "
                        "mahalanobis/activations (default: per organism, its best "
                        "non-control cell by pre-harm AUROC)")
    report.add_argument("--quiet", action="store_true", help="print nothing but errors")
    report.set_defaults(handler=run_report)

    render = commands.add_parser(
        "render",
        help="draw episodes of a planner or a saved imitator as an animated GIF",
        description="Roll out --episodes episodes of the planner --planner (or of the "
        "imitator saved in --imitator RUN_DIR by train-bc or train-gan) on --split layouts "
        "of --env and write them to --out: an animated GIF (.gif; a hidden event's step has "
        "an orange frame) or a strip of frames (.png or .pdf). The environment must have a "
        "renderer (EnvironmentSpec.render; the gridworlds do).",
    )
    render.add_argument("--env", required=True, help="environment name")
    render.add_argument("--split", default="test", help="layout split (default test)")
    render.add_argument("--planner", default="demonstrator",
                        help="registered planner (default demonstrator)")
    render.add_argument("--imitator", type=Path, default=None, metavar="RUN_DIR",
                        help="a train-bc or train-gan run directory: render its saved imitator "
                        "instead of a planner")
    render.add_argument("--episodes", type=positive_int, default=1,
                        help="episodes, one after another (default 1)")
    render.add_argument("--scale", type=positive_int, default=16,
                        help="pixels per grid cell (default 16)")
    render.add_argument("--frame-seconds", type=finite_float(0.0, 60.0, low_open=True,
                                                             high_open=False), default=0.3,
                        help="seconds per GIF frame (default 0.3)")
    render.add_argument("--seed", type=seed_int, default=0, help="in [0, 2**32) (default 0)")
    render.add_argument("--out", type=Path, default=None,
                        help="output file, .gif, .png or .pdf (default "
                        "runs/render/<env>-<split>-<policy>-seed<S>.gif)")
    render.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    render.add_argument("--quiet", action="store_true", help="print nothing but errors")
    render.set_defaults(handler=run_render)

    listing = commands.add_parser(
        "list",
        help="print every registered component and where it came from",
        description="Print every registered component of GROUP (default: every group): its "
        "name, where it came from (an entry point and its package, a plug-in, or code) and "
        "its description.",
    )
    listing.add_argument("group", nargs="?", default=None,
                         help=f"one of: {', '.join(registry.GROUPS)}")
    listing.set_defaults(handler=run_list)
    for command in commands.choices.values():
        _add_plugin_argument(command, "plugins")
        _add_compile_cache_arguments(command, "")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``--seed``, ``--out``, ``--overwrite`` and ``--quiet``, shared by every run command."""
    parser.add_argument("--seed", type=seed_int, default=0, help="in [0, 2**32) (default 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory (default {default_out})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or table; print nothing but errors")


def lookup(group: str, name: str, flag: str):
    """A registered component, or a UsageError naming the flag and the valid choices."""
    try:
        return registry.get(group, name)
    except registry.UnknownNameError as error:
        raise UsageError(f"{flag}: {error}") from None


def lookup_environment(name: str) -> registry.EnvironmentSpec:
    """The environment named by ``--env``, or a UsageError naming the flag.

    Besides an unknown name, this catches an environment the framework cannot use
    (a ``gymnax:<id>`` with continuous actions raises ``ValueError``).
    """
    try:
        return registry.get("environments", name)
    except (registry.UnknownNameError, ValueError) as error:
        raise UsageError(f"--env: {error}") from None


def run_demos(args: argparse.Namespace) -> int:
    """``audit demos``: see the subcommand's help."""
    import jax

    from audit.rollout import rollout_expert
    from audit.trajectories import save_npz, summary_statistics

    env_spec = lookup_environment(args.env)
    planner_spec = lookup("planners", args.planner, "--planner")
    if args.split not in env_spec.splits:
        raise UsageError(f"--split: unknown split {args.split!r} for environment {args.env!r}; "
                         f"choose from: {', '.join(env_spec.splits)}")
    env, env_params = env_spec.build(args.split)
    if not planner_spec.supports(env):
        raise UsageError(f"--planner: {args.planner!r} cannot act in environment {args.env!r}")
    max_steps = args.max_steps or int(env_params.max_steps_in_episode)
    check_memory(env, env_params, max_steps, {"--episodes": args.episodes})
    out = args.out or Path("runs", "demos", default_run_name(args.env, args.split, args.planner,
                                                             f"seed{args.seed}"))
    check_run_dir(out, args.overwrite)
    planner = planner_spec.make(env)

    started = time.perf_counter()
    trajectories = rollout_expert(planner, env, env_params, jax.random.key(args.seed),
                                  args.episodes, max_steps)
    jax.block_until_ready(trajectories)
    seconds = time.perf_counter() - started

    summary = summary_statistics(trajectories, env_spec.event_names)
    summary.update(
        env=args.env,
        split=args.split,
        planner=args.planner,
        seconds=seconds,
        config={
            "command": "demos",
            "env": args.env,
            "split": args.split,
            "planner": args.planner,
            "planner_config": _as_dict(getattr(planner, "config", None)),
            "env_params": _as_dict(env_params),
            "episodes": args.episodes,
            "max_steps": max_steps,
            "seed": args.seed,
        },
        versions=versions(),
    )
    with run_dir(out, args.overwrite) as staging:
        save_npz(trajectories, staging / "trajectories.npz")
        write_json(staging / "summary.json", summary)
    if not args.quiet:
        _print_summary(summary, out)
    return 0


def run_train_bc(args: argparse.Namespace) -> int:
    """``audit train-bc``: see the subcommand's help."""
    import jax
    import numpy as np
    from flax import nnx

    from audit.bc import BCConfig, make_train
    from audit.checkpoint import save_params
    from audit.evaluate import imitation_figures
    from audit.trajectories import load_npz

    env_spec = lookup_environment(args.env)
    imitator_class = lookup("imitators", args.imitator, "--imitator")
    demonstrator_spec = lookup("planners", "demonstrator", "demonstrator")
    if "test" not in env_spec.splits:
        raise UsageError(f"--env: {args.env!r} has no test split; train-bc reports test figures")
    train_env, train_params = env_spec.build("train")
    observation_shape = tuple(train_env.observation_space(train_params).shape)
    num_actions = train_env.num_actions
    demonstrations = None
    if args.demos is not None:  # read and checked before anything is computed
        demos_file = args.demos / "trajectories.npz"
        if not demos_file.is_file():
            raise UsageError(f"--demos: no trajectories.npz in {args.demos} "
                             "(write one with `audit demos`)")
        try:
            demonstrations = load_npz(demos_file)
        except ValueError as error:
            raise UsageError(f"--demos: {error}") from None
        if tuple(demonstrations.observations.shape[2:]) != observation_shape:
            raise UsageError(f"--demos: observations of shape "
                             f"{tuple(demonstrations.observations.shape[2:])} do not fit "
                             f"{args.env!r} ({observation_shape})")
        if demonstrations.action_probs.shape[-1] != num_actions:
            raise UsageError(f"--demos: action_probs over {demonstrations.action_probs.shape[-1]} "
                             f"actions; {args.env!r} has {num_actions}")
    max_steps = int(train_params.max_steps_in_episode)
    check_memory(train_env, train_params, max_steps,
                 {"--episodes": args.episodes or 0, "--eval-episodes": args.eval_episodes})
    out = args.out or Path("runs", "bc", default_run_name(args.env, args.imitator,
                                                          f"seed{args.seed}"))
    check_run_dir(out, args.overwrite)

    demonstrator = demonstrator_spec.make(train_env)
    key = jax.random.key(args.seed)
    data_key, train_key, eval_key = jax.random.split(key, 3)
    if demonstrations is None:
        from audit.rollout import rollout_expert

        demonstrations = rollout_expert(demonstrator, train_env, train_params, data_key,
                                        args.episodes or 1024, max_steps)

    def make_imitator(key):
        return imitator_class(observation_shape, num_actions, rngs=nnx.Rngs(key))

    config = BCConfig(updates=args.updates, batch_episodes=args.batch_episodes,
                      learning_rate=args.learning_rate, steps_at_once=args.steps_at_once)
    started = time.perf_counter()
    with _progress(args.quiet, "behaviour cloning", args.updates) as advance:
        train, graphdef = make_train(config, make_imitator, demonstrations, progress=advance)
        params, losses = jax.jit(train)(train_key)
        jax.block_until_ready(losses)
    train_seconds = time.perf_counter() - started
    losses_host = np.asarray(losses)
    finite_params = all(bool(np.isfinite(np.asarray(leaf)).all())
                        for leaf in jax.tree.leaves(params))
    if not (np.isfinite(losses_host).all() and finite_params):
        first = int(np.argmax(~np.isfinite(losses_host))) if not np.isfinite(
            losses_host).all() else len(losses_host) - 1
        print(f"audit train-bc: error: training diverged (the loss or the parameters are not "
              f"finite from update {first}); nothing was written: lower --learning-rate "
              f"({args.learning_rate:g})", file=sys.stderr)
        return EXIT_FAILURE
    imitator = nnx.merge(graphdef, params)

    figures = imitation_figures(imitator, env_spec, demonstrator_spec, eval_key,
                                args.eval_episodes)
    summary = {
        **figures,
        "loss_first": float(losses[0]),
        "loss_final": float(losses[-1]),
        "train_seconds": train_seconds,
        "config": {
            "command": "train-bc",
            "env": args.env,
            "imitator": args.imitator,
            "demos": str(args.demos) if args.demos else None,
            "episodes": int(demonstrations.num_episodes),
            "bc": _as_dict(config),
            "eval_episodes": args.eval_episodes,
            "seed": args.seed,
        },
        "versions": versions(),
    }
    with run_dir(out, args.overwrite) as staging:
        save_params(imitator, staging / "params.npz")
        write_json(staging / "summary.json", summary)
    if not args.quiet:
        _print_figures(f"{args.imitator} imitator, behaviour-cloned on {args.env}", summary, out,
                       ("kl_train", "kl_test", "event_rate_train", "event_rate_test",
                        "return_train", "return_test", "demonstrator_return_train",
                        "demonstrator_return_test", "loss_final", "train_seconds"))
    return 0


# What `audit train-gan` uses for a flag left out, when the environment recommends nothing.
TRAIN_GAN_DEFAULTS = {"imitator": "mlp", "discriminator": "mlp", "view": "transitions",
                      "steps": 200, "rollout_episodes": 64, "reward": "gail",
                      "learning_rate": 3e-4, "discriminator_learning_rate": 3e-4,
                      "discriminator_updates": 4, "entropy_coef": 0.0, "anneal_lr": False,
                      "ppo_epochs": 4, "ppo_minibatches": 4, "gamma": 0.99, "gae_lambda": 0.95,
                      "discriminator_batch_episodes": 32}


def resolve_imitation_defaults(args: argparse.Namespace,
                               env_spec: registry.EnvironmentSpec) -> list[str]:
    """Fills the ``train-gan`` flags left out: the environment's
    ``imitation_defaults``, else :data:`TRAIN_GAN_DEFAULTS`.

    Returns:
      the names of the settings taken from the environment (recorded in the summary).
    """
    from_environment = []
    for name, fallback in TRAIN_GAN_DEFAULTS.items():
        if getattr(args, name) is not None:
            continue
        if name in env_spec.imitation_defaults:
            setattr(args, name, env_spec.imitation_defaults[name])
            from_environment.append(name)
        else:
            setattr(args, name, fallback)
    return from_environment


class GANCheckpoints:
    """The checkpoints of one ``train-gan`` run: ``.<out name>.checkpoint/`` beside
    ``--out`` (the run directory itself appears only when the run is done).

    ``progress.json`` holds the settings the run was started with, the next block and
    the seconds trained so far; ``state-<block>.npz`` the run's state (every leaf of
    :class:`audit.gan.GANState`, see :func:`audit.checkpoint.save_pytree`) and the
    metrics and evaluations so far. Both are written atomically, the state first, so a
    run killed at any moment leaves a consistent checkpoint.
    """

    def __init__(self, out: Path, settings: dict):
        self.directory = out.parent / f".{out.name}.checkpoint"
        self.settings = as_json(settings)
        self.out = out

    def prepare(self, resume: bool, overwrite: bool) -> dict | None:
        """Checks ``--resume`` / ``--overwrite`` against what is on disk
        (:func:`audit.runs.resume_checkpoint`); returns the progress to resume from (None:
        start afresh)."""
        return resume_checkpoint(self.directory, "progress.json", self.settings, self.out,
                                 resume, overwrite)

    def save(self, state, metrics: dict, evaluations: dict, next_block: int,
             seconds: float) -> None:
        """Writes the state after ``next_block`` blocks, then the progress naming it."""
        import numpy as np

        from audit.checkpoint import save_pytree

        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"state-{next_block:06d}.npz"
        extra = {f"metrics/{k}": np.asarray(v) for k, v in metrics.items()}
        extra.update({f"evaluations/{k}": np.asarray(v) for k, v in evaluations.items()})
        save_pytree(state, self.directory / name, extra)
        write_json(self.directory / "progress.json",
                   {"settings": self.settings, "next_block": next_block, "state_file": name,
                    "seconds": seconds})
        for old in self.directory.glob("state-*.npz"):
            if old.name != name:
                old.unlink()

    def load(self, progress: dict, like) -> tuple[Any, dict, dict]:
        """The state, metrics and evaluations saved with ``progress``."""
        import numpy as np

        from audit.checkpoint import load_pytree

        path = self.directory / str(progress.get("state_file"))
        try:
            state = load_pytree(like, path)
            with np.load(path, allow_pickle=False) as data:
                metrics = {k[len("metrics/"):]: data[k] for k in data.files
                           if k.startswith("metrics/")}
                evaluations = {k[len("evaluations/"):]: data[k] for k in data.files
                               if k.startswith("evaluations/")}
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"--resume: {error}") from None
        return state, metrics, evaluations

    def remove(self) -> None:
        """Deletes the checkpoints (the run is written)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _train_gan_in_chunks(train, config, key, checkpoint_every: int,
                         checkpoints: GANCheckpoints, resumed: dict | None):
    """Runs ``train`` in chunks of blocks, checkpointing after each and stopping at the
    first divergence; returns ``(state, metrics, evaluations, seconds_before)``.

    Every chunk but the last is one compiled program (``first_block`` traced), so a run
    resumed from a checkpoint computes exactly what the uninterrupted run computes.
    """
    import math

    import jax
    import jax.numpy as jnp
    import numpy as np

    from audit import gan

    _, full, _ = gan.block_count(config)
    per_chunk = math.ceil(checkpoint_every / config.eval_every) if checkpoint_every else 0
    chunk = jax.jit(train, static_argnames=("num_blocks",))
    started = time.perf_counter()
    block, state, seconds_before = 0, None, 0.0
    parts: list[tuple[dict, dict]] = []
    if resumed is not None:
        like = jax.eval_shape(lambda k: train(k, num_blocks=per_chunk)[0], key)
        state, metrics, evaluations = checkpoints.load(resumed, like)
        parts.append((metrics, evaluations))
        block, seconds_before = int(resumed["next_block"]), float(resumed["seconds"])
    diverged = False
    while per_chunk and block + per_chunk < full and not diverged:
        state, metrics, evaluations = chunk(key, resume=state, first_block=jnp.int32(block),
                                            num_blocks=per_chunk)
        parts.append(jax.tree.map(np.asarray, (metrics, evaluations)))
        block += per_chunk
        checkpoints.save(state, *_joined(parts), block,
                         seconds_before + time.perf_counter() - started)
        diverged = int(state.diverged_at) >= 0  # stop at once: the state is the last good
    if diverged:
        state = gan.unstacked_state(state, config)
    else:
        last = jax.jit(functools.partial(train, first_block=block))
        state, metrics, evaluations = last(key, resume=state)
        parts.append(jax.tree.map(np.asarray, (metrics, evaluations)))
    jax.block_until_ready(state)
    metrics, evaluations = _joined(parts)
    return state, metrics, evaluations, seconds_before


def _joined(parts: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Metrics and evaluations of consecutive chunks, concatenated."""
    import numpy as np

    metrics = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    evaluations = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    return metrics, evaluations


def run_train_gan(args: argparse.Namespace) -> int:
    """``audit train-gan``: see the subcommand's help."""
    import jax
    import numpy as np
    from flax import nnx

    from audit import gan, gymnax_envs
    from audit.bc import BCConfig
    from audit.checkpoint import save_arrays, save_params
    from audit.discriminator import DiscriminatorConfig, takes_layout
    from audit.plots import training_curves
    from audit.ppo import Critic, PPOSettings

    env_spec = lookup_environment(args.env)
    from_environment = resolve_imitation_defaults(args, env_spec)
    imitator_class = lookup("imitators", args.imitator, "--imitator")
    discriminator_class = lookup("discriminators", args.discriminator, "--discriminator")
    is_gymnax = gymnax_envs.is_gymnax_name(args.env)
    names = tuple(n.strip() for n in args.activations.split(",")) if args.activations else None
    try:
        config = gan.GANConfig(
            iterations=args.steps, episodes=args.rollout_episodes, view=args.view,
            activation_names=names, reward=args.reward,
            ppo=PPOSettings(learning_rate=args.learning_rate, entropy_coef=args.entropy_coef,
                            anneal_lr=args.anneal_lr, update_epochs=args.ppo_epochs,
                            gamma=args.gamma, gae_lambda=args.gae_lambda),
            ppo_minibatches=args.ppo_minibatches, bc_coef=args.bc_coef,
            bc_warm_start=(BCConfig(updates=args.bc_warm_start, learning_rate=2e-3)
                           if args.bc_warm_start > 0 else None),
            discriminator=DiscriminatorConfig(
                updates=args.discriminator_updates,
                batch_episodes=args.discriminator_batch_episodes,
                learning_rate=args.discriminator_learning_rate,
                gradient_penalty=args.gradient_penalty, label_smoothing=args.label_smoothing),
            eval_every=args.eval_every, eval_episodes=args.eval_episodes)
    except ValueError as error:
        raise UsageError(_flag_for(str(error))) from None
    out = args.out or Path("runs", "gan", default_run_name(
        args.env.replace(":", "-"), args.imitator, args.discriminator,
        args.view.replace("+", "-"), f"seed{args.seed}"))
    check_run_dir(out, args.overwrite)

    env, env_params = env_spec.build("train")
    test_params = env_spec.build("test")[1] if "test" in env_spec.splits else None
    observation_shape = tuple(env.observation_space(env_params).shape)

    def make_discriminator(key, feature_size, layout=None):
        # A class that takes the features' layout (e.g. airl) is given it.
        if layout is not None and takes_layout(discriminator_class):
            return discriminator_class(feature_size, rngs=nnx.Rngs(key), layout=layout)
        return discriminator_class(feature_size, rngs=nnx.Rngs(key))

    # Before the (possibly long) expert training and the jit: a discriminator with a
    # fixed longest episode (the attention model's positions) must fit the episodes.
    limit = getattr(nnx.eval_shape(lambda: make_discriminator(jax.random.key(0), 1)),
                    "max_steps", None)
    episode_length = int(env_params.max_steps_in_episode)
    if limit is not None and episode_length > limit:
        raise UsageError(f"--discriminator: {args.discriminator!r} reads episodes of at most "
                         f"{limit} steps; {args.env!r} episodes last up to {episode_length} "
                         "steps (choose mlp or gru)")
    check_memory(env, env_params, episode_length,
                 {"--episodes": args.episodes, "--rollout-episodes": args.rollout_episodes,
                  "--eval-episodes": args.eval_episodes})
    data_key, train_key, eval_key = jax.random.split(jax.random.key(args.seed), 3)
    if is_gymnax:
        demonstrations, expert = gymnax_envs.expert_demonstrations(
            args.env, env, env_params, data_key, args.episodes)
    else:
        from audit.rollout import rollout_expert

        planner_spec = lookup("planners", args.planner, "--planner")
        if not planner_spec.supports(env):
            raise UsageError(f"--planner: {args.planner!r} cannot act in environment "
                             f"{args.env!r}")
        demonstrations = rollout_expert(planner_spec.make(env), env, env_params, data_key,
                                        args.episodes, int(env_params.max_steps_in_episode))
        expert = f"planner {args.planner}"

    def make_imitator(key):
        return imitator_class(observation_shape, env.num_actions, rngs=nnx.Rngs(key))

    def make_critic(key):
        return Critic(int(np.prod(observation_shape)), rngs=nnx.Rngs(key))

    started = time.perf_counter()
    # Built (and its settings checked against the data) before the progress bar starts,
    # so that a bad setting is one line naming its flag.
    advance_to = [lambda done: None]
    try:
        train, modules = gan.make_train(config, env, env_params, make_imitator, make_critic,
                                        make_discriminator, demonstrations,
                                        test_env_params=test_params,
                                        progress=None if args.quiet else
                                        lambda done: advance_to[0](done))
    except ValueError as error:
        raise UsageError(_flag_for(str(error))) from None
    checkpoints = GANCheckpoints(out, {
        "env": args.env, "imitator": args.imitator, "discriminator": args.discriminator,
        "planner": args.planner, "episodes": args.episodes, "seed": args.seed,
        "checkpoint_every": args.checkpoint_every, "gan": _as_dict(config)})
    resumed = checkpoints.prepare(args.resume, args.overwrite)
    with _progress(args.quiet, "adversarial imitation", args.steps) as advance:
        advance_to[0] = advance
        state, metrics, evaluations, seconds_before = _train_gan_in_chunks(
            train, config, train_key, args.checkpoint_every, checkpoints, resumed)
    train_seconds = seconds_before + time.perf_counter() - started
    metrics = {k: np.asarray(v).tolist() for k, v in metrics.items()}
    evaluations = {k: np.asarray(v).tolist() for k, v in evaluations.items()}
    imitator = nnx.merge(modules.actor, state.actor)
    diverged = int(state.diverged_at) >= 0

    final = {}
    if not diverged:
        final = _final_gan_figures(imitator, env_spec, env, env_params, demonstrations,
                                   is_gymnax, args, eval_key)
    summary = {
        **final,
        "final_iteration": {k: v[-1] for k, v in metrics.items()},
        "history": metrics,
        "evaluations": evaluations,
        "diverged": ({"iteration": int(state.diverged_at),
                      "loss": gan.LOSS_NAMES[int(state.diverged_loss)],
                      "value": float(state.diverged_value)} if diverged else None),
        "train_seconds": train_seconds,
        # Imitator-rollout steps: every padded step the loop computed, and those inside
        # episodes (on CartPole an untrained imitator's episodes fill ~5% of the padding).
        "transitions": int(args.steps * args.rollout_episodes
                           * demonstrations.num_steps),
        "valid_transitions": int(round(args.rollout_episodes
                                       * float(np.nansum(metrics["imitator_length"])))),
        "config": {
            "command": "train-gan",
            "env": args.env,
            "imitator": args.imitator,
            "discriminator": args.discriminator,
            "view": args.view,
            "expert": expert,
            "episodes": int(demonstrations.num_episodes),
            # The settings left out on the command line and taken from the environment's
            # imitation_defaults (the others left out are train-gan's own defaults).
            "defaults_from_environment": from_environment,
            "gan": _as_dict(config),
            "seed": args.seed,
        },
        "versions": versions(),
    }
    with run_dir(out, args.overwrite) as staging:
        save_params(imitator, staging / "imitator.npz")
        save_params(nnx.merge(modules.critic, state.critic), staging / "critic.npz")
        save_params(nnx.merge(modules.discriminator, state.discriminator),
                    staging / "discriminator.npz")
        save_arrays({"mean": state.norm.mean, "var": state.norm.var, "count": state.norm.count},
                    staging / "feature_norm.npz")
        write_json(staging / "summary.json", summary)
        training_curves(metrics, evaluations, staging / "curves.png",
                        f"{args.imitator} imitator vs {args.discriminator} discriminator "
                        f"({args.view}) on {args.env}", views=modules.views)
    checkpoints.remove()  # the run is written: nothing left to resume
    if diverged:
        try:
            gan.check_divergence(state)
        except gan.DivergenceError as error:
            print(f"audit train-gan: error: {error}; saved it to {out}", file=sys.stderr)
            return EXIT_FAILURE
    if not args.quiet:
        keys = [k for k in ("kl_train", "kl_test", "event_rate_train", "event_rate_test",
                            "return_train", "return_test", "demonstrator_return_train",
                            "demonstrator_return_test") if k in summary]
        summary_view = dict(summary, **{f"final {k}": v
                                         for k, v in summary["final_iteration"].items()})
        _print_figures(f"{args.imitator} imitator, adversarially trained on {args.env}",
                       summary_view, out,
                       keys + ["final heldout_auroc", "final discriminator_accuracy_imitator",
                               "final discriminator_accuracy_demonstrator", "train_seconds"],
                       files="imitator.npz, discriminator.npz, summary.json and curves.png")
    return 0


def _with_dagger_rounds(args, suite):
    """``suite`` with ``--dagger-rounds`` in its organism settings (if given)."""
    if args.dagger_rounds is None:
        return suite
    import dataclasses

    if not hasattr(suite.organism, "dagger_rounds"):
        raise UsageError(f"--dagger-rounds: suite {args.suite}'s organism settings "
                         f"({type(suite.organism).__name__}) have no dagger_rounds")
    return dataclasses.replace(suite, organism=dataclasses.replace(
        suite.organism, dagger_rounds=args.dagger_rounds))


def run_bench(args: argparse.Namespace) -> int:
    """``audit bench``: see the subcommand's help."""
    import dataclasses

    import numpy as np

    from audit.gan import DivergenceError
    from audit.protocol import AgreedCheckpoint, InvalidOrganismError, SuiteCheckpoint, run_suite

    suite = lookup("suites", args.suite, "--suite")
    if args.envs:
        unknown = [name for name in args.envs if name not in suite.envs]
        if unknown:
            raise UsageError(f"--envs: {', '.join(unknown)} not among suite {args.suite}'s "
                             f"environments ({', '.join(suite.envs)})")
        suite = dataclasses.replace(suite, envs=tuple(dict.fromkeys(args.envs)))
    from audit.adaptive import AdaptiveSuite

    if isinstance(suite, AdaptiveSuite):
        return _run_adaptive_bench(args, suite)
    if args.discriminator_updates:
        suite = dataclasses.replace(suite, gan=dataclasses.replace(
            suite.gan, discriminator=dataclasses.replace(
                suite.gan.discriminator, updates=args.discriminator_updates)))
    suite = _with_dagger_rounds(args, suite)
    if args.zero_constant_features:
        suite = dataclasses.replace(suite, zero_constant_features=True)
    if args.p_values:
        suite = dataclasses.replace(suite, p_values=args.p_values)
    if args.calibration_bootstrap:
        suite = dataclasses.replace(suite, calibration_bootstrap=args.calibration_bootstrap)
    seeds, out = _bench_seeds_and_out(args, suite)
    import jax

    from audit import distributed
    from audit.reports import write_results

    # Several processes (jax.distributed) run one SPMD program: every environment in
    # this process, in the same order everywhere; process 0 writes the run.
    several = distributed.process_count() > 1
    writes = distributed.is_coordinator()
    quiet = args.quiet or not writes
    checkpoint = SuiteCheckpoint(out.parent / f".{out.name}.checkpoint",
                                 {"suite": _as_dict(suite),
                                  "seed_values": list(range(args.seed, args.seed + seeds))})
    # Over several processes the checkpoint is process 0's (beside the --out it writes);
    # the others learn from it what to skip (AgreedCheckpoint).
    refused = None
    if writes:
        try:
            if resume_checkpoint(checkpoint.directory, "run.json", checkpoint.settings, out,
                                 args.resume, args.overwrite) is None:
                checkpoint.start()
        except RunDirError as error:
            refused = error
    if several and not distributed.from_coordinator(np.array(refused is None)):
        if refused is not None:
            raise refused
        raise UsageError("process 0 refused the run's checkpoint (--resume / --overwrite); "
                         "see its error")
    if refused is not None:
        raise refused
    run_checkpoint = (AgreedCheckpoint(checkpoint if writes else None, suite.envs)
                      if several else checkpoint)
    started = time.perf_counter()
    with _stages(quiet, f"{args.suite} suite") as say:
        try:
            results = run_suite(suite, seeds=seeds,
                                cache_dir=None if args.no_cache else args.cache_dir,
                                progress=say,
                                processes=1 if several else args.processes or len(suite.envs),
                                first_seed=args.seed, checkpoint=run_checkpoint,
                                skip_invalid_envs=args.skip_invalid_envs)
        except (InvalidOrganismError, DivergenceError) as error:
            print(f"audit bench: error: {error}", file=sys.stderr)
            return EXIT_FAILURE
        except registry.UnknownNameError as error:  # a suite naming what is not registered
            raise UsageError(f"--suite {args.suite}: {error}") from None
        except registry.ContractError as error:  # a component that breaks its contract
            raise UsageError(f"--suite {args.suite}: {error}") from None
    seconds = time.perf_counter() - started
    metadata = {"suite": args.suite, "seeds": seeds, "first_seed": args.seed,
                "seed_values": list(range(args.seed, args.seed + seeds)), "seconds": seconds,
                "timings": results["timings"], "config": _as_dict(suite),
                "versions": versions(), "cotraining": results["cotraining"],
                "processes": distributed.process_count(), "devices": len(jax.devices()),
                "invalid_envs": results.get("invalid_envs", {})}
    if not writes:
        return 0  # process 0 writes the run; this one computed its share
    with run_dir(out, args.overwrite) as staging, contextlib.ExitStack() as stack:
        # The report's second process starts now: its imports overlap the writing below.
        helper = (_start_report_helper(stack, results["scores"])
                  if not args.no_report and _report_processes() > 1 else None)
        results["scores"].settings["metadata"] = metadata
        results["scores"].save(staging / "scores.npz")
        text = write_results(staging, results, metadata, views=suite.views)
        reported = not args.no_report and _write_report_or_warn(staging, out, "bench", helper)
    checkpoint.remove()  # the run is written: nothing left to resume
    for env, message in metadata["invalid_envs"].items():  # once, by the writing process
        print(f"audit bench: {_left_out(env, message)}", file=sys.stderr)
    if not args.quiet:
        print(text)
        report = ", report.html" if reported else ""
        print(f"wrote results.json, results.csv, results.md, results.tex, scores.npz, ROC "
              f"plots{report} to {out} ({seconds:.0f} s)")
    return 0


def _left_out(env: str, message: str) -> str:
    """The line naming an environment a run left out (``skip_invalid_envs``) and why."""
    return f"{env} left out (the other environments' figures stand): {message}"


def _bench_seeds_and_out(args: argparse.Namespace, suite) -> tuple[int, Path]:
    """``audit bench``'s number of seeds and run directory (checked: not there, or
    ``--overwrite``)."""
    seeds = args.seeds or suite.seeds
    if args.seed + seeds > SEED_LIMIT:
        raise UsageError(f"--seeds: seeds {args.seed}..{args.seed + seeds - 1} go past 2**32 - 1 "
                         "(seeds are 32-bit)")
    run_name = f"seeds{seeds}" if args.seed == 0 else f"seeds{args.seed}-{args.seed + seeds - 1}"
    out = args.out or Path("runs", "bench", default_run_name(args.suite, run_name))
    check_run_dir(out, args.overwrite)
    return seeds, out


def _run_adaptive_bench(args: argparse.Namespace, suite) -> int:
    """``audit bench`` of an :class:`audit.adaptive.AdaptiveSuite`."""
    import dataclasses

    import jax

    from audit import distributed
    from audit.adaptive import run_adaptive, write_adaptive
    from audit.gan import DivergenceError
    from audit.protocol import InvalidOrganismError

    if distributed.process_count() > 1:
        raise UsageError(f"--suite {args.suite}: the adaptive suite runs in one process")
    for flag, given in (("--resume", args.resume),
                        ("--zero-constant-features", args.zero_constant_features),
                        ("--skip-invalid-envs", args.skip_invalid_envs),
                        ("--p-values", args.p_values),
                        ("--calibration-bootstrap", args.calibration_bootstrap)):
        if given:
            raise UsageError(f"{flag}: not available for the adaptive suite {args.suite}")
    suite = _with_dagger_rounds(args, suite)
    if args.discriminator_updates:
        suite = dataclasses.replace(suite, cotraining=dataclasses.replace(
            suite.cotraining, discriminator=dataclasses.replace(
                suite.cotraining.discriminator, updates=args.discriminator_updates)))
    seeds, out = _bench_seeds_and_out(args, suite)
    started = time.perf_counter()
    with _stages(args.quiet, f"{args.suite} suite") as say:
        try:
            results = run_adaptive(suite, seeds=seeds, first_seed=args.seed,
                                   cache_dir=None if args.no_cache else args.cache_dir,
                                   progress=say)
        except (InvalidOrganismError, DivergenceError) as error:
            print(f"audit bench: error: {error}", file=sys.stderr)
            return EXIT_FAILURE
        except registry.UnknownNameError as error:
            raise UsageError(f"--suite {args.suite}: {error}") from None
    seconds = time.perf_counter() - started
    metadata = {"suite": args.suite, "seeds": seeds, "first_seed": args.seed,
                "seed_values": list(range(args.seed, args.seed + seeds)), "seconds": seconds,
                "config": _as_dict(suite), "versions": versions(),
                "devices": len(jax.devices())}
    with run_dir(out, args.overwrite) as staging:
        text = write_adaptive(staging, results, metadata)
    if not args.quiet:
        print(text)
        print(f"wrote results.json, results.md, results.csv, deployment.csv, attack and "
              f"frontier plots to {out} ({seconds:.0f} s)")
    return 0


def run_sweep_command(args: argparse.Namespace) -> int:
    """``audit sweep``: see the subcommand's help."""
    import dataclasses

    from audit.gan import DivergenceError
    from audit.protocol import InvalidOrganismError

    sweep = lookup("sweeps", args.name, "NAME")
    if sweep.experiment != "suite" and args.values:
        raise UsageError(f"--values: the {args.name} sweep is a {sweep.experiment} probe "
                         "without values")
    for flag, given in (("--p-values", args.p_values),
                        ("--calibration-bootstrap", args.calibration_bootstrap)):
        if sweep.experiment != "suite" and given:
            raise UsageError(f"{flag}: the {args.name} sweep is a {sweep.experiment} probe "
                             "without p-values")
    values = tuple(args.values) if args.values else sweep.values_for(args.setting)
    if len(set(values)) != len(values):
        raise UsageError(f"--values: each value once, got {list(values)}")
    try:
        base = registry.get("suites", sweep.suite_for(args.setting))
        from audit.protocol import Suite

        if not isinstance(base, Suite):
            raise UsageError(f"NAME {args.name}: its suite {sweep.suite_for(args.setting)!r} "
                             f"({type(base).__name__}) is not an audit.protocol.Suite, "
                             "which a sweep runs")
        if args.p_values:
            base = dataclasses.replace(base, p_values=args.p_values)
        if args.calibration_bootstrap:
            base = dataclasses.replace(base, calibration_bootstrap=args.calibration_bootstrap)
        for value in values:  # a value the setting refuses fails here, before any run
            sweep.apply(base, value)
    except registry.UnknownNameError as error:
        raise UsageError(f"NAME {args.name}: {error}") from None
    except ValueError as error:
        raise UsageError(f"--values: {error}") from None
    last_seed = args.seed + (args.seeds or sweep.seeds_for(args.setting, base)) - 1
    if last_seed >= SEED_LIMIT:
        raise UsageError(f"--seeds: seeds {args.seed}..{last_seed} go past 2**32 - 1 "
                         "(seeds are 32-bit)")
    out = args.out or Path("runs", "sweep", default_run_name(args.name, args.setting))
    check_run_dir(out, args.overwrite)
    started = time.perf_counter()
    if sweep.experiment == "counterfactual":
        if args.resume:
            raise UsageError(f"--resume: the {args.name} probe has no points to resume; "
                             "run it again")
        run = _run_probe_into
    else:
        run = functools.partial(_run_sweep_into, checkpoint=_sweep_checkpoint(
            sweep, args, values, base, out))
    try:
        seconds, outcome = run(sweep, args, values, base, out, started)
    except (InvalidOrganismError, DivergenceError) as error:  # the partial run is removed
        print(f"audit sweep: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except registry.ContractError as error:
        raise UsageError(f"NAME {args.name}: {error}") from None
    for point in outcome.get("points", []):
        if "error" in point:  # a finding, not a crash: the other points stand
            print(f"audit sweep: {sweep.parameter} = {point['value']} has no figures: "
                  f"{point['error']}", file=sys.stderr)
        for env, message in (point.get("invalid_envs") or {}).items():
            print(f"audit sweep: {sweep.parameter} = {point['value']}: "
                  f"{_left_out(env, message)}", file=sys.stderr)
    if not args.quiet:
        done = sum("error" not in p for p in outcome.get("points", []))
        points = f" and {done} run directories under points/" if values else ""
        print(f"wrote {sweep.name}.csv, {sweep.name}.png, {sweep.name}.pdf, sweep.json"
              f"{points} to {out} ({seconds:.0f} s)")
        if sweep.experiment == "counterfactual":
            for row in outcome["model_level"]:
                interval = ("" if row["auroc_ci_low"] is None else
                            f" [{row['auroc_ci_low']:.2f}, {row['auroc_ci_high']:.2f}]")
                auroc = "n/a" if row["auroc"] is None else f"{row['auroc']:.2f}"
                print(f"  {row['env']}: AUROC {auroc}{interval} ({row['incorrigible_models']} "
                      f"incorrigible vs {row['honest_models']} honest models)")
    return 0


def _run_probe_into(sweep, args, values, base, out, started):
    """The counterfactual probe (:mod:`audit.counterfactual`) into ``out``, atomically."""
    from audit.counterfactual import run_counterfactual, shift_plot
    from audit.sweeps import csv_table

    seeds = args.seeds or sweep.seeds_for(args.setting, base)
    with run_dir(out, args.overwrite) as staging, \
            _stages(args.quiet, f"sweep {args.name}") as say:
        outcome = run_counterfactual(
            base, tuple(range(args.seed, args.seed + seeds)),
            cache_dir=None if args.no_cache else args.cache_dir, resamples=base.resamples,
            progress=say)
        (staging / f"{sweep.name}.csv").write_text(csv_table(
            outcome["model_level"], ("env", "statistic", "incorrigible_models",
                                     "honest_models", "auroc", "auroc_ci_low",
                                     "auroc_ci_high")))
        (staging / f"{sweep.name}_models.csv").write_text(csv_table(
            outcome["models"], ("env", "organism", "kind", "seed", "shift", "shift_ci_low",
                                "shift_ci_high")))
        shift_plot(outcome["models"], outcome["model_level"], staging / sweep.name)
        seconds = time.perf_counter() - started
        write_json(staging / "sweep.json", {
            "sweep": sweep.name, "suite": base.name, "experiment": sweep.experiment,
            "setting": args.setting, "seeds": seeds, "first_seed": args.seed,
            "seconds": seconds, "skipped_envs": outcome["skipped"],
            "config": _as_dict(base), "versions": versions(),
            "model_level": outcome["model_level"], "models": outcome["models"]})
        if not args.no_report:
            _write_report_or_warn(staging, out, "sweep")
    return seconds, outcome


def _sweep_checkpoint(sweep, args, values, base, out):
    """The sweep's checkpoint beside ``out``, fresh or (``--resume``) found."""
    from audit.sweeps import SweepCheckpoint

    seeds = args.seeds or sweep.seeds_for(args.setting, base)
    # "invalid_envs": a checkpoint of a sweep from before environments were left out one
    # by one (a whole point then went without figures) is refused, not mixed in.
    checkpoint = SweepCheckpoint(out.parent / f".{out.name}.checkpoint", {
        "sweep": sweep.name, "setting": args.setting, "values": list(values),
        "seeds": seeds, "first_seed": args.seed, "suite": _as_dict(base),
        "invalid_envs": "left out one by one"})
    if resume_checkpoint(checkpoint.directory, "run.json", checkpoint.settings, out,
                         args.resume, args.overwrite) is None:
        checkpoint.start()
    return checkpoint


def _run_sweep_into(sweep, args, values, base, out, started, checkpoint):
    """Runs the sweep into a staging directory that becomes ``out`` only if it finishes;
    each finished point is kept in ``checkpoint`` until then (``--resume``)."""
    from audit.reports import write_results
    from audit.sweeps import csv_text, run_sweep, sweep_plot

    seeds = args.seeds or sweep.seeds_for(args.setting, base)
    with run_dir(out, args.overwrite) as staging, \
            _stages(args.quiet, f"sweep {args.name}") as say:
        def write_point(value, results, suite):
            name = f"{sweep.parameter}={value}"
            final = checkpoint.point_directory(name)
            shutil.rmtree(final, ignore_errors=True)  # a half-moved leftover of a kill
            final.parent.mkdir(parents=True, exist_ok=True)
            with run_dir(final, overwrite=True) as point:
                metadata = {"suite": suite.name, "sweep": sweep.name,
                            "parameter": sweep.parameter, "value": value, "seeds": seeds,
                            "first_seed": args.seed, "timings": results["timings"],
                            "config": _as_dict(suite), "versions": versions(),
                            "cotraining": results["cotraining"],
                            "invalid_envs": results.get("invalid_envs", {})}
                results["scores"].settings["metadata"] = metadata
                results["scores"].save(point / "scores.npz")
                write_results(point, results, metadata, views=suite.views)
                if not args.no_report:
                    _write_report_or_warn(point, out / "points" / name, "sweep")

        outcome = run_sweep(sweep, values, args.setting, seeds=seeds, first_seed=args.seed,
                            cache_dir=None if args.no_cache else args.cache_dir,
                            progress=say, processes=args.processes or len(base.envs),
                            point_done=write_point, checkpoint=checkpoint, base=base)
        for point in outcome["points"]:
            name = f"{sweep.parameter}={point['value']}"
            if "error" not in point:
                shutil.copytree(checkpoint.point_directory(name), staging / "points" / name)
        (staging / f"{sweep.name}.csv").write_text(csv_text(outcome["rows"]))
        sweep_plot(outcome["rows"], sweep, values, staging / sweep.name,
                   failed=[p["value"] for p in outcome["points"] if "error" in p],
                   invalid_envs={p["value"]: list(p["invalid_envs"])
                                 for p in outcome["points"] if p.get("invalid_envs")})
        seconds = time.perf_counter() - started
        write_json(staging / "sweep.json", {
            "sweep": sweep.name, "suite": sweep.suite, "parameter": sweep.parameter,
            "setting": args.setting, "values": list(values), "seeds": seeds,
            "first_seed": args.seed, "seconds": seconds,
            "point_seconds": {str(p["value"]): p["seconds"] for p in outcome["points"]},
            "failed_points": {str(p["value"]): p["error"] for p in outcome["points"]
                              if "error" in p},
            "invalid_envs": {str(p["value"]): p["invalid_envs"] for p in outcome["points"]
                             if p.get("invalid_envs")},
            "figures": list(sweep.figures), "versions": versions(), "rows": outcome["rows"]})
        if not args.no_report:
            _write_report_or_warn(staging, out, "sweep")
    checkpoint.remove()  # the sweep is written: nothing left to resume
    return seconds, outcome


def _report_processes() -> int:
    """2 where this process may use two cores (a report's episode strips are drawn in a
    second process), else 1."""
    from audit.workers import available_cores

    return min(2, available_cores())


def _start_report_helper(stack: contextlib.ExitStack, store):
    """The report's second process, started early (:func:`audit.html_report.start_helper`);
    None (the report starts its own, or draws alone) if it cannot be started."""
    from audit.html_report import start_helper

    try:
        return start_helper(stack, store)
    except Exception:  # noqa: BLE001 -- the report starts its own process, as before
        return None


def _write_report_or_warn(directory: Path, final: Path, command: str, helper=None) -> bool:
    """Writes ``directory``'s report.html; a failure is a warning, never the run's loss."""
    from audit.html_report import write_report

    try:
        write_report(directory, processes=_report_processes(), helper=helper)
    except Exception as error:  # noqa: BLE001 -- the figures are written; keep them
        print(f"audit {command}: warning: report.html was not written ({type(error).__name__}: "
              f"{error}); run `audit report {final}` to write it", file=sys.stderr)
        return False
    return True


def run_report(args: argparse.Namespace) -> int:
    """``audit report``: see the subcommand's help."""
    from audit.html_report import ReportError, write_report

    if args.highlight is not None and args.highlight.count("/") < 1:
        raise UsageError(f"--highlight: expected DETECTOR/VIEW (e.g. mahalanobis/activations), "
                         f"got {args.highlight!r}")
    started = time.perf_counter()
    try:
        path = write_report(args.run_dir, highlight=args.highlight,
                            processes=_report_processes())
    except ReportError as error:
        raise UsageError(f"RUN_DIR: {error}") from None
    if not args.quiet:
        size = path.stat().st_size / 1e6
        print(f"wrote {path} ({size:.1f} MB) and its figures under "
              f"{path.parent / 'figures'} ({time.perf_counter() - started:.0f} s)")
    return 0


def run_render(args: argparse.Namespace) -> int:
    """``audit render``: see the subcommand's help."""
    import jax
    import numpy as np

    from audit.render import episode_frames, strip_figure, write_gif
    from audit.rollout import rollout, rollout_expert

    env_spec = lookup_environment(args.env)
    if env_spec.render is None:
        raise UsageError(f"--env: {args.env!r} has no renderer (EnvironmentSpec.render); "
                         "the gridworlds offswitch, takeover and unobserved have one")
    if args.split not in env_spec.splits:
        raise UsageError(f"--split: unknown split {args.split!r} for environment {args.env!r}; "
                         f"choose from: {', '.join(env_spec.splits)}")
    policy = args.planner if args.imitator is None else args.imitator.name
    out = args.out or Path("runs", "render",
                           f"{args.env}-{args.split}-{policy}-seed{args.seed}.gif")
    if out.suffix.lower() not in (".gif", ".png", ".pdf"):
        raise UsageError(f"--out: expected a .gif, .png or .pdf file, got {out}")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite to replace it")
    env, env_params = env_spec.build(args.split)
    max_steps = int(env_params.max_steps_in_episode)
    check_memory(env, env_params, max_steps, {"--episodes": args.episodes})
    key = jax.random.key(args.seed)
    if args.imitator is None:
        planner_spec = lookup("planners", args.planner, "--planner")
        if not planner_spec.supports(env):
            raise UsageError(f"--planner: {args.planner!r} cannot act in environment "
                             f"{args.env!r}")
        episodes = rollout_expert(planner_spec.make(env), env, env_params, key, args.episodes,
                                  max_steps)
    else:
        episodes = rollout(_saved_imitator(args.imitator, args.env, env, env_params), env,
                           env_params, key, args.episodes, max_steps)
    observations, mask = np.asarray(episodes.observations), np.asarray(episodes.mask)
    events = np.asarray(episodes.events)
    frames, event_frames, first_event = [], [], None
    for episode in range(args.episodes):
        hits = np.flatnonzero((events[episode] > 0) & mask[episode])
        if hits.size:
            event_frames.append(len(frames) + int(hits[0]))
            first_event = int(hits[0]) if first_event is None else first_event
        frames.extend(episode_frames(env_spec.render, observations[episode], mask[episode],
                                     args.scale))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".gif":
        write_gif(frames, out, args.frame_seconds, event_steps=event_frames)
    else:
        from matplotlib import pyplot as plt

        figure = strip_figure(frames, event_step=first_event if args.episodes == 1 else None,
                              title=f"{args.env} ({args.split}), {policy}, seed {args.seed}")
        figure.savefig(out, dpi=150)
        plt.close(figure)
    if not args.quiet:
        names = env_spec.event_names
        happened = sorted({names[int(c)] for c in events[mask & (events > 0)]})
        print(f"wrote {out}: {args.episodes} episode(s), {len(frames)} frames; hidden events: "
              f"{', '.join(happened) if happened else 'none'}")
    return 0


def _saved_imitator(run_dir: Path, env_name: str, env, env_params):
    """The imitator saved by ``train-bc`` or ``train-gan`` in ``run_dir``, parameters loaded."""

    from flax import nnx

    from audit.checkpoint import load_params

    # train-gan writes imitator.npz (beside its critic and discriminator), train-bc params.npz.
    summary_path = run_dir / "summary.json"
    params_path = next((run_dir / name for name in ("imitator.npz", "params.npz")
                        if (run_dir / name).is_file()), run_dir / "imitator.npz")
    for path in (summary_path, params_path):
        if not path.is_file():
            raise UsageError(f"--imitator: {path} not found (expected a train-bc or train-gan "
                             "run directory)")
    try:
        config = json.loads(summary_path.read_text())["config"]
        name, trained_on = config["imitator"], config["env"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--imitator: {summary_path} has no config.imitator / config.env "
                         f"({error})") from None
    if trained_on != env_name:
        raise UsageError(f"--imitator: {run_dir} holds an imitator of {trained_on!r}, not of "
                         f"--env {env_name!r}")
    imitator_class = lookup("imitators", name, "--imitator")
    observation_shape = env.observation_space(env_params).shape
    imitator = imitator_class(observation_shape, env.num_actions, rngs=nnx.Rngs(0))
    try:
        return load_params(imitator, params_path)
    except ValueError as error:
        raise UsageError(f"--imitator: {params_path}: {error}") from None


def run_metrics(args: argparse.Namespace) -> int:
    """``audit metrics``: see the subcommand's help."""
    from audit import figures
    from audit.reports import results_payload
    from audit.scores import ScoreFileError, ScoreStore

    if not args.run_dir.is_dir():
        raise UsageError(f"RUN_DIR {args.run_dir}: no such directory")
    try:
        store = ScoreStore.load(args.run_dir / "scores.npz")
    except ScoreFileError as error:
        raise UsageError(str(error)) from None
    out = args.out or args.run_dir / "recomputed.json"
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    if args.p_values:
        store.settings["p_values"] = args.p_values
    if args.calibration_bootstrap:
        store.settings["calibration_bootstrap"] = args.calibration_bootstrap
    results = figures.compute(store)
    metadata = dict(store.settings.get("metadata", {}))
    # Recomputed another way than the run's: say so.
    for name in ("p_values", "calibration_bootstrap"):
        if getattr(args, name):
            metadata[name] = getattr(args, name)
    write_json(out, results_payload(results, metadata))
    if not args.quiet:
        print(f"recomputed {len(results['rows'])} rows from {args.run_dir / 'scores.npz'}; "
              f"wrote {out}")
    return 0


def _stages(quiet: bool, label: str):
    """A context manager yielding ``say(stage)``: a spinner with the current stage."""
    import contextlib

    if quiet:
        return contextlib.nullcontext(lambda stage: None)

    @contextlib.contextmanager
    def spinner():
        from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), "[progress.description]{task.description}",
                      TimeElapsedColumn(), transient=False) as progress:
            task = progress.add_task(label, total=None)
            yield lambda stage: progress.update(task, description=f"{label}: {stage}")

    return spinner()


def _final_gan_figures(imitator, env_spec, env, env_params, demonstrations, is_gymnax, args,
                       key) -> dict:
    """Figures of the final imitator: the train-bc figures, or return and KL for gymnax."""
    import jax
    import numpy as np

    if not is_gymnax and "test" in env_spec.splits:
        from audit.evaluate import imitation_figures

        return imitation_figures(imitator, env_spec, lookup("planners", args.planner,
                                                            "--planner"),
                                 key, args.eval_episodes)
    from audit.bc import masked_kl
    from audit.gymnax_envs import expert_demonstrations
    from audit.rollout import rollout, teacher_forced

    demo_key, own_key = jax.random.split(key)
    if is_gymnax:
        fresh, _ = expert_demonstrations(args.env, env, env_params, demo_key, args.eval_episodes)
    else:
        fresh = demonstrations
    logits, _ = teacher_forced(imitator, fresh)
    own = rollout(imitator, env, env_params, own_key, args.eval_episodes, fresh.num_steps)
    return {"kl_train": float(masked_kl(fresh.action_probs, logits, fresh.mask)),
            "return_train": float(np.asarray(own.episode_returns()).mean()),
            "demonstrator_return_train": float(np.asarray(fresh.episode_returns()).mean())}


def _flag_for(message: str) -> str:
    """Maps a config error (``GANConfig.x ...``) to the command-line flag that sets it."""
    flags = {"divisible by ppo_minibatches": "--rollout-episodes and --ppo-minibatches",
             "GANConfig.view": "--view", "unknown view": "--view", "GANConfig.reward": "--reward",
             "GANConfig.episodes": "--rollout-episodes", "PPOSettings.learning_rate":
             "--learning-rate", "GANConfig.activation_names": "--activations",
             "DiscriminatorConfig.learning_rate": "--discriminator-learning-rate",
             "DiscriminatorConfig.gradient_penalty": "--gradient-penalty",
             "DiscriminatorConfig.label_smoothing": "--label-smoothing",
             "GANConfig.bc_coef": "--bc-coef", "PPOSettings.entropy_coef": "--entropy-coef",
             "GANConfig.ppo_minibatches": "--ppo-minibatches",
             "PPOSettings.update_epochs": "--ppo-epochs", "PPOSettings.gamma": "--gamma",
             "PPOSettings.gae_lambda": "--gae-lambda",
             "DiscriminatorConfig.batch_episodes": "--discriminator-batch-episodes",
             "needs activations": "--activations"}
    for prefix, flag in flags.items():
        if prefix in message:
            return f"{flag}: {message}"
    return message


def _progress(quiet: bool, label: str, total: int):
    """A context manager yielding ``advance(done)`` for a rich progress bar (no-op if quiet)."""
    import contextlib

    if quiet:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar():
        from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        with Progress("[progress.description]{task.description}", BarColumn(),
                      "{task.completed}/{task.total}", TimeElapsedColumn(),
                      TimeRemainingColumn(), transient=False) as progress:
            task = progress.add_task(label, total=total)
            yield lambda done: progress.update(task, completed=int(done))

    return bar()


def _print_figures(title: str, summary: dict, out: Path, keys,
                   files: str = "params.npz and summary.json") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in keys:
        value = summary[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"wrote {files} to {out}")


def _as_dict(obj) -> dict | None:
    """A (possibly nested) dataclass of numbers, strings and arrays as JSON-ready data."""
    import dataclasses

    import numpy as np

    def plain(value):
        if dataclasses.is_dataclass(value):
            return _as_dict(value)
        if value is None or isinstance(value, str | bool):
            return value
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()

    if obj is None:
        return None
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['planner']} on {summary['env']} ({summary['split']} layouts)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("episodes", str(summary["episodes"]))
    table.add_row("incorrigible-event rate", f"{summary['event_rate']:.3f}")
    for name, count in summary["event_counts"].items():
        table.add_row(f"  {name} (steps)", str(count))
    table.add_row("return (mean)", f"{summary['return_mean']:.2f}")
    table.add_row("length (mean)", f"{summary['length_mean']:.1f}")
    table.add_row("seconds (with compilation)", f"{summary['seconds']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"wrote {out}/trajectories.npz and {out}/summary.json")


def _description(component) -> str:
    text = getattr(component, "description", "") or (
        (getattr(component, "__doc__", "") or "").strip().splitlines() or [""])[0]
    return " ".join(str(text).split())


def run_list(args: argparse.Namespace) -> int:
    """``audit list``: see the subcommand's help."""
    if args.group is not None and args.group not in registry.GROUPS:
        raise UsageError(f"GROUP: unknown group {args.group!r}; choose from: "
                         f"{', '.join(registry.GROUPS)}")
    for group in [args.group] if args.group else registry.GROUPS:
        print(f"{group}:")
        entries = []
        for name in registry.names(group):
            try:
                component = registry.get(group, name)
                entries.append((name, registry.origin(group, name), _description(component)))
            except Exception as error:  # a broken entry point: listed, not fatal
                entries.append((name, registry.origin(group, name),
                                f"(cannot be loaded: {type(error).__name__}: {error})"))
        for prefix in registry.families(group):
            try:
                resolve = registry.family(group, prefix)
                description = "a family: " + _description(resolve)
            except Exception as error:
                description = f"(cannot be loaded: {type(error).__name__}: {error})"
            entries.append((f"{prefix}{registry.FAMILY_SEPARATOR}<name>",
                            registry.family_origin(group, prefix), description))
        width = max((len(name) for name, *_ in entries), default=0)
        origin_width = max((len(where) for _, where, _ in entries), default=0)
        for name, where, description in entries:
            print(f"  {name:<{width}}  {where:<{origin_width}}  {description}".rstrip())
    return 0


def _configure_compile_cache(args: argparse.Namespace) -> None:
    """JAX's persistent compilation cache as the flags (or the environment) ask."""
    from audit import compile_cache

    off = args.no_compile_cache_before or args.no_compile_cache
    directory = args.compile_cache or args.compile_cache_before
    if off and directory is not None:
        raise UsageError("--compile-cache and --no-compile-cache: give one of them")
    if off:
        compile_cache.configure(None)
    else:
        compile_cache.configure(directory if directory is not None
                                else compile_cache.default_directory())


def _join_processes(args: argparse.Namespace) -> None:
    """Joins the other processes of a multi-process run (flags or environment)."""
    from audit import distributed

    settings = distributed.settings_from(args.coordinator_address, args.num_processes,
                                         args.process_id)
    if settings is None:
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        raise UsageError(f"--coordinator-address: only `audit {' / '.join(DISTRIBUTED_COMMANDS)}"
                         f"` runs over several processes, not `audit {args.command}`")
    distributed.initialize(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``audit`` console script; returns the exit code."""
    from audit import numerics, plugins

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's errors and --help: return the code, don't raise
        return int(exit_.code or 0)
    try:
        numerics.full_float32_matmuls()
        _join_processes(args)
        _configure_compile_cache(args)
    except (UsageError, ValueError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        plugins.load_all([*args.plugins_before, *args.plugins])
    except plugins.PluginError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _stopped_by_signals():
            return args.handler(args)
    except (UsageError, RunDirError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Stopped as stop:
        print(f"{parser.prog} {args.command}: stopped by {stop.signal_name}; finished work "
              "is kept in the run's checkpoint where the command has one (--resume)",
              file=sys.stderr)
        return 128 + stop.signal_number


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: unwinds the command like Ctrl-C, so that its clean-ups
    run (worker processes stopped, half-written run directories removed)."""

    def __init__(self, signal_number: int):
        import signal

        super().__init__(signal_number)
        self.signal_number = signal_number
        self.signal_name = signal.Signals(signal_number).name


@contextlib.contextmanager
def _stopped_by_signals():
    """SIGINT and SIGTERM raise :class:`Stopped` while the command runs (main thread
    only; the previous handlers come back afterwards)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signal_number, frame):
        raise Stopped(signal_number)

    previous = {number: signal.signal(number, stop)
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
