"""How heavy a run's visual report is: its size and how fast headless Chromium opens it.

    python -m benchmarks.perf.report RUN_DIR [--repeats 5] [--chromium PATH]

Prints ``report.html``'s size, the number of inlined figures, and the time from
navigation to the ``load`` event (every inlined image decoded) in headless Chromium
driven by playwright, the median of ``--repeats`` loads in a fresh page each (the
browser is started once and warmed by one untimed load). Needs Debian's ``chromium``
package (or ``--chromium``) and playwright (the dev extras). Write the report first
(``audit bench`` does; ``audit report RUN_DIR`` for an older run).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path


def load_seconds(report: Path, chromium: str, repeats: int) -> list[float]:
    """Seconds from navigation to the load event, one per fresh page."""
    from playwright.sync_api import sync_playwright

    timings = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium,
                                         args=["--no-sandbox", "--disable-gpu"])
        for index in range(repeats + 1):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            started = time.perf_counter()
            page.goto(report.resolve().as_uri(), wait_until="load")
            page.evaluate("() => Promise.all(Array.from(document.images, i => i.decode()))")
            elapsed = time.perf_counter() - started
            if index:  # the first load warms the browser's process and caches
                timings.append(elapsed)
            page.close()
        browser.close()
    return timings


def main(argv=None) -> int:
    """Prints the report's size and its median load time; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chromium", default=None,
                        help="the browser binary (default: chromium on the PATH)")
    args = parser.parse_args(argv)
    report = args.run_dir / "report.html"
    if not report.is_file():
        print(f"{report}: not found; run `audit report {args.run_dir}` first", file=sys.stderr)
        return 2
    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium found; install Debian's chromium package or pass --chromium",
              file=sys.stderr)
        return 2
    text = report.read_text()
    timings = load_seconds(report, chromium, max(args.repeats, 1))
    print(f"report: {report}")
    print(f"size: {report.stat().st_size / 1e6:.2f} MB, "
          f"{text.count('data:image/png;base64,')} inlined figures")
    print(f"load (navigation to load event, images decoded), median of {len(timings)}: "
          f"{statistics.median(timings):.3f} s (min {min(timings):.3f}, "
          f"max {max(timings):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
