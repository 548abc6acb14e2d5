"""`raft-diffusion sample` draws the stock pipeline's images by default; `score` scores what it wrote."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from raft_diffusion.cli import main
from tests.sd_fixtures import build_tiny_sd


@pytest.fixture(scope="module")
def pndm_sd(tmp_path_factory):
    """A tiny pipeline folder whose own scheduler is PNDM, as SD-1.5's is (not the loop's default DDIM)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(build_tiny_sd(tmp_path_factory.mktemp("ddim_sd"))))
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    folder = tmp_path_factory.mktemp("pndm_sd")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def samples(pndm_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    assert main(["sample", "--model", str(pndm_sd), "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
                 "--seed", "3", "--out", str(out)]) == 0
    return out


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def prompt_length(images, prompts):
    """A reward that reads the prompts only: shows which prompt each image was scored with."""
    return [float(len(p)) for p in prompts]


def test_sample_without_flags_draws_the_stock_pipelines_images(pndm_sd, samples):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pndm_sd))
    pipe.set_progress_bar_config(disable=True)
    files = sorted(samples.glob("0*.png"))
    assert [f.name for f in files] == ["000_seed3.png", "001_seed4.png", "002_seed5.png", "003_seed6.png"]
    for f, prompt, seed in zip(files, ["a cat", "a cat", "a dog", "a dog"], [3, 4, 5, 6]):
        # The stock snippet, all defaults (the folder's scheduler, 50 steps, guidance 7.5), seeded.
        stock = np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(seed)).images[0], dtype=np.int16)
        ours = np.asarray(Image.open(f).convert("RGB"), dtype=np.int16)
        assert np.abs(stock - ours).max() <= 1, f.name


def test_score_on_a_sample_folder_scores_exactly_the_samples_with_their_prompts(samples, tmp_path):
    assert (samples / "grid.png").is_file()
    out = tmp_path / "scores.csv"
    assert main(["score", str(samples), "--reward", "tests.test_sample_and_score:prompt_length", "--out", str(out)]) == 0
    rows = {row["path"].rpartition("/")[2]: (float(row["score"]), row["prompt"]) for row in read_rows(out)}
    assert rows == {"000_seed3.png": (5.0, "a cat"), "001_seed4.png": (5.0, "a cat"),
                    "002_seed5.png": (5.0, "a dog"), "003_seed6.png": (5.0, "a dog")}
    assert main(["score", str(samples), "--reward", "tests.test_sample_and_score:prompt_length", "--prompt", "a bird",
                 "--out", str(out)]) == 0
    assert {(float(row["score"]), row["prompt"]) for row in read_rows(out)} == {(6.0, "a bird")}
    # A sample folder inside a folder being searched counts its samples only, too.
    shutil.copytree(samples, tmp_path / "all" / "run1")
    Image.new("RGB", (8, 8)).save(tmp_path / "all" / "extra.png")
    assert main(["score", str(tmp_path / "all"), "--reward", "brightness", "--out", str(out)]) == 0
    names = sorted(row["path"].rpartition("/")[2] for row in read_rows(out))
    assert names == ["000_seed3.png", "001_seed4.png", "002_seed5.png", "003_seed6.png", "extra.png"]


def test_score_default_reward_offline_says_what_to_pass(samples, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # no developer's cached CLIP
    assert main(["score", str(samples)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: reward aesthetic:") and "\n" not in err
    assert """--reward-args '{"clip": "ViT-L-14-quickgelu", "pretrained": "/path/to/open_clip_pytorch_model.bin"}'""" in err
    assert """--reward-args '{"clip": "demo"}'""" in err
