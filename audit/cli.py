"""The ``audit`` command line: the one place where named components are composed.

Usage errors (an unknown name, a bad value, an output directory that exists) are
reported on one line, ``audit <command>: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from audit import registry
from audit.runs import RunDirError, check_run_dir, default_run_name, run_dir, versions, write_json

EXIT_USAGE = 2


class UsageError(Exception):
    """A user error: printed on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage block first; we want one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="audit", description=__doc__.splitlines()[0])
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
    bc.add_argument("--learning-rate", type=float, default=1e-3, help="default 1e-3")
    bc.add_argument("--eval-episodes", type=positive_int, default=512,
                    help="episodes per evaluation set (default 512)")
    add_run_arguments(bc, "runs/bc/<timestamp>-<env>-<imitator>-...")
    bc.set_defaults(handler=run_train_bc)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``--seed``, ``--out``, ``--overwrite`` and ``--quiet``, shared by every run command."""
    parser.add_argument("--seed", type=int, default=0, help="default 0")
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


def run_demos(args: argparse.Namespace) -> int:
    """``audit demos``: see the subcommand's help."""
    import jax

    from audit.rollout import rollout_expert
    from audit.trajectories import save_npz, summary_statistics

    env_spec = lookup("environments", args.env, "--env")
    planner_spec = lookup("planners", args.planner, "--planner")
    if args.split not in env_spec.splits:
        raise UsageError(f"--split: unknown split {args.split!r} for environment {args.env!r}; "
                         f"choose from: {', '.join(env_spec.splits)}")
    out = args.out or Path("runs", "demos", default_run_name(args.env, args.split, args.planner,
                                                             f"seed{args.seed}"))
    check_run_dir(out, args.overwrite)

    env, env_params = env_spec.build(args.split)
    if not planner_spec.supports(env):
        raise UsageError(f"--planner: {args.planner!r} cannot act in environment {args.env!r}")
    planner = planner_spec.make(env)
    max_steps = args.max_steps or int(env_params.max_steps_in_episode)

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
    from flax import nnx

    from audit.bc import BCConfig, make_train
    from audit.checkpoint import save_params
    from audit.evaluate import imitation_figures
    from audit.trajectories import load_npz

    env_spec = lookup("environments", args.env, "--env")
    imitator_class = lookup("imitators", args.imitator, "--imitator")
    demonstrator_spec = lookup("planners", "demonstrator", "demonstrator")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning-rate: expected a positive number, got {args.learning_rate}")
    if "test" not in env_spec.splits:
        raise UsageError(f"--env: {args.env!r} has no test split; train-bc reports test figures")
    demos_file = None
    if args.demos is not None:
        demos_file = args.demos / "trajectories.npz"
        if not demos_file.is_file():
            raise UsageError(f"--demos: no trajectories.npz in {args.demos} "
                             "(write one with `audit demos`)")
    out = args.out or Path("runs", "bc", default_run_name(args.env, args.imitator,
                                                          f"seed{args.seed}"))
    check_run_dir(out, args.overwrite)

    train_env, train_params = env_spec.build("train")
    demonstrator = demonstrator_spec.make(train_env)
    observation_shape = tuple(train_env.observation_space(train_params).shape)
    num_actions = train_env.num_actions
    key = jax.random.key(args.seed)
    data_key, train_key, eval_key = jax.random.split(key, 3)
    if demos_file is not None:
        demonstrations = load_npz(demos_file)
        if tuple(demonstrations.observations.shape[2:]) != observation_shape:
            raise UsageError(f"--demos: observations of shape "
                             f"{tuple(demonstrations.observations.shape[2:])} do not fit "
                             f"{args.env!r} ({observation_shape})")
    else:
        from audit.rollout import rollout_expert

        demonstrations = rollout_expert(demonstrator, train_env, train_params, data_key,
                                        args.episodes or 1024,
                                        int(train_params.max_steps_in_episode))

    def make_imitator(key):
        return imitator_class(observation_shape, num_actions, rngs=nnx.Rngs(key))

    config = BCConfig(updates=args.updates, batch_episodes=args.batch_episodes,
                      learning_rate=args.learning_rate)
    started = time.perf_counter()
    with _progress(args.quiet, "behaviour cloning", args.updates) as advance:
        train, graphdef = make_train(config, make_imitator, demonstrations, progress=advance)
        params, losses = jax.jit(train)(train_key)
        jax.block_until_ready(losses)
    train_seconds = time.perf_counter() - started
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


def _print_figures(title: str, summary: dict, out: Path, keys) -> None:
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
    console.print(f"wrote {out}/params.npz and {out}/summary.json")


def _as_dict(obj) -> dict | None:
    import dataclasses

    import numpy as np

    if obj is None:
        return None
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {k: (np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist())
            for k, v in fields.items()}


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``audit`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's errors and --help: return the code, don't raise
        return int(exit_.code or 0)
    try:
        return args.handler(args)
    except (UsageError, RunDirError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
