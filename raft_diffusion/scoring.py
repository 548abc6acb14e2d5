"""``raft-diffusion score``: score image files with any registered reward.

    raft-diffusion score outputs/ extra.png --reward aesthetic --reward-args '{"clip": "demo"}' --out scores.csv

Folders are searched recursively for png/jpg/jpeg/webp/bmp files, except a folder written by
``raft-diffusion sample``: its ``samples.jsonl`` lists the samples (not its ``grid.png``) and their
prompts, which prompt-aware rewards such as ``clip_score`` get unless ``--prompt`` is given (the
output has a column of the prompt each image was scored with). Files
that cannot be read are reported on stderr and skipped. Exit status: 0 when at least one image was
scored, 2 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from PIL import Image

from raft_diffusion.core.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SAMPLES_INDEX = "samples.jsonl"  # what `raft-diffusion sample` writes beside its images and grid.png
OUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
CHUNK = 64  # images held in memory at once
DEMO_CLIP_REWARDS = ("aesthetic", "clip_score")  # the rewards that can score with the packaged demo CLIP


class ScoreError(UserError):
    """Bad arguments to the score command."""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the score command's arguments to ``parser`` (a new parser if none is given)."""
    parser = parser or argparse.ArgumentParser(prog="raft-diffusion score", description="Score image files with a reward.")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--reward", default="aesthetic", help="reward name or module:function (default: aesthetic)")
    parser.add_argument("--reward-args", default="{}", help="reward arguments as a JSON object, e.g. '{\"clip\": \"demo\"}'")
    parser.add_argument("--prompt", help="prompt paired with every image, for rewards such as clip_score "
                        "(default: a sample folder's own prompts, else empty)")
    parser.add_argument("--out", help="write scores to a .csv or .jsonl file (default: a table on stdout)")
    parser.add_argument("--device", help="device for model-based rewards (default: cuda if available)")
    return parser


def read_samples_index(folder: Path) -> dict[Path, str] | None:
    """The samples of a ``raft-diffusion sample`` folder with their prompts, or None for any other folder."""
    index = folder / SAMPLES_INDEX
    if not index.is_file():
        return None
    samples = {}
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("file"), str):
            samples[folder / record["file"]] = str(record.get("prompt", ""))
    return samples


def find_images(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]], dict[Path, str]]:
    """Image files named by ``paths`` (folders searched recursively, a sample folder's samples only),
    ``(path, reason)`` for bad paths, and the prompt of each file a sample folder lists."""
    files, errors, seen, prompts = [], [], set(), {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = _folder_images(path, prompts)
            if not found:
                errors.append((raw, "folder holds no png/jpg/jpeg/webp/bmp images"))
        elif path.is_file():
            found = [path]
        else:
            errors.append((raw, "no such file or folder"))
            continue
        for p in found:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                files.append(p)
    return files, errors, prompts


def _folder_images(folder: Path, prompts: dict[Path, str]) -> list[Path]:
    """Images under ``folder``; in a sample folder (at any depth) only its samples, whose prompts go to ``prompts``."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        samples = read_samples_index(Path(parent))
        if samples:
            dirs.clear()  # a sample folder holds its samples and grid.png, nothing else to score
            prompts.update(samples)
            found.extend(samples)
        else:
            found.extend(Path(parent) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_SUFFIXES)
    return found


def _read_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _parse_reward_args(text: str) -> dict:
    try:
        args = json.loads(text)
    except json.JSONDecodeError as err:
        raise ScoreError(f"--reward-args is not valid JSON ({err})") from None
    if not isinstance(args, dict):
        raise ScoreError(f"--reward-args must be a JSON object, got {type(args).__name__}")
    return args


def _spec(reward: str, args: dict) -> dict:
    return {"target": reward, "args": args} if ":" in reward else {"name": reward, "args": args}


def load_models(reward, reward_args: dict) -> None:
    """Load each reward model now, before any image is read; weights that are not on this machine
    end the command in one line that says which ``--reward-args`` load local files instead."""
    from raft_diffusion.rewards import load_models as load_reward_models

    def missing(_i, label, err, fix):
        local = json.dumps({**reward_args, **fix})
        demo = json.dumps({**{k: v for k, v in reward_args.items() if k != "pretrained"}, "clip": "demo"})
        hint = f" (images of the packaged demo model: --reward-args '{demo}')" if label in DEMO_CLIP_REWARDS else ""
        return ScoreError(f"reward {label}: {err.problem}; pass local files: --reward-args '{local}'{hint}")

    load_reward_models(reward, missing)


def _write(rows: list[tuple[str, float, str]], out: str | None) -> None:
    """``(path, score, prompt)`` rows as a table on stdout, or a .csv / .jsonl file."""
    if out is None:
        for path, score, prompt in rows:
            print(f"{score:12.4f}  {path}" + (f"  {prompt!r}" if prompt else ""))
        return
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="", encoding="utf-8") as f:
        if OUT_FORMATS[out_path.suffix.lower()] == "csv":
            writer = csv.writer(f)
            writer.writerow(["path", "score", "prompt"])
            writer.writerows(rows)
        else:
            for path, score, prompt in rows:
                f.write(json.dumps({"path": path, "score": score, "prompt": prompt}) + "\n")


def run(args: argparse.Namespace) -> int:
    """Score the images ``args`` names; returns the exit status."""
    from raft_diffusion.rewards import build_reward

    if args.out is not None and Path(args.out).suffix.lower() not in OUT_FORMATS:
        raise ScoreError(f"--out must end in .csv or .jsonl, got {args.out!r}")
    reward_args = _parse_reward_args(args.reward_args)
    files, errors, prompts = find_images(args.images)
    for path, reason in errors:
        print(f"error: {path}: {reason}", file=sys.stderr)
    if not files:
        print("error: no images to score", file=sys.stderr)
        return 2
    reward = build_reward([_spec(args.reward, reward_args)], args.device)
    load_models(reward, reward_args)

    rows: list[tuple[str, float, str]] = []
    n_bad = len(errors)
    for start in range(0, len(files), CHUNK):
        paths, images = [], []
        for path in files[start : start + CHUNK]:
            try:
                images.append(_read_image(path))
                paths.append(path)
            except Exception as err:  # any decoder failure means this one file is unreadable
                n_bad += 1
                print(f"error: {path}: cannot read image ({type(err).__name__}: {err})", file=sys.stderr)
        if images:
            texts = [args.prompt if args.prompt is not None else prompts.get(p, "") for p in paths]
            scores = reward(images, texts)
            rows.extend((str(p), float(s), t) for p, s, t in zip(paths, scores, texts))

    if not rows:
        print("error: no image could be read", file=sys.stderr)
        return 2
    _write(rows, args.out)
    if args.out is not None:
        print(f"scored {len(rows)} images ({n_bad} errors) -> {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run; bad input is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
