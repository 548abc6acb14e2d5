"""Image grids of a run, written while it runs (the loop's ``on_stage`` / ``on_eval`` callbacks).

    stages/NNNNNN/grid.png        a stage's candidates, best first, the chosen ones framed
    stages/NNNNNN/eval_grid.png   held-out prompts from fixed seeds (stage 0: the base model)
    stages/NNNNNN/eval_samples.jsonl   the same for text runs
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from raft_diffusion.core.run_dir import TMP_PREFIX, atomic_write_text

GRID_FILE = "grid.png"
EVAL_GRID_FILE = "eval_grid.png"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"
EVAL_GRID_PROMPTS = 12  # held-out prompts shown in an eval grid

CHOSEN_COLOUR = (22, 163, 74)  # frame of a chosen candidate
FRAME = 3  # frame width, pixels
MIN_CELL = 96  # smaller images are upscaled (nearest neighbour) to at least this side
MAX_CELL = 256  # larger images are downscaled to this side
LABEL_WIDTH = 140  # prompt column
GAP, PAD = 8, 10
MAX_GRID_WIDTH = 600  # prompt blocks go side by side while they fit: two grids fit side by side in the report
TEXT, MUTED, LINE = (30, 30, 30), (110, 110, 110), (205, 205, 205)


# ---------------------------------------------------------------------------------------------
# Image grids


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _is_image(x: Any) -> bool:
    return isinstance(x, Image.Image)


def _cell_image(image: Image.Image) -> Image.Image:
    """Tiny images are upscaled by a whole factor with nearest neighbour (pixels stay sharp)."""
    image = image.convert("RGB")
    side = max(image.size)
    if side < MIN_CELL:
        factor = math.ceil(MIN_CELL / side)
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    if side > MAX_CELL:
        scale = MAX_CELL / side
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    return image


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            while font.getlength(word) > width and len(word) > 1:  # a word longer than the column
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and font.getlength(lines[-1] + "...") > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def draw_grid(rows: Sequence[tuple[str, Sequence[tuple[Image.Image, str, bool]]]], title: str, legend: str = "", label_above: bool = False) -> Image.Image:
    """Rows of ``(prompt, [(image, caption, framed), ...])``, the prompt at each row's start
    (or above its images with ``label_above``). Short rows are put several to a line while they
    fit ``MAX_GRID_WIDTH``."""
    font, small, bold = _font(13), _font(12), _font(15)
    cells = [[_cell_image(im) for im, _, _ in row] for _, row in rows]
    cell_w = max(im.width for row in cells for im in row)
    cell_h = max(im.height for row in cells for im in row)
    n_cols = max(len(row) for row in cells)
    slot_w = cell_w + 2 * FRAME + GAP
    caption_h = 16 * max(c.count("\n") + 1 for _, row in rows for _, c, _ in row) + 4
    label_w = n_cols * slot_w - GAP if label_above else LABEL_WIDTH - 10
    labels = [_wrap(prompt, font, label_w, 2 if label_above else 6) for prompt, _ in rows]
    label_h = 16 * max(len(lines) for lines in labels) + 4 if label_above else 0
    block_w = n_cols * slot_w + (0 if label_above else LABEL_WIDTH)
    block_h = label_h + max(cell_h + 2 * FRAME + caption_h, 0 if label_above else 16 * max(len(lines) for lines in labels)) + GAP
    per_line = max(1, min(len(rows), (MAX_GRID_WIDTH - 2 * PAD + GAP) // block_w))
    n_lines = math.ceil(len(rows) / per_line)

    width = 2 * PAD + per_line * block_w - GAP
    titles = _wrap(title, bold, width - 2 * PAD, 3)
    legends = _wrap(legend, small, width - 2 * PAD, 4) if legend else []
    header_h = 20 * len(titles) + 16 * len(legends) + GAP
    height = 2 * PAD + header_h + n_lines * block_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(titles):
        draw.text((PAD, PAD + 20 * i), line, fill=TEXT, font=bold)
    for i, line in enumerate(legends):
        draw.text((PAD, PAD + 20 * len(titles) + 16 * i), line, fill=MUTED, font=small)

    for r, ((_, row), images, lines) in enumerate(zip(rows, cells, labels)):
        x0 = PAD + (r % per_line) * block_w
        y0 = PAD + header_h + (r // per_line) * block_h
        for i, line in enumerate(lines):
            draw.text((x0, y0 + (0 if label_above else FRAME) + 16 * i), line, fill=TEXT, font=font)
        for j, ((_, caption, framed), image) in enumerate(zip(row, images)):
            x = x0 + (0 if label_above else LABEL_WIDTH) + j * slot_w + FRAME
            y = y0 + label_h + FRAME
            box = (x - FRAME, y - FRAME, x + image.width + FRAME - 1, y + image.height + FRAME - 1)
            if framed:
                draw.rectangle(box, fill=CHOSEN_COLOUR)
            else:
                draw.rectangle((x - 1, y - 1, x + image.width, y + image.height), outline=LINE)
            canvas.paste(image, (x, y))
            for i, line in enumerate(caption.split("\n")):
                tw = small.getlength(line)
                colour = CHOSEN_COLOUR if framed and i == 0 else TEXT
                draw.text((x + (image.width - tw) / 2, y + image.height + FRAME + 2 + 16 * i), line, fill=colour, font=small)
    return canvas


def _save_png(image: Image.Image, path: Path) -> Path:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path


def _finite_key(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


class StageImages:
    """Writes the image grids of a run; the loop calls it on the main process.

    ``__call__`` (the loop's ``on_stage``): ``grid.png`` of a stage, the first
    ``run.grid_prompts`` prompts with their K candidates sorted by reward, the chosen ones in a
    green frame. :meth:`eval_grid` (the loop's ``on_eval``): the held-out prompts in candidate
    order, from the same fixed seeds at every evaluation, so one picture can be followed across
    stages. Text runs get ``eval_samples.jsonl`` instead (their chosen samples are in chosen.jsonl).
    """

    def __init__(self, config):
        self.grid_prompts = config.run.grid_prompts
        self.eval_prompts = EVAL_GRID_PROMPTS

    def __call__(self, *, stage: int, folder: Path, prompts: list[str], candidates: list, rewards, chosen: list[int], first_prompt: int = 0, **_) -> Path | None:
        if self.grid_prompts <= 0 or not candidates or not _is_image(candidates[0].output):
            return None
        k = rewards.shape[1]
        flat = [float(v) for v in rewards.reshape(-1)]
        rank = {i: r for r, i in enumerate(chosen)}
        by_prompt: dict[int, list] = {}
        for cand in candidates:
            by_prompt.setdefault(cand.prompt_index, []).append(cand)
        rows = []
        for p in sorted(by_prompt)[: self.grid_prompts]:
            ordered = sorted(by_prompt[p], key=lambda c: -_finite_key(flat[p * k + c.k_index]))
            cells = []
            for cand in ordered:
                i = p * k + cand.k_index
                caption = _fmt(flat[i], 4) + (f"  #{rank[i] + 1}" if i in rank else "")
                cells.append((cand.output, caption, i in rank))
            rows.append((prompts[p], cells))
        n_chosen = len(chosen)
        grid = draw_grid(
            rows,
            title=f"stage {stage}: {len(rows)} of {len(prompts)} prompts, {k} candidates each, best reward first",
            legend=f"green frame: chosen for fine-tuning ({n_chosen} of {len(flat)} in this stage; #n = rank among them)",
        )
        return _save_png(grid, Path(folder) / GRID_FILE)

    def eval_samples(self, *, folder: Path, candidates: list, rewards, metrics: dict | None = None, **_) -> Path | None:
        """``eval_samples.jsonl`` of a text run's evaluation (None for other outputs): small, so a run
        with ``run.save_images: false`` keeps it too."""
        if not candidates or not isinstance(candidates[0].output, str):
            return None
        k = rewards.shape[1]
        lines = []
        for cand in candidates:
            i = cand.prompt_index * k + cand.k_index
            entry = {"prompt": cand.prompt, "prompt_index": cand.prompt_index, "k_index": cand.k_index, "reward": float(rewards.reshape(-1)[i])}
            entry.update({name: float(v.reshape(-1)[i]) for name, v in (metrics or {}).items()})
            lines.append(json.dumps({**entry, "output": cand.output}))
        atomic_write_text(Path(folder) / EVAL_SAMPLES_FILE, "\n".join(lines) + "\n")
        return Path(folder) / EVAL_SAMPLES_FILE

    def eval_grid(self, *, stage: int, folder: Path, candidates: list, rewards, metrics: dict | None = None, **_) -> Path | None:
        if not candidates:
            return None
        if isinstance(candidates[0].output, str):
            return self.eval_samples(folder=folder, candidates=candidates, rewards=rewards, metrics=metrics)
        if not _is_image(candidates[0].output):
            return None
        k = rewards.shape[1]
        metrics = metrics or {}
        folder = Path(folder)
        values = [rewards.reshape(-1)] + [v.reshape(-1) for v in metrics.values()]
        rows: dict[int, tuple[str, list]] = {}
        for cand in sorted(candidates, key=lambda c: (c.prompt_index, c.k_index)):
            if cand.prompt_index not in rows and len(rows) >= self.eval_prompts:
                continue
            i = cand.prompt_index * k + cand.k_index
            caption = " / ".join(_fmt(float(v[i])) for v in values)
            rows.setdefault(cand.prompt_index, (cand.prompt, []))[1].append((cand.output, caption, False))
        n_prompts = rewards.shape[0]
        when = "base model (stage 0)" if stage == 0 else f"after stage {stage}"
        grid = draw_grid(
            list(rows.values()),
            title=f"held-out prompts, {when}",
            legend=f"{len(rows)} of {n_prompts} prompts, {k} fixed seeds each; under each image: " + " / ".join(["reward", *metrics]),
            label_above=True,
        )
        return _save_png(grid, folder / EVAL_GRID_FILE)
