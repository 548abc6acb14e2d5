"""Build the demo world's models into raft_diffusion/assets/demo/ (deterministic, CPU).

    python scripts/build_demo_assets.py                 # everything (image, flow, text)
    python scripts/build_demo_assets.py --only image    # tiny SD, tiny CLIP, aesthetic head
    python scripts/build_demo_assets.py --only flow     # tiny SD3, on the tiny SD's VAE and text encoder
    python scripts/build_demo_assets.py --quick --out /tmp/demo   # seconds-long smoke build

Each half is built in a temporary folder next to the target and renamed into place only when
complete, so an interrupted build never replaces a good one. ``manifest.json`` records how every
asset was built and what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raft_diffusion.assets import DEMO_DIR  # noqa: E402

IMAGE_ASSETS = ("sd", "clip", "aesthetic_head.pth")
FLOW_ASSETS = ("sd3",)


def _install(tmp: Path, out: Path, names) -> None:
    """Move finished assets from ``tmp`` into ``out``: each old one is renamed aside, then replaced."""
    for name in names:
        src, dst = tmp / name, out / name
        if not src.exists():
            continue
        old = out / f".{name}.old"
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        if dst.exists():
            dst.rename(old)
        src.rename(dst)
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def _write_manifest(out: Path, section: str, entry: dict) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest[section] = entry
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def _build_command() -> dict:
    """The command line as it was run and the source it ran, so the manifest names the build exactly."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        # The assets are this script's output, not its source: their state does not count.
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                     ".", f":!{DEMO_DIR.relative_to(root)}"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"command": " ".join(["python scripts/build_demo_assets.py", *sys.argv[1:]]),
            "commit": commit, "uncommitted_changes": dirty}


def _folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)


def _entry(out: Path, names, seed: int, quick: bool, start: float, threads: int, figures: dict, **extra) -> dict:
    """A manifest section: the command, when and where it ran, the assets' sizes, what the build measured."""
    return {
        **_build_command(),
        "seed": seed, "quick": quick, "wall_seconds": round(time.time() - start, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {threads}",
        "size_mb": {name: _folder_mb(out / name) if (out / name).is_dir() else round((out / name).stat().st_size / 2**20, 2)
                    for name in names},
        **extra,
        **figures,
    }


def build_image(out: Path, quick: bool, seed: int, threads: int | None, reuse_sd: Path | None = None,
                reuse_clip: Path | None = None) -> None:
    from scripts.demo.build_image import ImageBuildConfig, build_image_assets

    cfg = ImageBuildConfig.quick(seed) if quick else ImageBuildConfig(seed=seed)
    if threads:
        cfg.threads = threads
    tmp = out / f".build-image-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    if reuse_sd is not None and not (reuse_sd / "model_index.json").is_file():
        raise SystemExit(f"--reuse-sd {reuse_sd}: not a StableDiffusionPipeline folder (no model_index.json)")
    if reuse_clip is not None and not (reuse_clip / "open_clip_model.safetensors").is_file():
        raise SystemExit(f"--reuse-clip {reuse_clip}: no open_clip_model.safetensors there")
    # On failure the partial build stays in tmp for inspection.
    figures = build_image_assets(tmp, cfg, reuse_sd=reuse_sd, reuse_clip=reuse_clip)
    _install(tmp, out, IMAGE_ASSETS)
    shutil.rmtree(tmp, ignore_errors=True)
    entry = _entry(out, IMAGE_ASSETS, seed, quick, start, cfg.threads, figures)
    _write_manifest(out, "image", entry)
    print(f"image assets written to {out} in {entry['wall_seconds']} s")


def build_flow(out: Path, quick: bool, seed: int, threads: int | None) -> None:
    from scripts.demo.build_flow import FlowBuildConfig, build_flow_assets

    if not (out / "sd" / "model_index.json").is_file():
        raise SystemExit(f"{out / 'sd'}: no tiny SD to build the flow model on; build the image half first (--only image)")
    cfg = FlowBuildConfig.quick(seed) if quick else FlowBuildConfig(seed=seed)
    if threads:
        cfg.threads = threads
    tmp = out / f".build-flow-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    figures = build_flow_assets(tmp, out / "sd", cfg)
    _install(tmp, out, FLOW_ASSETS)
    shutil.rmtree(tmp, ignore_errors=True)
    image = json.loads((out / "manifest.json").read_text()).get("image", {}) if (out / "manifest.json").is_file() else {}
    entry = _entry(out, FLOW_ASSETS, seed, quick, start, cfg.threads, figures,
                   built_on={"sd": {"commit": image.get("commit"), "built_at": image.get("built_at")}})
    _write_manifest(out, "flow", entry)
    print(f"flow assets written to {out} in {entry['wall_seconds']} s")


def build_text(out: Path, quick: bool, seed: int) -> None:
    from scripts.demo.build_text import build_text_assets

    start = time.time()
    figures = build_text_assets(out, quick=quick, seed=seed)
    _write_manifest(out, "text", {**_build_command(),
                                  "seed": seed, "quick": quick, "wall_seconds": round(time.time() - start, 1),
                                  "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  **(figures or {})})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("image", "flow", "text"), help="build one part only")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help=f"output folder (default {DEMO_DIR})")
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds of training (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the image and flow builds (default 1)")
    parser.add_argument("--reuse-sd", type=Path, default=None,
                        help="copy this tiny-SD pipeline folder (built with the same config) instead of training one")
    parser.add_argument("--reuse-clip", type=Path, default=None,
                        help="copy this demo-CLIP folder (built with the same config) instead of training one")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "image"):
        build_image(args.out, args.quick, args.seed, args.threads, args.reuse_sd, args.reuse_clip)
    if args.only in (None, "flow"):
        build_flow(args.out, args.quick, args.seed, args.threads)
    if args.only in (None, "text"):
        build_text(args.out, args.quick, args.seed)
    print(f"{args.out}: {_folder_mb(args.out)} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
