"""Render a run's report.html to a PNG with headless Chromium (to look at it, or for the docs).

    python scripts/render_report.py runs/demo [--out report.png] [--width 1200] [--height 3000] [--max-kb 400]

Needs a Chromium binary (Debian: ``apt-get install chromium``). Writes the report first when the
run folder has none. With ``--max-kb`` the screenshot is palette-quantised until it fits.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("error: no Chromium found (apt-get install chromium)")


def screenshot(html: Path, out: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        command = [
            find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
            html.resolve().as_uri(),
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=120)


def shrink(path: Path, max_kb: int) -> None:
    """Quantise to fewer colours, then scale down, until the PNG is under ``max_kb``."""
    original = Image.open(path).convert("RGB")
    image, colours = original, 256
    while path.stat().st_size > max_kb * 1024:
        image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if colours > 64:
            colours //= 2
        else:
            image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (or a report.html)")
    parser.add_argument("--out", type=Path, default=Path("report.png"))
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--max-kb", type=int, default=0, help="shrink the PNG below this size (0: keep)")
    args = parser.parse_args(argv)

    html = args.run_dir if args.run_dir.suffix == ".html" else args.run_dir / "report.html"
    if not html.exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from raft_diffusion.report import write_report

        html = write_report(args.run_dir)
    screenshot(html, args.out, args.width, args.height)
    if args.max_kb:
        shrink(args.out, args.max_kb)
    print(f"{args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
