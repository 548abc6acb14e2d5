import csv
import io
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from aesthetic import AestheticPredictor, CLIPScore
from clip_fixtures import (  # noqa: F401  (fixtures)
    clip_configs,
    color_image,
    demo_dir,
    make_clip,
    sample_images,
    tiny_head_state,
)
from raft_diffusion import scoring
from raft_diffusion.rewards import build_reward

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def color_clip(clip_configs):
    """A tiny CLIP trained for a few steps to match colour words with coloured images."""
    model, preprocess = make_clip("tiny-clip", seed=0)
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    tokens = tokenizer([f"a {c} picture" for c in COLORS])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(12):
        pixels = torch.stack([preprocess(color_image(rgb, seed=step)) for rgb in COLORS.values()])
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits, target = 10 * img @ txt.T, torch.arange(len(COLORS))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), preprocess, tokenizer


def test_clip_score_prefers_matching_prompt(color_clip):
    model, preprocess, tokenizer = color_clip
    scorer = CLIPScore(model, preprocess, tokenizer, device="cpu")
    images = [color_image(rgb, seed=100) for rgb in COLORS.values()]  # unseen noise
    table = torch.stack([scorer.score(images, [f"a {c} picture"] * 3) for c in COLORS])  # [prompt, image]
    assert ((table >= 0) & (table <= 100)).all()
    for i in range(len(COLORS)):
        off_diagonal = torch.cat([table[i, :i], table[i, i + 1 :], table[:i, i], table[i + 1 :, i]])
        assert table[i, i] > off_diagonal.max() + 10


def test_clip_score_is_clipped_cosine_per_pair(color_clip):
    model, preprocess, tokenizer = color_clip
    scorer = CLIPScore(model, preprocess, tokenizer, device="cpu", batch_size=2)
    images = sample_images(5, seed=1) + [np.asarray(color_image(COLORS["red"]))]
    prompts = ["a red picture", "a dog", "a blue picture", "", "a green picture", "a red picture"]
    got = scorer.score(images, prompts)
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in images])), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(got, 100 * (img * txt).sum(-1).clamp(min=0), rtol=1e-5, atol=1e-4)
    assert got[-1] > 0  # the matching pair is not clipped
    order = [3, 0, 5, 1, 4, 2]  # pairs are scored independently of their position
    permuted = scorer.score([images[i] for i in order], [prompts[i] for i in order])
    torch.testing.assert_close(permuted, got[order], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(images, prompts[:2])


def test_clip_score_demo_layout(demo_dir):
    scorer = build_reward([{"name": "clip_score", "args": {"clip": "demo"}}], device="cpu")
    model, preprocess = make_clip("tiny-clip", seed=3)
    expected = CLIPScore(model, preprocess, open_clip.get_tokenizer("tiny-clip"), device="cpu")
    images, prompts = sample_images(3), ["a", "b c", "d"]
    torch.testing.assert_close(scorer(images, prompts), expected.score(images, prompts), rtol=0, atol=0)


def test_aesthetic_reward_through_build_reward(clip_configs, tmp_path):
    model, preprocess = make_clip("tiny-clip", seed=5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "clip.safetensors")
    torch.save(tiny_head_state(32), tmp_path / "head.pth")
    args = {
        "clip": clip_configs["tiny-clip"],
        "pretrained": str(tmp_path / "clip.safetensors"),
        "head": str(tmp_path / "head.pth"),
        "batch_size": 2,
    }
    reward = build_reward([{"name": "aesthetic", "args": args}], device="cpu")
    (_, _, fn), = reward.parts
    assert fn._scorer is None  # nothing is loaded until the first call
    images = [Image.fromarray(a) for a in sample_images(3)]
    got = reward(images, ["p"] * 3)
    scorer = fn._scorer
    torch.testing.assert_close(reward(images, ["q"] * 3), got, rtol=0, atol=0)
    assert fn._scorer is scorer  # built once
    expected = AestheticPredictor(model, preprocess, tmp_path / "head.pth", device="cpu").score(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown dtype"):
        build_reward([{"name": "aesthetic", "args": {**args, "dtype": "int3"}}])


def test_clip_score_reward_uses_prompts(demo_dir):
    reward = build_reward([{"name": "clip_score", "args": {"clip": "demo", "batch_size": 2}}], device="cpu")
    images = [Image.fromarray(a) for a in sample_images(3)]
    prompts = ["a cat", "a house at night", "red"]
    model, preprocess = make_clip("tiny-clip", seed=3)
    expected = CLIPScore(model, preprocess, open_clip.get_tokenizer("tiny-clip"), device="cpu").score(images, prompts)
    torch.testing.assert_close(reward(images, prompts), expected, rtol=1e-5, atol=1e-4)  # batch 2 vs 64


def test_jpeg_rewards_follow_ddpo():
    flat = Image.new("RGB", (64, 64), (120, 80, 40))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=95)
    compress = build_reward([{"name": "jpeg_compressibility"}])
    incompress = build_reward([{"name": "jpeg_incompressibility"}])
    scores = compress([flat, noise], ["", ""])
    assert scores[0] > scores[1]
    assert scores[1].item() == pytest.approx(-buffer.tell() / 1000)
    torch.testing.assert_close(incompress([flat, noise], ["", ""]), -scores)


def test_brightness_and_weighted_sum():
    images = [Image.new("RGB", (8, 8), c) for c in [(0, 0, 0), (255, 255, 255), (255, 0, 0), (51, 102, 153)]]
    reward = build_reward([{"name": "brightness", "weight": 2.0}, {"name": "jpeg_compressibility", "weight": 0.0}])
    parts = reward.score_parts(images, [""] * 4)
    torch.testing.assert_close(parts["brightness"], torch.tensor([0.0, 1.0, 1 / 3, 0.4]))
    torch.testing.assert_close(reward.combine(parts), 2 * parts["brightness"])


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16), (255, 255, 255)).save(folder / "white.png")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(folder / "sub" / "black.jpg")
    Image.new("L", (16, 16), 51).save(folder / "sub" / "gray.webp", lossless=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_score_command_csv_skips_corrupt_file(image_folder, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert scoring.main([str(image_folder), "--reward", "brightness", "--out", str(out)]) == 0
    rows = {row["path"].rpartition("/")[2]: float(row["score"]) for row in csv.DictReader(open(out))}
    assert rows == pytest.approx({"white.png": 1.0, "black.jpg": 0.0, "gray.webp": 0.2})
    assert "broken.png" in capsys.readouterr().err


def test_score_command_jsonl_and_stdout(image_folder, tmp_path, capsys):
    out = tmp_path / "deep" / "scores.jsonl"
    white, black = str(image_folder / "white.png"), str(image_folder / "sub" / "black.jpg")
    assert scoring.main([white, black, white, "--reward", "jpeg_incompressibility", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [white, black]  # duplicates scored once
    assert all(r["score"] > 0 for r in records)
    capsys.readouterr()
    assert scoring.main([white, "--reward", "brightness"]) == 0
    assert capsys.readouterr().out.split() == ["1.0000", white]


def test_score_command_aesthetic_with_reward_args(clip_configs, image_folder, tmp_path):
    model, preprocess = make_clip("tiny-clip", seed=6)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "clip.safetensors")
    torch.save(tiny_head_state(32), tmp_path / "head.pth")
    args = {
        "clip": clip_configs["tiny-clip"],
        "pretrained": str(tmp_path / "clip.safetensors"),
        "head": str(tmp_path / "head.pth"),
    }
    out = tmp_path / "scores.csv"
    argv = [str(image_folder / "white.png"), "--reward-args", json.dumps(args), "--out", str(out), "--device", "cpu"]
    assert scoring.main(argv) == 0
    (row,) = list(csv.DictReader(open(out)))
    expected = AestheticPredictor(model, preprocess, tmp_path / "head.pth", device="cpu").score(
        [Image.open(image_folder / "white.png").convert("RGB")]
    )
    assert float(row["score"]) == pytest.approx(expected.item(), abs=1e-5)


def test_score_command_exit_2_when_nothing_scored(image_folder, tmp_path, capsys):
    assert scoring.main([str(image_folder / "broken.png"), str(tmp_path / "nope.png"), "--reward", "brightness"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "nope.png" in err
    assert scoring.main([str(image_folder), "--reward", "brightness", "--reward-args", "[1"]) == 2
    assert scoring.main([str(image_folder), "--reward", "brightness", "--out", str(tmp_path / "s.txt")]) == 2
    assert scoring.main([str(image_folder), "--reward", "no_such_reward"]) == 2
    assert "unknown reward" in capsys.readouterr().err
