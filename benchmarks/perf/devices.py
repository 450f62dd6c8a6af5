"""The seed axis over 1, 2, ... devices, side by side (a benchmark script).

    python -m benchmarks.perf.devices [--devices 1,2] [--seeds 8] [--iterations 5]

Runs :mod:`benchmarks.perf.gan` (the whole GAN run vmapped over seeds, the seed axis
sharded over the devices by :func:`audit.sharding.seed_parallel`) once per device
count, each in a process of its own started with ``JAX_NUM_CPU_DEVICES=<n>`` (on a CPU
host a device count is fixed when JAX starts), one after the other, and prints each
count's valid transitions per second and its speed-up over the first count. On a GPU
or TPU host the devices are the accelerators and the counts above their number are
skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> None:
    """Prints transitions/s and the speed-up at each device count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default=f"1,{os.cpu_count() or 1}",
                        help="comma-separated device counts (default: 1 and one per core)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--env", default="offswitch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    counts = list(dict.fromkeys(int(n) for n in args.devices.split(",")))

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for count in counts:
            out = Path(scratch) / f"{count}.json"
            environment = dict(os.environ, JAX_NUM_CPU_DEVICES=str(count))
            subprocess.run([sys.executable, "-m", "benchmarks.perf.gan", "--envs", args.env,
                            "--seeds", str(args.seeds), "--iterations", str(args.iterations),
                            "--episodes", str(args.episodes), "--repeats", str(args.repeats),
                            "--json", str(out)], env=environment, check=True,
                           stdout=subprocess.DEVNULL)
            found = json.loads(out.read_text())
            results[count] = (found["device_count"], found["rows"][0])
    print(f"{args.env}: GAN run vmapped over {args.seeds} seeds, {args.iterations} iterations "
          f"x {args.episodes} episodes per seed")
    print(f"{'devices asked':>13} {'devices used':>12} {'valid transitions/s':>20} "
          f"{'seconds':>8} {'speed-up':>8}")
    first = results[counts[0]][1]["seconds"]
    for count in counts:
        _, row = results[count]
        print(f"{count:>13} {row['devices']:>12} {row['valid_transitions_per_second']:>20,.0f} "
              f"{row['seconds']:>8.2f} {first / row['seconds']:>7.2f}x")


if __name__ == "__main__":
    main()
