"""``report.html``: one self-contained page about a run, read from its run folder alone, so it can be
written for a run that is still going or was stopped half-way (``raft-diffusion report RUN_DIR``)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from PIL import Image

from raft_diffusion.core import stats
from raft_diffusion.core.guard import OUTCOME_FILE
from raft_diffusion.core.run_dir import RunDir, atomic_write_text
from raft_diffusion.report.grids import EVAL_GRID_FILE, EVAL_SAMPLES_FILE, GRID_FILE, _fmt
from raft_diffusion.report.plots import plot_changes, plot_curves, timing_rows
from raft_diffusion.report.summary import outcome_line, row_cells, shows_best_of_k, summary_table, verdict


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
.plots { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; } .plots img { width: 560px; max-width: 100%; height: auto; border: 1px solid #eee; }
.pair { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 16px; align-items: start; }
.pair figure { margin: 0; } .pair img { width: 100%; border: 1px solid #eee; image-rendering: pixelated; }
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


def _summary_html(records: list[dict], k: Any = None, outcome: dict | None = None) -> str:
    summary = stats.summarize(records, after=outcome["exported_stage"] if outcome else None)
    if summary is None:
        return f'<p class="muted">{_esc(summary_table(records))}</p>'
    before = "stage 0 (base model)" if summary["before"] == 0 else f"stage {summary['before']}"
    after = f"stage {summary['after']}" + (" (exported)" if outcome else "")
    best_of_k = shows_best_of_k(summary)
    head = ["held-out metric", f"before: {before}", f"after: {after}", "change", "change / SE"]
    head += [f"base model, best-of-{k or 'k'}"] if best_of_k else []
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for r in summary["rows"]:
        label = _esc(r["name"]) + (f' <span class="muted">({r["kind"]})</span>' if r["kind"] else "")
        cls = "" if r["z"] is None or abs(r["z"]) < 2 else (' class="up"' if r["z"] > 0 else ' class="down"')
        cells = row_cells(r, best_of_k)
        styled = [f"<td>{cells[0]}</td>", f"<td>{cells[1]}</td>", f"<td{cls}>{cells[2]}</td>", f"<td{cls}>{cells[3]}</td>"]
        styled += [f"<td>{cells[4]}</td>"] if best_of_k else []
        out.append(f"<tr><td>{label}</td>{''.join(styled)}</tr>")
    out.append("</table>")
    for line in (outcome_line(outcome), verdict(records)):
        if line:
            out.append(f'<div class="warn">{_esc(line)}</div>' if line.startswith("warning") else f"<p><b>{_esc(line)}</b></p>")
    if summary["before"] == summary["after"]:
        out.append('<p class="muted">Only one evaluation so far.</p>')
    out.append(
        '<p class="note">Mean over the held-out prompts and their fixed-seed samples, ± its standard error (SE). '
        + ("change / SE: the mean change sample by sample (every evaluation draws the same prompts from the same seeds) over "
           "its standard error; " if any(r["paired"] for r in summary["rows"]) else
           "change / SE = change / √(SE<sub>before</sub>² + SE<sub>after</sub>²): ")
        + "beyond ±2 it is unlikely to be noise. <i>gold</i> metrics are computed from the outputs directly and never used "
        "for selection."
        + (" <i>base model, best-of-k</i>: the base model's best of k samples per prompt, picked by the proxy reward at "
           "inference time; fine-tuning is worth its cost where one sample after RAFT matches it." if best_of_k else "")
        + "</p>"
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
    extra = [f"eval_{n}" for n in stats.eval_names(next((r for r in records if "eval_reward" in r), {})) if n != "reward"]
    keys = keys[:4] + extra + keys[4:]
    head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
    body = "".join("<tr><td>" + str(r["stage"]) + "</td>" + "".join(f"<td>{_fmt(stats.number(r, k), 4) if stats.number(r, k) is not None else ''}</td>" for k in keys) + "</tr>" for r in records)
    return f"<table><tr><th>stage</th>{head}</tr>{body}</table>"


def read_outcome(run_dir: RunDir) -> dict | None:
    """``outcome.json`` of a finished run: the exported stage and why the run ended (None before that)."""
    path = run_dir.root / OUTCOME_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _facts(config: dict, run_dir: RunDir, records: list[dict], outcome: dict | None) -> str:
    run, model, sampling = config.get("run", {}), config.get("model", {}), config.get("sampling", {})
    selection, train = config.get("selection", {}), config.get("train", {})
    planned = run.get("stages")
    done = run_dir.last_stage()
    if run_dir.is_finished() and outcome:
        status = (f"finished: {outcome['last_stage']} of {planned} stages, stage {outcome['exported_stage']} exported to final/"
                  + (f" ({outcome['rule']})" if outcome["rule"] != "last stage" else "")
                  + (f"; stopped early: {outcome['stop_reason']}" if outcome.get("stopped_early") else ""))
    elif run_dir.is_finished():
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
    records = stats.dedupe(run_dir.read_metrics())
    config_text = run_dir.config.read_text(encoding="utf-8") if run_dir.config.exists() else ""
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        config = {}
    name = config.get("run", {}).get("name") or run_dir.root.name
    outcome = read_outcome(run_dir) if run_dir.is_finished() else None

    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>RAFT run {_esc(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>RAFT run: {_esc(name)}</h1><p class='muted'>report written {time.strftime('%Y-%m-%d %H:%M')}</p>",
        _facts(config, run_dir, records, outcome),
        "<h2>Before → after, held-out prompts</h2>",
        _summary_html(records, config.get("eval", {}).get("k"), outcome),
    ]
    eval_k = config.get("eval", {}).get("k")
    plots = plot_curves(records, eval_k)
    changes = plot_changes(records, outcome)
    if changes is not None:
        plots.insert(0, ("change since the base model", changes))
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
    parts += ["<h2>Config</h2>", "<details><summary>config.yaml, as resolved</summary>",
              f'<pre class="config">{_esc(config_text or "(no config.yaml)")}</pre>', "</details>", "</body></html>"]
    atomic_write_text(run_dir.report, "\n".join(parts))
    return run_dir.report
