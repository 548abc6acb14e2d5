"""Image grids, TensorBoard logging, the summary table and report.html, on toy runs."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raft_diffusion.core.protocols import Candidate
from raft_diffusion import report
from raft_diffusion.core import progress
from raft_diffusion.core.config import save_config
from raft_diffusion.core.loop import RaftLoop, RunInterrupted
from raft_diffusion.core.run_dir import RunDir
from raft_diffusion.demo import world
from raft_diffusion.core.scores import FunctionReward, WeightedReward
from tests.toy import GaussianAdapter, reward_of, toy_config


class ShapesAdapter:
    """Draws demo-world scenes whose size and position follow a Gaussian policy; fine-tuning moves
    the policy mean toward the chosen scenes. Image outputs, no model library."""

    def __init__(self):
        self.mu = np.array([9.0, 6.0, -5.0])  # shape side, x and y offset from the centre (pixels)
        self.sigma = np.array([3.0, 3.0, 3.0])

    def generate(self, prompts, k, seeds):
        out = []
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(seed)
            side, dx, dy = self.mu + self.sigma * rng.standard_normal(3)
            side = float(np.clip(side, world.MIN_SIDE, world.MAX_SIDE))
            lo, hi = side / 2 + 1, world.SIZE - side / 2 - 1
            cx, cy = (float(np.clip(world.SIZE / 2 + d, lo, hi)) for d in (dx, dy))
            colour, shape, background = world.parse_caption(prompts[i // k])
            scene = world.Scene(colour, shape, background, side, cx, cy, float(rng.uniform(0, world.MAX_FADE)))
            x = torch.tensor([side, cx - world.SIZE / 2, cy - world.SIZE / 2], dtype=torch.float64)
            out.append(Candidate(prompts[i // k], seed, world.render(scene), {"x": x}))
        return out

    def finetune(self, chosen):
        target = torch.stack([c.payload["x"] for c in chosen]).mean(0).numpy()
        self.mu += 0.7 * (target - self.mu)
        return {"loss": float(np.abs(target - self.mu).mean())}

    def save(self, path):
        np.save(path / "mu.npy", self.mu)

    def load(self, path):
        self.mu = np.load(path / "mu.npy")

    def export(self, path):
        np.save(path / "mu.npy", self.mu)


def proxy_aesthetic(images, prompts):
    return list(world.gold_aesthetic(images) + 0.02 * np.array([float(np.asarray(im).std()) for im in images]))


def gold_aesthetic(images, prompts):
    return list(world.gold_aesthetic(images))


def gold_alignment(images, prompts):
    return list(world.gold_alignment(images, prompts))


def gold_metrics() -> WeightedReward:
    return WeightedReward([(fn.__name__, 1.0, FunctionReward(fn, fn.__name__)) for fn in (gold_aesthetic, gold_alignment)])


def shapes_config(tmp_path, stages=3, **overrides):
    settings = dict(
        run__name="shapes",
        run__stages=stages,
        run__save_images=True,
        run__grid_prompts=3,
        sampling__k=4,
        sampling__prompts_per_stage=6,
        prompts__items=world.train_prompts()[:12],
        prompts__eval_items=world.eval_prompts()[:4],
        eval__k=2,
        eval__metrics=[{"target": "tests.test_report:gold_aesthetic"}, {"target": "tests.test_report:gold_alignment"}],
        log__tensorboard=True,
        rewards=[{"name": "aesthetic", "target": "tests.test_report:proxy_aesthetic"}],
    )
    return toy_config(tmp_path, **{**settings, **overrides})


def run_with_reports(config, adapter, reward, eval_metrics=None, stop_after=None):
    """The loop as train.py wires it: grids, TensorBoard, then report.html."""
    run_dir = RunDir(f"{config.run.output_dir}/{config.run.name}")
    start = run_dir.prepare(resume=False, overwrite=False)
    save_config(config, run_dir.config)
    images = report.StageImages(config)
    logger = report.MetricsLogger(config, run_dir, start)

    def on_record(record):
        logger.log(record)
        if stop_after is not None and record["stage"] == stop_after:
            raise RunInterrupted("SIGTERM")

    loop = RaftLoop(config, adapter, reward, run_dir, eval_metrics=eval_metrics, on_stage=images, on_eval=images.eval_grid, on_record=on_record, log=lambda _m: None)
    try:
        loop.run(start_after=start)
    except RunInterrupted:
        pass
    finally:
        logger.close()
    return run_dir, report.write_report(run_dir)


# -- grids ------------------------------------------------------------------------------------

COLOURS = [(200, 10 * i, 255 - 10 * i) for i in range(12)]  # one distinct colour per candidate


def _find(grid: np.ndarray, colour) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero((grid == np.array(colour)).all(-1))
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else None


def test_stage_grid_sorts_by_reward_and_frames_the_chosen(tmp_path):
    config = toy_config(tmp_path, run__grid_prompts=2)
    p, k = 3, 4
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3], [2.0, -1.0, 3.0, float("nan")], [0.0, 0.0, 0.0, 0.0]])
    candidates = [Candidate(f"prompt {i // k}", i, Image.new("RGB", (32, 32), COLOURS[i]), {}, i // k, i % k) for i in range(p * k)]
    chosen = [6, 1, 4]  # flat indices p*K+k, best first

    path = report.StageImages(config)(stage=5, folder=tmp_path, prompts=[f"prompt {i}" for i in range(p)], candidates=candidates, rewards=rewards, chosen=chosen, first_prompt=0)

    assert path == tmp_path / "grid.png"
    grid = np.asarray(Image.open(path).convert("RGB"))
    boxes = {i: _find(grid, COLOURS[i]) for i in range(p * k)}
    assert all(boxes[i] is None for i in range(8, 12))  # only run.grid_prompts rows
    for i in range(8):
        x0, y0, x1, y1 = boxes[i]
        assert (x1 - x0, y1 - y0) == (96, 96)  # 32 px upscaled x3, nearest neighbour: still one flat colour
        frame = tuple(grid[y0 + 20, x0 - 2])
        assert (frame == report.CHOSEN_COLOUR) == (i in chosen)
    for row in range(2):
        order = sorted(range(row * k, row * k + k), key=lambda i: boxes[i][0])
        scores = [rewards.view(-1)[i].item() for i in order]
        finite = [s for s in scores if math.isfinite(s)]
        assert finite == sorted(finite, reverse=True) and scores[: len(finite)] == finite  # best left, nan last
        assert len({boxes[i][1] for i in order}) == 1  # one row per prompt
    assert boxes[4][1] > boxes[0][1]


def test_eval_grid_keeps_candidate_order_and_text_runs_write_samples(tmp_path):
    config = toy_config(tmp_path)
    k = 2
    rewards = torch.tensor([[5.0, 1.0], [2.0, 3.0]])
    gold = {"gold_aesthetic": torch.tensor([[4.0, 6.0], [1.0, 2.0]])}
    images = [Candidate(f"e{i // k}", i, Image.new("RGB", (32, 32), COLOURS[i]), {}, i // k, i % k) for i in range(4)]
    path = report.StageImages(config).eval_grid(stage=0, folder=tmp_path, candidates=images, rewards=rewards, metrics=gold)
    grid = np.asarray(Image.open(path).convert("RGB"))
    boxes = [_find(grid, COLOURS[i]) for i in range(4)]
    assert boxes[0][0] < boxes[1][0] and boxes[2][0] < boxes[3][0]  # seed order, not reward order
    assert not any((grid[b[1] + 20, b[0] - 2] == report.CHOSEN_COLOUR).all() for b in boxes)

    texts = [Candidate(f"e{i // k}", i, f"answer {i}", {}, i // k, i % k) for i in range(4)]
    path = report.StageImages(config).eval_grid(stage=3, folder=tmp_path, candidates=texts, rewards=rewards, metrics=gold)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["output"] for r in rows] == ["answer 0", "answer 1", "answer 2", "answer 3"]
    assert [r["reward"] for r in rows] == [5.0, 1.0, 2.0, 3.0] and rows[1]["gold_aesthetic"] == 6.0


# -- a toy run: no images ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    config = toy_config(tmp_path_factory.mktemp("toy"), run__stages=4, log__tensorboard=True)
    return run_with_reports(config, GaussianAdapter(), reward_of(lambda xs, _p: [-abs(x - 3.0) for x in xs]))


def test_summary_table_matches_the_metrics(toy_run):
    run_dir, _ = toy_run
    records = run_dir.read_metrics()
    before, after = records[0], records[-1]
    text = report.summary_table(records)
    assert "stage 0 (base model) -> stage 4" in text
    line = next(line for line in text.splitlines() if line.startswith("reward (proxy)"))
    # change and its SE are paired sample by sample: recompute them from the per-sample score files
    first, last = ([json.loads(x) for x in (run_dir.stage_dir(s) / "eval_scores.jsonl").read_text().splitlines()] for s in (0, 4))
    assert [(a["prompt"], a["seed"]) for a in first] == [(b["prompt"], b["seed"]) for b in last]
    diff = np.array([b["reward"] - a["reward"] for a, b in zip(first, last)])
    change, se = diff.mean(), diff.std(ddof=1) / math.sqrt(len(diff))
    assert change == pytest.approx(after["eval_reward"] - before["eval_reward"], abs=1e-6)
    assert se == pytest.approx(after["eval_reward_change_sem"], rel=1e-6)
    z = change / se
    assert "sample by sample" in text.splitlines()[-1]
    expected = [
        f"{before['eval_reward']:.3f} ± {before['eval_reward_sem']:.3f}",
        f"{after['eval_reward']:.3f} ± {after['eval_reward_sem']:.3f}",
        f"{change:+.3f}",
        f"{z:+.1f}",
        f"{before['eval_reward_best_of_k']:.3f}",
    ]
    assert re.split(r"\s{2,}", line)[1:] == expected
    assert change > 0


def test_summary_without_evaluation_reports_the_policy_reward():
    records = [{"stage": 1, "reward_policy": -2.0}, {"stage": 2, "reward_policy": -0.5}]
    assert report.summary_table(records).endswith("stage 1 -2.000 -> stage 2 -0.500")


def test_summary_warns_when_the_proxy_rises_while_gold_falls():
    def record(stage, proxy, gold):
        return {"stage": stage, "eval_reward": proxy, "eval_reward_sem": 0.1, "eval_gold": gold, "eval_gold_sem": 0.1}

    hacked = report.summary_table([record(0, 1.0, 5.0), record(4, 2.0, 4.0)])
    assert "gold (gold)" in hacked and "exploiting the proxy" in hacked.splitlines()[-1]
    assert "exploiting" not in report.summary_table([record(0, 1.0, 5.0), record(4, 2.0, 5.5)])


def test_report_of_a_run_that_has_not_started(tmp_path):
    config = toy_config(tmp_path)
    run_dir = RunDir(tmp_path / "toy")
    run_dir.root.mkdir()
    save_config(config, run_dir.config)
    page = report.write_report(run_dir).read_text()
    assert "not finished: 0 of 3 stages" in page and "no metrics yet" in page


def test_report_of_a_toy_run_has_summary_plots_and_config(toy_run):
    run_dir, path = toy_run
    page = path.read_text()
    assert path == run_dir.root / "report.html"
    assert "finished: 4 of 4 stages" in page
    assert f"{run_dir.read_metrics()[-1]['eval_reward']:.3f}" in page
    assert page.count('src="data:image/png;base64,') >= 3  # reward, loss, time plots; no grids
    assert "grid" not in {p.name for p in run_dir.stages.rglob("*.png")}
    assert "strategy: local" in page  # the config


def test_change_curve_draws_one_panel_per_held_out_metric(toy_run, tmp_path):
    import subprocess
    import sys

    from raft_diffusion.report.plots import plot_changes

    run_dir, path = toy_run
    records = run_dir.read_metrics()
    png = plot_changes(records, {"exported_stage": 2})
    assert png.startswith(b"\x89PNG")
    with_gold = [{**r, "eval_near_change": 0.1, "eval_near_change_sem": 0.01} if r["stage"] else {**r, "eval_near": 0.0} for r in records]
    height = lambda data: Image.open(__import__("io").BytesIO(data)).height  # noqa: E731
    assert height(plot_changes(with_gold)) > height(png)  # a second metric, a second panel
    assert plot_changes([r for r in records if r["stage"] == 0]) is None  # the base model alone: nothing to draw
    assert "change since the base model" in path.read_text()
    out, script = tmp_path / "changes.png", str(Path(__file__).resolve().parents[1] / "scripts" / "plot_changes.py")
    done = subprocess.run([sys.executable, script, str(run_dir.root), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0 and Image.open(out).format == "PNG"
    missing = subprocess.run([sys.executable, script, str(tmp_path / "none"), "--out", str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def test_tensorboard_receives_every_record(toy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = toy_run
    events = EventAccumulator(str(run_dir.tb)).Reload()
    records = run_dir.read_metrics()
    logged = [(e.step, e.value) for e in events.Scalars("eval/reward")]
    assert logged == [(r["stage"], pytest.approx(r["eval_reward"])) for r in records]
    assert [e.step for e in events.Scalars("reward/chosen_mean")] == [1, 2, 3, 4]


# -- an image run, stopped half-way -----------------------------------------------------------


def test_report_of_a_half_finished_image_run(tmp_path):
    config = shapes_config(tmp_path, stages=4)
    run_dir, path = run_with_reports(config, ShapesAdapter(), reward_of(proxy_aesthetic, "aesthetic"), gold_metrics(), stop_after=2)

    assert not run_dir.final.exists() and run_dir.last_stage() == 2
    page = path.read_text()
    assert "not finished: 2 of 4 stages" in page
    assert "gold_aesthetic" in page and "stage 0 (base model)" in page
    for stage in (1, 2):
        with Image.open(run_dir.stages / f"00000{stage}" / "grid.png") as grid:
            assert grid.width > 4 * 96 and grid.height > 3 * 96
    assert sorted(p.parent.name for p in run_dir.stages.glob("*/eval_grid.png")) == ["000000", "000001", "000002"]
    assert page.count('src="data:image/png;base64,') >= 4 + 4  # 2 stage + 2 eval grids, and the plots
    records = run_dir.read_metrics()
    assert records[-1]["eval_gold_aesthetic"] > records[0]["eval_gold_aesthetic"]  # the policy learned
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir.tb)).Reload()
    assert [e.step for e in events.Images("grids/stage")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/gold_aesthetic")] == [0, 1, 2]


# -- progress bars ----------------------------------------------------------------------------


def test_progress_draws_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

        def write(self, _text):
            pass

        def flush(self):
            pass

    assert progress.progress(range(3)).disable  # pytest's stderr is no terminal
    monkeypatch.setattr("sys.stderr", Terminal())
    assert not progress.progress(range(3)).disable
    progress.set_quiet(True)
    try:
        assert progress.progress(range(3)).disable
    finally:
        progress.set_quiet(False)
