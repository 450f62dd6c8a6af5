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
    demos.add_argument("--seed", type=int, default=0, help="default 0")
    demos.add_argument("--out", type=Path, default=None,
                       help="output directory (default runs/demos/<timestamp>-<env>-...)")
    demos.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    demos.add_argument("--quiet", action="store_true", help="print nothing but errors")
    demos.set_defaults(handler=run_demos)
    return parser


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
