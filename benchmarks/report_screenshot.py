"""Look at a run's report.html as a person would: a headless browser renders it to a PNG.

Not a test (a fresh CI machine has no browser). Uses the first of ``chromium-headless-shell``,
``chromium``, ``google-chrome`` or ``firefox`` on PATH (Debian: ``apt-get install
chromium-headless-shell``); without one it says so and exits 2. With no run folder it
runs the ``smoke-dp`` scenario (tiny model, about a minute) into a temporary folder.

    python benchmarks/report_screenshot.py [RUN_DIR] --out results/report.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "google-chrome", "firefox")


def screenshot(page: Path, out: Path, width: int, height: int) -> list[str]:
    """Render ``page`` to ``out`` with the first browser found; the command it ran."""
    if not page.is_file():
        sys.exit(f"{page} does not exist (is it a finished run folder?)")
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        sys.exit(f"no headless browser on PATH (tried {', '.join(BROWSERS)}); skipped")
    url = page.resolve().as_uri()
    if browser == "firefox":
        cmd = [browser, "--headless", f"--screenshot={out}", f"--window-size={width},{height}",
               url]
    else:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--screenshot={out}", f"--window-size={width},{height}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return cmd


def smoke_run(root: Path) -> Path:
    from fedcpt.config import load_config
    from fedcpt.simulations.runner import simulate

    run_dir = root / "smoke-dp"
    simulate(load_config("smoke-dp"), run_dir)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path)
    parser.add_argument("--out", type=Path, default=Path("report.png"))
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=5200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or smoke_run(Path(tmp))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = screenshot(run_dir / "report.html", args.out.resolve(), args.width, args.height)
    print(f"{cmd[0]}: {args.out}")


if __name__ == "__main__":
    main()
