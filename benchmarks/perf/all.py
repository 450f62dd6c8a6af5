"""Every performance script with small budgets, into one JSON (a benchmark script).

    python -m benchmarks.perf.all [--out perf-all.json] [--report-run RUN_DIR]
                                  [--with-imitation] [--only gan,devices]

Runs each script of :mod:`benchmarks.perf` in a process of its own, one after the
other, with budgets small enough for the whole set to take a few minutes on 2 CPU
cores: the figures show where the time goes and how it grows, not the full-budget
figures of docs/performance.md. Each script's printed table, exit status, wall time
and (where the script writes one) its JSON go into ``--out``, with the versions and
the machine; the printed summary lists each script's status and time.

- ``envs``: steps/s of 512 vmapped environments, three ways of stepping.
- ``imitation``: BC samples/s and rollout steps/s per imitator.
- ``planner``: the planner imitator's microseconds per observation, piece by piece.
- ``gan``: the GAN run's transitions/s at 1 and 8 seeds.
- ``devices``: the same run over 1 device and one per core, side by side.
- ``compare``: the GAIL comparison's ``--quick`` smoke run, this project's side only
  unless ``--with-imitation`` (which needs the ``imitation`` venv, see
  :mod:`benchmarks.perf.compare`).
- ``figures``: a run's figures (the bootstrap) with each seed's resamples evaluated at
  once and one call per resample, side by side, on synthetic scores.
- ``report``: the visual report's weight, only with ``--report-run`` (a finished
  bench run) and Chromium installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from audit.runs import versions, write_json


def scripts(scratch: Path, report_run: Path | None, with_imitation: bool
            ) -> dict[str, tuple[list[str], Path | None]]:
    """``{name: (arguments of python -m, JSON file it writes or None)}``."""
    found = {
        "envs": (["benchmarks.perf.envs", "--num-envs", "512", "--steps", "64", "--layouts",
                  "512", "--horizon", "32", "--repeats", "2"], None),
        "imitation": (["benchmarks.perf.imitation", "--updates", "20", "--episodes", "128",
                       "--repeats", "2"], None),
        "planner": (["benchmarks.perf.planner", "--batches", "32,256", "--calls", "5"], None),
        "gan": (["benchmarks.perf.gan", "--iterations", "2", "--seeds", "1,8", "--repeats",
                 "2", "--json", str(scratch / "gan.json")], scratch / "gan.json"),
        "devices": (["benchmarks.perf.devices", "--seeds", "4", "--iterations", "2",
                     "--repeats", "2"], None),
        "compare": (["benchmarks.perf.compare", "--quick", "--out", str(scratch / "compare"),
                     *([] if with_imitation else ["--skip-imitation"])],
                    scratch / "compare" / "perf.json"),
        "figures": (["benchmarks.perf.figures", "--resamples", "200", "--seeds", "3",
                     "--cells", "4", "--episodes", "128"], None),
    }
    if report_run is not None:
        found["report"] = (["benchmarks.perf.report", str(report_run), "--repeats", "3"], None)
    return found


def main(argv=None) -> int:
    """Runs the scripts; returns 0 if every one succeeded, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("perf-all.json"))
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--report-run", type=Path, default=None,
                        help="a finished bench run for the report script")
    parser.add_argument("--with-imitation", action="store_true",
                        help="run the imitation library's side of the comparison too")
    parser.add_argument("--only", default=None, help="comma-separated script names")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    if args.report_run is not None and not (args.report_run / "report.html").is_file():
        parser.error(f"--report-run {args.report_run}: no report.html there")

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        chosen = scripts(Path(scratch), args.report_run, args.with_imitation)
        if args.only:
            unknown = sorted(set(args.only.split(",")) - set(chosen))
            if unknown:
                parser.error(f"--only: unknown script(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(chosen)}")
            chosen = {name: chosen[name] for name in args.only.split(",")}
        for name, (arguments, json_file) in chosen.items():
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", *arguments], capture_output=True,
                                  text=True, env=dict(os.environ))
            seconds = time.perf_counter() - started
            record = {"command": "python -m " + " ".join(arguments),
                      "returncode": done.returncode, "seconds": round(seconds, 2),
                      "stdout": done.stdout}
            if done.returncode:
                record["stderr_tail"] = done.stderr[-4000:]
            if json_file is not None and json_file.is_file():
                record["json"] = json.loads(json_file.read_text())
            results[name] = record
            status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
            print(f"{name:<10} {status:<18} {seconds:7.1f} s", flush=True)
            if done.returncode == 0:
                print("    " + done.stdout.strip().replace("\n", "\n    "), flush=True)
    write_json(args.out, {"scripts": results, "versions": versions(),
                          "machine": {"platform": platform.platform(),
                                      "cpu_count": os.cpu_count()}})
    print(f"wrote {args.out}")
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
