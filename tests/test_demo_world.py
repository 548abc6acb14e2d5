"""The demo world: scenes, gold scorers, and a smoke-sized build of its image models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raft_diffusion.demo import world
from raft_diffusion.demo.world import Scene


def test_scenes_and_pictures_are_deterministic():
    a, b = world.sample_scenes(20, seed=3), world.sample_scenes(20, seed=3)
    assert a == b
    assert a != world.sample_scenes(20, seed=4)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(world.render_many(a), world.render_many(b)))
    assert world.render(a[0]).size == (world.SIZE, world.SIZE)


def test_prompt_split_holds_out_combinations():
    train, held_out = world.train_prompts(), world.eval_prompts()
    assert len(train) == 84 and len(held_out) == 24 and not set(train) & set(held_out)
    parsed = [world.parse_caption(p) for p in held_out]
    # every colour, shape and background is seen in training; only the combinations are new
    for i, names in enumerate((world.COLOURS, world.SHAPES, world.BACKGROUNDS)):
        assert {p[i] for p in parsed} == set(names)
    assert all(world.caption(s) in held_out for s in world.sample_scenes(50, 0, "eval"))
    assert world.parse_caption("a red circle on a blue background") == ("red", "circle", "blue")
    with pytest.raises(ValueError, match="not a demo-world caption"):
        world.parse_caption("a red elephant on a blue background")
    with pytest.raises(ValueError, match="split"):
        world.sample_scenes(1, 0, "test")


def test_validation_split_is_to_fitting_what_held_out_is_to_training():
    from raft_diffusion.core.prompts import builtin_prompts

    fit, val = builtin_prompts("demo_fit"), builtin_prompts("demo_val")
    assert len(fit) == 60 and len(val) == 24 and sorted(fit + val) == sorted(world.train_prompts())
    parsed_fit = [world.parse_caption(p) for p in fit]
    parsed_val = [world.parse_caption(p) for p in val]
    # one validation background per (colour, shape) pair, whose other training backgrounds stay to fit on
    assert sorted((c, s) for c, s, _ in parsed_val) == sorted((c, s) for c in world.COLOURS for s in world.SHAPES)
    assert {(c, s) for c, s, _ in parsed_fit} == {(c, s) for c, s, _ in parsed_val}
    assert {p[2] for p in parsed_val} == set(world.BACKGROUNDS)
    assert not set(val) & set(world.eval_prompts())


def test_gold_alignment_is_perfect_on_renders_and_catches_mismatches():
    scenes = world.sample_scenes(400, seed=11, split="all")
    images = world.render_many(scenes)
    prompts = [world.caption(s) for s in scenes]
    parts = world.gold_alignment_parts(images, prompts)
    assert parts["both"].mean() == 1.0
    # the same pictures with another colour, then another shape, in the prompt
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    wrong_colour = [world.make_caption(colours[(colours.index(s.colour) + 1) % 6], s.shape, s.background) for s in scenes]
    wrong_shape = [world.make_caption(s.colour, shapes[(shapes.index(s.shape) + 1) % 4], s.background) for s in scenes]
    parts = world.gold_alignment_parts(images, wrong_colour)
    assert parts["colour"].sum() == 0 and parts["shape"].mean() == 1.0
    assert world.gold_alignment(images, wrong_shape).sum() == 0
    blank = Image.new("RGB", (32, 32), world.BACKGROUNDS["gray"])
    assert world.gold_alignment([blank], prompts[:1])[0] == 0


def test_gold_aesthetic_rewards_size_centring_contrast_and_cleanliness():
    ideal = Scene("red", "square", "black", side=14.4, cx=15.5, cy=15.5, fade=0.0)
    images = {
        "ideal": world.render(ideal),
        "tiny": world.render(Scene("red", "square", "black", 8, 15.5, 15.5, 0.0)),
        "huge": world.render(Scene("red", "square", "black", 22, 15.5, 15.5, 0.0)),
        "corner": world.render(Scene("red", "square", "black", 14.4, 8.2, 8.2, 0.0)),
        "faded": world.render(Scene("red", "square", "black", 14.4, 15.5, 15.5, 0.3)),
    }
    specks = np.asarray(images["ideal"]).copy()
    specks[np.ix_([2, 4, 27, 29], range(1, 31, 2))] = world.COLOURS["red"]  # 60 isolated stray pixels
    images["specks"] = Image.fromarray(specks)
    images["blank"] = Image.new("RGB", (32, 32), (20, 20, 20))
    score = dict(zip(images, world.gold_aesthetic(list(images.values()))))
    assert score["ideal"] > 9.5
    for worse in ("tiny", "huge", "corner", "faded", "specks"):
        assert score[worse] < score["ideal"] - 0.2, worse
    assert score["blank"] == 1.0
    scores = world.gold_aesthetic(world.render_many(world.sample_scenes(200, 5)))
    assert scores.min() >= 1 and scores.max() <= 10 and scores.std() > 0.5  # samples of one world vary
    # a numpy array scores like the PIL image it came from
    assert world.gold_aesthetic([np.asarray(images["corner"])])[0] == pytest.approx(score["corner"])
    # Each defect lowers its own term, and the terms add up to the score.
    terms = {name: dict(zip(images, values)) for name, values in world.gold_terms(list(images.values())).items()}
    for worse, term in (("tiny", "size"), ("huge", "size"), ("corner", "centring"), ("faded", "contrast"), ("specks", "cleanliness")):
        assert terms[term][worse] < terms[term]["ideal"] - 0.1, (worse, term)
        others = [t for t in world.TERMS if t != term]
        assert all(terms[t][worse] == pytest.approx(terms[t]["ideal"], abs=0.05) for t in others), worse
    weights = dict(size=0.35, centring=0.35, contrast=0.15, cleanliness=0.15)
    for name, value in score.items():
        expected = 1.0 if name == "blank" else 1 + 9 * sum(w * terms[t][name] for t, w in weights.items())
        assert value == pytest.approx(expected), name


def test_layout_captions_read_size_place_faintness_and_specks_off_the_pixels():
    from scripts.demo.build_image import layout_caption

    prompt = "a red square on a black background"

    def caption(side=14.4, cx=15.5, cy=15.5, fade=0.0):
        return layout_caption(world.render(Scene("red", "square", "black", side, cx, cy, fade)), prompt)

    assert caption() == "a medium red square dead centre on a black background"
    assert caption(side=8).startswith("a tiny red square") and caption(side=22).startswith("a huge red square")
    assert "in the corner" in caption(side=8, cx=5, cy=5) and "near the centre" in caption(cx=19.5)
    assert "faint red" in caption(fade=0.3) and "faint" not in caption(fade=0.02)
    specks = np.asarray(world.render(Scene("red", "square", "black", 14.4, 15.5, 15.5, 0.0))).copy()
    specks[np.ix_([2, 4, 27, 29], range(1, 31, 2))] = world.COLOURS["red"]
    assert layout_caption(Image.fromarray(specks), prompt).endswith("dead centre with specks on a black background")
    assert layout_caption(Image.new("RGB", (32, 32), (20, 20, 20)), prompt) == "an empty black background"


def test_gold_rewards_are_registered():
    from raft_diffusion.rewards import build_reward
    from raft_diffusion.core.protocols import RewardError

    scenes = world.sample_scenes(6, seed=2)
    images, prompts = world.render_many(scenes), [world.caption(s) for s in scenes]
    reward = build_reward([{"name": "demo_gold"}, {"name": "demo_gold_align", "weight": 0.0}])
    parts = reward.score_parts(images, prompts)
    assert torch.allclose(parts["demo_gold"], torch.tensor(world.gold_aesthetic(images), dtype=torch.float32))
    assert parts["demo_gold_align"].tolist() == [1.0] * 6
    assert torch.allclose(reward(images, prompts), parts["demo_gold"])
    with pytest.raises(RewardError, match="part"):
        build_reward([{"name": "demo_gold_align", "args": {"part": "size"}}])
    shape_only = build_reward([{"name": "demo_gold_align", "args": {"part": "shape"}}])
    assert shape_only(images, prompts).tolist() == [1.0] * 6


def test_tokenizer_gives_one_token_per_world_word(tmp_path):
    from transformers import CLIPTokenizer

    from scripts.demo.build_image import make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "saved")  # plain from_pretrained, as pipelines do
    assert reloaded.model_max_length == 77 and len(reloaded) == len(tokenizer)
    for prompt in world.all_prompts():
        ids = reloaded(prompt).input_ids
        assert ids == tokenizer(prompt).input_ids and len(ids) == len(prompt.split()) + 2
    assert tokenizer.unk_token_id not in reloaded("a zebra").input_ids[1:-1]  # other text still encodes


def test_quick_build_runs_end_to_end_and_loads_back(tmp_path):
    from diffusers import StableDiffusionPipeline

    from scripts.demo.build_image import AestheticHead, build_image_assets, load_clip

    figures = build_image_assets(tmp_path, quick=True, log=lambda msg: None)
    assert {"sd_eval_alignment", "head_vs_gold_eval_samples", "vae_recon_alignment", "seconds"} <= set(figures)

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert pipe.safety_checker is None and pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.scaling_factor == pytest.approx(figures["vae_scaling_factor"], rel=1e-4)
    image = pipe("a red circle on a blue background", height=32, width=32, num_inference_steps=2,
                 guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pil").images[0]
    assert image.size == (32, 32)

    model, preprocess, tokenizer = load_clip(tmp_path / "clip")
    with torch.no_grad():
        embedding = model.encode_image(preprocess(image)[None], normalize=True)
        text = model.encode_text(tokenizer(["a red circle on a blue background"]), normalize=True)
    assert embedding.shape == text.shape and torch.allclose(embedding.norm(dim=-1), torch.ones(1))

    import open_clip  # the folder also loads through open_clip's own local-dir schema

    same, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'clip'}")
    with torch.no_grad():
        assert torch.allclose(same.eval().encode_image(preprocess(image)[None], normalize=True), embedding)

    state = torch.load(tmp_path / "aesthetic_head.pth", weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    hidden = tuple(state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6))
    head = AestheticHead(embedding.shape[1], hidden)
    head.load_state_dict(state)
    assert head.eval()(embedding).shape == (1, 1)
