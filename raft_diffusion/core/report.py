"""Seeing a run: stage image grids, TensorBoard/wandb logging, metric plots and the HTML report.

    stages/NNNNNN/grid.png        a stage's candidates, best first, the chosen ones framed
    stages/NNNNNN/eval_grid.png   held-out prompts from fixed seeds (stage 0: the base model)
    stages/NNNNNN/eval_samples.jsonl   the same for text runs
    stages/NNNNNN/eval_scores.jsonl   every held-out sample's scores (prompt, seed, each metric)
    tb/                           TensorBoard scalars and grids (when tensorboard is installed)
    report.html                   one self-contained page: summary, curves, grids, timing, config

Everything here reads or writes files only; nothing imports a model library, and every part
works on a run that is still going or was stopped half-way.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from raft_diffusion.core.run_dir import TMP_PREFIX, RunDir, atomic_write_text, stage_name

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

    def eval_grid(self, *, stage: int, folder: Path, candidates: list, rewards, metrics: dict | None = None, **_) -> Path | None:
        if not candidates:
            return None
        k = rewards.shape[1]
        metrics = metrics or {}
        folder = Path(folder)
        if isinstance(candidates[0].output, str):
            lines = []
            for cand in candidates:
                i = cand.prompt_index * k + cand.k_index
                entry = {"prompt": cand.prompt, "prompt_index": cand.prompt_index, "k_index": cand.k_index, "reward": float(rewards.reshape(-1)[i])}
                entry.update({name: float(v.reshape(-1)[i]) for name, v in metrics.items()})
                lines.append(json.dumps({**entry, "output": cand.output}))
            atomic_write_text(folder / EVAL_SAMPLES_FILE, "\n".join(lines) + "\n")
            return folder / EVAL_SAMPLES_FILE
        if not _is_image(candidates[0].output):
            return None
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


# ---------------------------------------------------------------------------------------------
# TensorBoard / wandb


def _tag(key: str) -> str:
    for prefix in ("reward", "eval", "train", "time"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"stage/{key}"


class MetricsLogger:
    """Sends each metrics record (and the grids of its stage) to TensorBoard and/or wandb.

    TensorBoard writes to ``tb/`` when ``log.tensorboard`` is set and tensorboard is installed;
    wandb is used when ``log.wandb`` is set and wandb is installed. Neither is ever required.
    Create it on the main process only; ``start_after`` (a resumed run's last complete stage)
    drops TensorBoard events of later stages left by the interrupted attempt.
    """

    def __init__(self, config, run_dir, start_after: int = 0, log=print):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.tb = None
        self.wandb = None
        if config.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log("log.tensorboard: tensorboard is not installed (pip install tensorboard); not writing tb/")
            else:
                self.tb = SummaryWriter(log_dir=str(self.run_dir.tb), purge_step=start_after + 1 if start_after else None)
                if not start_after and self.run_dir.config.exists():
                    config_text = self.run_dir.config.read_text(encoding="utf-8")
                    self.tb.add_text("config", "    " + config_text.replace("\n", "\n    "), 0)
        if config.log.wandb:
            try:
                import wandb
            except ImportError:
                log("log.wandb: wandb is not installed (pip install wandb); not logging to wandb")
            else:
                self.wandb = wandb.init(project=config.run.name, dir=str(self.run_dir.root), config=config.to_dict())

    def log(self, record: dict) -> None:
        """Scalars of one record, at step = stage, and the grids its stage folder holds."""
        stage = record["stage"]
        scalars = {key: float(v) for key, v in record.items() if key != "stage" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(_tag(key), value, stage)
        if self.wandb is not None:
            self.wandb.log({_tag(key): value for key, value in scalars.items()}, step=stage)
        folder = self.run_dir.stages / stage_name(stage)
        for name, file in (("stage", GRID_FILE), ("eval", EVAL_GRID_FILE)):
            if (folder / file).is_file():
                self.log_images(stage, name, folder / file)
        if self.tb is not None:
            self.tb.flush()

    def log_images(self, stage: int, name: str, path: str | Path) -> None:
        """One grid image under ``grids/<name>`` at step = stage."""
        if self.tb is not None:
            import numpy as np

            with Image.open(path) as image:
                self.tb.add_image(f"grids/{name}", np.asarray(image.convert("RGB")), stage, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"grids/{name}": wandb.Image(str(path))}, step=stage)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# ---------------------------------------------------------------------------------------------
# Before -> after summary

_SUFFIXES = ("_sem", "_best_of_k", "_change")


def _num(record: dict, key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dedupe(records: list[dict]) -> list[dict]:
    """One record per stage (the last written), in stage order."""
    by_stage = {r["stage"]: r for r in records}
    return [by_stage[s] for s in sorted(by_stage)]


def _eval_names(record: dict) -> list[str]:
    """Held-out metrics of a record: the proxy reward first, then gold ones, then the rest."""
    names = [key[5:] for key in record if key.startswith("eval_") and not key.endswith(_SUFFIXES)]
    return sorted(names, key=lambda n: (n != "reward", "gold" not in n, names.index(n)))


def summarize(records: list[dict]) -> dict | None:
    """Held-out metrics at the first evaluation (stage 0: the base model) and the last one.

    Returns ``{"before": stage, "after": stage, "rows": [...]}`` or None without evaluations. Each
    row: name, before, before_sem, after, after_sem, change, z (change over its standard error),
    paired, best_of_k (the base model's best-of-k by the proxy). When the last evaluation holds a
    paired change since stage 0 (the same prompts and seeds, sample by sample), change and its
    standard error are that; otherwise the standard error is sqrt(sem_before^2 + sem_after^2).
    """
    evals = [r for r in _dedupe(records) if "eval_reward" in r]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    rows = []
    for name in _eval_names(first):
        before, after = _num(first, f"eval_{name}"), _num(last, f"eval_{name}")
        if before is None or after is None:
            continue
        sb, sa = _num(first, f"eval_{name}_sem"), _num(last, f"eval_{name}_sem")
        change, se = after - before, math.sqrt(sb**2 + sa**2) if sb is not None and sa is not None else 0.0
        paired = first["stage"] == 0 and _num(last, f"eval_{name}_change_sem") is not None
        if paired:
            change, se = _num(last, f"eval_{name}_change"), _num(last, f"eval_{name}_change_sem")
        rows.append(
            {
                "name": name,
                "kind": "proxy" if name == "reward" else ("gold" if "gold" in name else ""),
                "before": before,
                "before_sem": sb,
                "after": after,
                "after_sem": sa,
                "change": change,
                "z": change / se if se > 0 else None,
                "paired": paired,
                "best_of_k": _num(first, f"eval_{name}_best_of_k"),
            }
        )
    return {"before": first["stage"], "after": last["stage"], "rows": rows}


def _decimals(row: dict) -> int:
    """Enough decimals to show two digits of the row's standard error (3 to 6)."""
    sems = [s for s in (row["before_sem"], row["after_sem"]) if s is not None and s > 0 and math.isfinite(s)]
    return min(6, max(3, 1 - math.floor(math.log10(min(sems))))) if sems else 3


def _pm(value: float, sem: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}f} ± {sem:.{digits}f}" if sem is not None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def _row_cells(r: dict) -> list[str]:
    """before, after, change, change/SE, best-of-k of a summary row, as text."""
    d = _decimals(r)
    z = "-" if r["z"] is None else f"{r['z']:+.1f}"
    best = "-" if r["best_of_k"] is None else f"{r['best_of_k']:.{d}f}"
    return [_pm(r["before"], r["before_sem"], d), _pm(r["after"], r["after_sem"], d), _signed(r["change"], d), z, best]


def _verdict(summary: dict) -> str:
    """A warning when the proxy rose while a gold metric fell (over-optimisation)."""
    rows = {r["name"]: r for r in summary["rows"]}
    proxy = rows.get("reward")
    if not proxy or proxy["z"] is None or proxy["z"] < 2:
        return ""
    fell = [r["name"] for r in summary["rows"] if r["kind"] == "gold" and r["z"] is not None and r["z"] < -2]
    return f"warning: the proxy reward rose while {', '.join(fell)} fell: the policy is exploiting the proxy" if fell else ""


def summary_table(records: list[dict]) -> str:
    """The before -> after summary on held-out prompts as plain text (printed after training)."""
    summary = summarize(records)
    if summary is None:
        train = [r for r in _dedupe(records) if "reward_policy" in r]
        if not train:
            return "no metrics yet"
        a, b = train[0], train[-1]
        return (
            "no held-out evaluation in this run (eval.every = 0); "
            f"training reward of the policy: stage {a['stage']} {a['reward_policy']:.3f} -> stage {b['stage']} {b['reward_policy']:.3f}"
        )
    before = "stage 0 (base model)" if summary["before"] == 0 else f"stage {summary['before']}"
    header = ["metric", "before", "after", "change", "change/SE", "base best-of-k"]
    lines = [header]
    for r in summary["rows"]:
        label = r["name"] + (f" ({r['kind']})" if r["kind"] else "")
        lines.append([label, *_row_cells(r)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [f"held-out prompts: {before} -> stage {summary['after']}"]
    for row in lines:
        text.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if summary["before"] == summary["after"]:
        text.append("(only one evaluation so far)")
    elif any(r["paired"] for r in summary["rows"]):
        text.append("change/SE: sample by sample, over the same held-out prompts and seeds")
    verdict = _verdict(summary)
    return "\n".join(text + ([verdict] if verdict else []))


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend change)


def _figure(title: str, ylabel: str = ""):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("stage")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _series(records: list[dict], key: str, sem: str | None = None):
    rows = [r for r in records if _num(r, key) is not None and math.isfinite(r[key])]
    xs = [r["stage"] for r in rows]
    ys = [r[key] for r in rows]
    es = [(_num(r, sem) or 0.0) for r in rows] if sem else None
    return xs, ys, es


def _integer_stages(ax, records: list[dict]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    stages = [r["stage"] for r in records]
    if stages:
        ax.set_xlim(min(stages) - 0.3, max(stages) + 0.3)


def _best_of_k_line(ax, records: list[dict], key: str, k) -> None:
    base = next((r for r in records if r["stage"] == 0 and _num(r, key) is not None), None)
    if base is not None:
        ax.axhline(base[key], color="tab:gray", linestyle="--", linewidth=1, label=f"base model, best-of-{k or 'k'}")


def plot_curves(records: list[dict], k: int | None = None) -> list[tuple[str, bytes]]:
    """(title, PNG bytes) of each metric plot the records allow (``k``: eval samples per prompt)."""
    records = _dedupe(records)
    plots = []
    if any("reward_mean" in r or "eval_reward" in r for r in records):
        fig, ax = _figure("proxy reward", "reward")
        for key, label, style in (
            ("reward_chosen_mean", "chosen (fine-tuned on)", dict(color="tab:green", marker="o", markersize=3)),
            ("reward_mean", "all candidates", dict(color="tab:blue", marker="o", markersize=3)),
            ("reward_policy", "policy (candidate 0)", dict(color="tab:purple", marker="o", markersize=3, alpha=0.8)),
        ):
            xs, ys, _ = _series(records, key)
            if xs:
                ax.plot(xs, ys, label=label, **style)
        xs, ys, es = _series(records, "eval_reward", "eval_reward_sem")
        if xs:
            ax.errorbar(xs, ys, yerr=es, label="held-out (± SE)", color="tab:orange", marker="s", markersize=4, capsize=3)
        _best_of_k_line(ax, records, "eval_reward_best_of_k", k)
        _integer_stages(ax, records)
        ax.legend(fontsize=8)
        plots.append(("proxy reward", _png(fig)))
    names = _eval_names(next((r for r in records if "eval_reward" in r), {}))
    for name in [n for n in names if n != "reward" and any(f"eval_{n}_sem" in r for r in records)]:
        xs, ys, es = _series(records, f"eval_{name}", f"eval_{name}_sem")
        if not xs:
            continue
        kind = "gold, " if "gold" in name else ""
        fig, ax = _figure(f"{name} ({kind}held-out, never used for selection)", name)
        ax.errorbar(xs, ys, yerr=es, label="held-out (± SE)", color="tab:red" if kind else "tab:orange", marker="s", markersize=4, capsize=3)
        _best_of_k_line(ax, records, f"eval_{name}_best_of_k", k)
        _integer_stages(ax, records)
        ax.legend(fontsize=8)
        plots.append((name, _png(fig)))
    diversity = [(key, label) for key, label in (("diversity", "stage candidates"), ("distinct_2", "stage candidates"), ("eval_diversity", "held-out"), ("eval_distinct_2", "held-out")) if any(key in r for r in records)]
    if diversity:
        fig, ax = _figure("diversity (higher: samples of a prompt differ more)")
        for key, label in diversity:
            xs, ys, _ = _series(records, key)
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{key.removeprefix('eval_')}, {label}")
        _integer_stages(ax, records)
        ax.legend(fontsize=8)
        plots.append(("diversity", _png(fig)))
    xs, ys, _ = _series(records, "train_loss")
    if xs:
        fig, ax = _figure("fine-tuning loss (mean over the stage)", "loss")
        ax.plot(xs, ys, marker="o", markersize=3, color="tab:brown")
        _integer_stages(ax, records)
        plots.append(("loss", _png(fig)))
    phases = _phases(records)
    staged = [r for r in records if r["stage"] > 0 and "time_stage_s" in r]
    if staged and phases:
        fig, ax = _figure("seconds per stage, by phase", "seconds")
        bottom = [0.0] * len(staged)
        for phase in phases:
            heights = [_num(r, f"time_{phase}_s") or 0.0 for r in staged]
            ax.bar([r["stage"] for r in staged], heights, bottom=bottom, label=phase, width=0.7)
            bottom = [b + h for b, h in zip(bottom, heights)]
        _integer_stages(ax, staged)
        ax.legend(fontsize=8, ncol=3)
        plots.append(("time", _png(fig)))
    return plots


# ---------------------------------------------------------------------------------------------
# Timing

_PHASE_ORDER = ("generate", "score", "select", "finetune", "eval", "checkpoint")


def _phases(records: list[dict]) -> list[str]:
    found = {key[5:-2] for r in records for key in r if key.startswith("time_") and key.endswith("_s") and key != "time_stage_s"}
    return sorted(found, key=lambda p: (_PHASE_ORDER.index(p) if p in _PHASE_ORDER else len(_PHASE_ORDER), p))


def timing_rows(records: list[dict]) -> list[dict]:
    """Per phase: stages it ran in, mean and total seconds, share of the run's seconds; then
    "other" (checkpoint, logging: what no phase timer covers) and the whole run."""
    records = _dedupe(records)
    staged = [r for r in records if _num(r, "time_stage_s") is not None]
    in_stages = sum(r["time_stage_s"] for r in staged)
    total = in_stages + sum(_num(r, "time_eval_s") or 0.0 for r in records if r not in staged)  # + the initial eval
    rows = []
    for phase in _phases(records):
        values = [v for r in records for v in [_num(r, f"time_{phase}_s")] if v is not None]
        sec = sum(values)
        rows.append({"phase": phase, "n": len(values), "mean": sec / len(values), "total": sec, "share": sec / total if total > 0 else math.nan})
    if staged:
        rest = in_stages - sum(v for r in staged for key in r if key.startswith("time_") and key != "time_stage_s" for v in [_num(r, key)] if v is not None)
        rows.append({"phase": "other (checkpoint, logging)", "n": len(staged), "mean": rest / len(staged), "total": rest, "share": rest / total if total > 0 else math.nan})
        rows.append({"phase": "all", "n": len(staged), "mean": in_stages / len(staged), "total": total, "share": 1.0})
    return rows


# ---------------------------------------------------------------------------------------------
# HTML report

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1e1e1e; max-width: 1240px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.muted { color: #6b6b6b; } .note { color: #555; font-size: 13px; max-width: 900px; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
.up { color: #15803d; font-weight: 600; } .down { color: #b91c1c; font-weight: 600; }
.warn { background: #fff4e5; border-left: 4px solid #f59e0b; padding: 8px 12px; margin: 10px 0; }
.facts td { text-align: left; border: none; padding: 1px 12px 1px 0; } .facts td:first-child { color: #6b6b6b; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots img { width: 560px; max-width: 100%; border: 1px solid #eee; }
.pair { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.pair figure { margin: 0; max-width: 100%; } .pair img { max-width: 100%; border: 1px solid #eee; }
.pair.text > div { flex: 1 1 45%; min-width: 360px; }
figcaption { font-weight: 600; margin-bottom: 4px; }
.sample { border: 1px solid #e5e5e5; border-radius: 4px; padding: 6px 10px; margin: 6px 0; font-size: 14px; }
.sample .meta { color: #6b6b6b; font-size: 12px; } .sample pre { white-space: pre-wrap; margin: 4px 0 0; font: 13px/1.4 ui-monospace, monospace; }
pre.config { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 12.5px; }
details summary { cursor: pointer; color: #444; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _embed_image(path: Path) -> str:
    """A data URI of an image file; large grids (photographs) are re-encoded as JPEG."""
    data = path.read_bytes()
    if len(data) <= 1_500_000:
        return _data_uri(data)
    with Image.open(path) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=85)
    return _data_uri(out.getvalue(), "image/jpeg")


def _stage_files(run_dir: RunDir, name: str) -> list[tuple[int, Path]]:
    if not run_dir.stages.is_dir():
        return []
    found = [(int(d.name), d / name) for d in run_dir.stages.iterdir() if d.name.isdigit() and (d / name).is_file()]
    return sorted(found)


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _first_last(items: list) -> list:
    return items[:1] + items[-1:] if len(items) > 1 else items


def _pair_of_images(run_dir: RunDir, name: str, label) -> str:
    found = _first_last(_stage_files(run_dir, name))
    if not found:
        return ""
    figures = "".join(f'<figure><figcaption>{_esc(label(stage))}</figcaption><img src="{_embed_image(path)}" alt="{_esc(label(stage))}"></figure>' for stage, path in found)
    return f'<div class="pair">{figures}</div>'


def _pair_of_samples(run_dir: RunDir, name: str, label, limit: int = 6) -> str:
    found = _first_last(_stage_files(run_dir, name))
    columns = []
    for stage, path in found:
        entries = [e for e in _read_jsonl(path) if isinstance(e.get("output"), str)][:limit]
        if not entries:
            continue
        cards = []
        for e in entries:
            scores = " · ".join(f"{_esc(key)} {_fmt(float(e[key]), 4)}" for key in e if key not in ("prompt", "prompt_index", "k_index", "rank", "seed", "output") and isinstance(e[key], (int, float)))
            which = f"sample {e['k_index']} · " if "rank" not in e and "k_index" in e else ""
            cards.append(f'<div class="sample"><div class="meta">{_esc(e.get("prompt", ""))} · {which}{scores}</div><pre>{_esc(e["output"])}</pre></div>')
        columns.append(f"<div><figcaption>{_esc(label(stage))}</figcaption>{''.join(cards)}</div>")
    return f'<div class="pair text">{"".join(columns)}</div>' if columns else ""


def _summary_html(records: list[dict], k: Any = None) -> str:
    summary = summarize(records)
    if summary is None:
        return f'<p class="muted">{_esc(summary_table(records))}</p>'
    before = "stage 0 (base model)" if summary["before"] == 0 else f"stage {summary['before']}"
    out = [f"<table><tr><th>held-out metric</th><th>before: {_esc(before)}</th><th>after: stage {summary['after']}</th><th>change</th><th>change / SE</th><th>base model, best-of-{_esc(k or 'k')}</th></tr>"]
    for r in summary["rows"]:
        label = _esc(r["name"]) + (f' <span class="muted">({r["kind"]})</span>' if r["kind"] else "")
        cls = "" if r["z"] is None or abs(r["z"]) < 2 else (' class="up"' if r["z"] > 0 else ' class="down"')
        before, after, change, z, best = _row_cells(r)
        out.append(f"<tr><td>{label}</td><td>{before}</td><td>{after}</td><td{cls}>{change}</td><td{cls}>{z}</td><td>{best}</td></tr>")
    out.append("</table>")
    verdict = _verdict(summary)
    if verdict:
        out.append(f'<div class="warn">{_esc(verdict)}</div>')
    if summary["before"] == summary["after"]:
        out.append('<p class="muted">Only one evaluation so far.</p>')
    out.append(
        '<p class="note">Mean over the held-out prompts and their fixed-seed samples, ± its standard error (SE). '
        + ("change / SE: the mean change sample by sample (every evaluation draws the same prompts from the same seeds) over "
           "its standard error; " if any(r["paired"] for r in summary["rows"]) else
           "change / SE = change / √(SE<sub>before</sub>² + SE<sub>after</sub>²): ")
        + "beyond ±2 it is unlikely to be noise. <i>gold</i> metrics are computed from the outputs directly and never used "
        "for selection. <i>base model, best-of-k</i>: the base model's best of k samples per prompt, picked by the proxy reward at "
        "inference time; fine-tuning is worth its cost where one sample after RAFT matches it.</p>"
    )
    return "".join(out)


def _seconds(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _timing_html(records: list[dict]) -> str:
    rows = timing_rows(records)
    if not rows:
        return '<p class="muted">no timings yet</p>'
    out = ["<table><tr><th>phase</th><th>stages</th><th>s per stage</th><th>s in the run</th><th>share</th></tr>"]
    for r in rows:
        share = f"{100 * r['share']:.0f} %" if math.isfinite(r["share"]) else ""
        out.append(f"<tr><td>{_esc(r['phase'])}</td><td>{r['n']}</td><td>{_seconds(r['mean'])}</td><td>{_seconds(r['total'])}</td><td>{share}</td></tr>")
    out.append("</table>")
    return "".join(out)


_TABLE_KEYS = ("reward_mean", "reward_chosen_mean", "reward_policy", "eval_reward", "train_loss", "diversity", "time_stage_s")


def _metrics_table_html(records: list[dict]) -> str:
    keys = [k for k in _TABLE_KEYS if any(k in r for r in records)]
    extra = [f"eval_{n}" for n in _eval_names(next((r for r in records if "eval_reward" in r), {})) if n != "reward"]
    keys = keys[:4] + extra + keys[4:]
    head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
    body = "".join("<tr><td>" + str(r["stage"]) + "</td>" + "".join(f"<td>{_fmt(_num(r, k), 4) if _num(r, k) is not None else ''}</td>" for k in keys) + "</tr>" for r in records)
    return f"<table><tr><th>stage</th>{head}</tr>{body}</table>"


def _facts(config: dict, run_dir: RunDir, records: list[dict]) -> str:
    run, model, sampling = config.get("run", {}), config.get("model", {}), config.get("sampling", {})
    selection, train = config.get("selection", {}), config.get("train", {})
    planned = run.get("stages")
    done = run_dir.last_stage()
    if run_dir.is_finished():
        status = f"finished: {done or planned} of {planned} stages, exported to final/"
    else:
        status = f"not finished: {done} of {planned} stages complete (checkpointed), no final/ export yet"
    rewards = ", ".join(f"{s.get('name') or s.get('target')} × {s.get('weight', 1.0):g}" for s in config.get("rewards", []))
    gold = ", ".join(str(s.get("name") or s.get("target")) for s in config.get("eval", {}).get("metrics", []))
    facts = [
        ("status", status),
        ("model", f"{model.get('pretrained', '?')} ({model.get('kind', '?')}, LoRA rank {model.get('lora', {}).get('rank', '?')})"),
        ("reward", rewards or "?"),
        ("eval-only metrics", gold or "none"),
        ("each stage", f"{sampling.get('prompts_per_stage', '?')} prompts × {sampling.get('k', '?')} candidates; keep {selection.get('keep', '?')} ({selection.get('strategy', '?')}"
         + (f", β = {selection['beta']}" if selection.get("beta") else "") + f"); fine-tune {train.get('steps_per_stage', '?')} step(s) at lr {train.get('lr', '?')}"),
        ("folder", str(run_dir.root.resolve())),
    ]
    return '<table class="facts">' + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in facts) + "</table>"


def write_report(run_dir: RunDir | str | Path) -> Path:
    """Write ``report.html`` into a run folder (finished or not) and return its path.

    Self-contained: plots and grids are embedded, so the file can be mailed or archived alone.
    """
    import yaml

    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    records = _dedupe(run_dir.read_metrics())
    config_text = run_dir.config.read_text(encoding="utf-8") if run_dir.config.exists() else ""
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        config = {}
    name = config.get("run", {}).get("name") or run_dir.root.name

    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>RAFT run {_esc(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>RAFT run: {_esc(name)}</h1><p class='muted'>report written {time.strftime('%Y-%m-%d %H:%M')}</p>",
        _facts(config, run_dir, records),
        "<h2>Before → after, held-out prompts</h2>",
        _summary_html(records, config.get("eval", {}).get("k")),
    ]
    eval_k = config.get("eval", {}).get("k")
    plots = plot_curves(records, eval_k)
    if plots:
        parts.append("<h2>Curves</h2><div class='plots'>")
        parts += [f'<img src="{_data_uri(png)}" alt="{_esc(title)}">' for title, png in plots]
        parts.append("</div>")

    stage_label = lambda s: f"stage {s}"  # noqa: E731
    eval_label = lambda s: "stage 0: base model" if s == 0 else f"after stage {s}"  # noqa: E731
    stage_grids = _pair_of_images(run_dir, GRID_FILE, stage_label)
    eval_grids = _pair_of_images(run_dir, EVAL_GRID_FILE, eval_label)
    if eval_grids:
        parts += ["<h2>Held-out prompts, same seeds: first vs last evaluation</h2>", eval_grids]
    if stage_grids:
        parts += ["<h2>Training candidates: first vs last stage</h2>", stage_grids]
    eval_samples = _pair_of_samples(run_dir, EVAL_SAMPLES_FILE, eval_label)
    chosen_samples = _pair_of_samples(run_dir, "chosen.jsonl", lambda s: f"stage {s}, best chosen")
    if eval_samples:
        parts += ["<h2>Held-out samples, same seeds: first vs last evaluation</h2>", eval_samples]
    if chosen_samples:
        parts += ["<h2>Chosen samples: first vs last stage</h2>", chosen_samples]

    parts += ["<h2>Time</h2>", _timing_html(records)]
    if records:
        parts += ["<details><summary>all metrics, per stage</summary>", _metrics_table_html(records), "</details>"]
    parts += ["<h2>Config</h2>", f'<pre class="config">{_esc(config_text or "(no config.yaml)")}</pre>', "</body></html>"]
    atomic_write_text(run_dir.report, "\n".join(parts))
    return run_dir.report
