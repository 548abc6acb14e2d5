"""PickScore, HPSv2 and ImageReward on tiny random-weight models saved in their real formats.

Each parity test computes the reference implementation's score step by step (its preprocessing and
its math, the version named) from the same files and checks the reward gives it to 1e-5.
"""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_fixtures import clip_configs, sample_images, tiny_config  # noqa: F401  (fixture)
from raft_diffusion.rewards import RewardError, build_reward
from raft_diffusion.recipe import load_reward_models

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PROMPTS = ["a red circle", "a blue square on green", "a cat", "two dogs", "a very long prompt " * 12]


def images(n=5):
    return [Image.fromarray(a) for a in sample_images(n)]  # 40 x 48: resized and cropped


def pil_resize_crop(image: Image.Image, size: int, crop_left_top) -> np.ndarray:
    """Shorter side to ``size`` with PIL's bicubic filter, longer side int(size * long / short), then crop."""
    w, h = image.size
    new = (int(size * w / h), size) if w >= h else (size, int(size * h / w))
    array = np.asarray(image.resize(new, Image.BICUBIC), dtype=np.float32)
    top, left = crop_left_top(new[1], new[0])
    return array[top : top + size, left : left + size]


def normalise(hwc_unit: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((hwc_unit - MEAN) / STD).transpose(2, 0, 1).copy())


# ---------------------------------------------------------------------------------------------
# PickScore: a transformers CLIP folder and a processor folder


@pytest.fixture(scope="module")
def pickscore_files(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from raft_diffusion.assets import resolve

    root = tmp_path_factory.mktemp("pickscore")
    tokenizer = CLIPTokenizer.from_pretrained(resolve("demo:sd/tokenizer"))
    tokenizer.save_pretrained(root / "processor")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "processor")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=3.0,
    )
    CLIPModel(config).save_pretrained(root / "model")
    return {"model": str(root / "model"), "processor": str(root / "processor")}


def test_pickscore_matches_the_model_card(pickscore_files):
    """PickScore_v1's model card (its README's inference code, transformers 4.x): the processor's image
    half (PIL bicubic resize of the shorter side, crop (h - 32) // 2, / 255, OpenAI normalisation),
    the text padded and truncated to 77, then ``logit_scale.exp() * text_embs @ image_embs.T`` on
    L2-normalised features, one prompt at a time as the card does."""
    from transformers import CLIPModel, CLIPTokenizer

    reward = build_reward([{"name": "pickscore", "args": {**pickscore_files, "batch_size": 2}}], device="cpu")
    pics, prompts = images(), PROMPTS
    got = reward(pics, prompts)

    model = CLIPModel.from_pretrained(pickscore_files["model"]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(pickscore_files["processor"])
    expected = []
    with torch.no_grad():
        for image, prompt in zip(pics, prompts):
            pixels = normalise(pil_resize_crop(image, 32, lambda h, w: ((h - 32) // 2, (w - 32) // 2)) / 255.0)[None]
            text = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.vision_model(pixel_values=pixels).pooler_output
            image_embs = model.visual_projection(image_embs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.text_projection(model.text_model(**text).pooler_output)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            expected.append(float((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0]))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-5)
    assert got.std() > 1e-3  # the images and prompts do score differently
    assert abs(float(got.abs().max())) <= math.exp(3.0) + 1e-4  # logit_scale.exp() bounds the score


def test_pickscore_missing_model_names_the_override(tmp_path, pickscore_files, capsys):
    specs = [{"name": "brightness"}, {"name": "pickscore", "args": {"model": str(tmp_path / "nope"), "processor": pickscore_files["processor"]}}]
    reward = build_reward(specs, device="cpu")
    with pytest.raises(RewardError) as err:
        load_reward_models(reward, "eval.metrics")
    message = str(err.value)
    assert "\n" not in message and "eval.metrics.1 (pickscore)" in message and "eval.metrics.1.args.model=/path/to/folder" in message
    from raft_diffusion import scoring

    images()[0].save(tmp_path / "a.png")
    args = json.dumps({"model": str(tmp_path / "nope"), "processor": pickscore_files["processor"]})
    assert scoring.main([str(tmp_path / "a.png"), "--reward", "pickscore", "--reward-args", args]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("error: reward pickscore: model folder") and "--reward-args" in printed
    assert '"model": "/path/to/folder"' in printed and "demo" not in printed and "\n" not in printed
    reward = build_reward([{"name": "pickscore", "args": {"model": pickscore_files["processor"], "processor": pickscore_files["processor"]}}], device="cpu")
    with pytest.raises(ValueError, match=r"model folder .*processor cannot be loaded as CLIPModel"):
        load_reward_models(reward, "rewards")
    reward = build_reward([{"name": "pickscore"}], device="cpu")  # neither default is cached: both named
    with pytest.raises(RewardError, match=r"model 'yuvalkirstain/PickScore_v1' is not .*; processor 'laion/CLIP-ViT-H-14-laion2B"
                                          r".*; pass local files: rewards\.0\.args\.model=/path/to/folder rewards\.0\.args\.processor="):
        load_reward_models(reward, "rewards")


# ---------------------------------------------------------------------------------------------
# HPSv2: an open_clip model config and an HPS-style checkpoint {"state_dict": ...}


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    config = root / "tiny-hps.json"
    config.write_text(json.dumps(tiny_config(16)))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-hps")
    torch.save({"state_dict": model.state_dict()}, root / "HPS_v2.1_compressed.pt")
    return {"clip": str(config), "checkpoint": str(root / "HPS_v2.1_compressed.pt")}


def test_hpsv2_matches_the_hpsv2_package(hps_files):
    """hpsv2 1.2.0 (``img_score.score`` with its vendored open_clip, torchvision >= 0.17): the validation
    transform converts to a tensor first and resizes the tensor (bicubic, antialiased, shorter side to
    the model's size, longer side int(size * long / short)), crops round((d - size) / 2), normalises
    with OpenAI's mean/std; the score is the diagonal of normalised image_features @ text_features.T."""
    reward = build_reward([{"name": "hpsv2", "args": {**hps_files, "batch_size": 3}}], device="cpu")
    pics, prompts = images(), PROMPTS
    got = reward(pics, prompts)

    model = open_clip.create_model("tiny-hps")
    model.load_state_dict(torch.load(hps_files["checkpoint"], weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-hps")
    expected = []
    with torch.no_grad():
        for image, prompt in zip(pics, prompts):
            x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0)
            h, w = x.shape[1:]
            size = (32, int(32 * w / h)) if h <= w else (int(32 * h / w), 32)
            x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
            top, left = int(round((size[0] - 32) / 2.0)), int(round((size[1] - 32) / 2.0))
            x = x[:, top : top + 32, left : left + 32]
            x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
            image_features = F.normalize(model.encode_image(x[None]), dim=-1)
            text_features = F.normalize(model.encode_text(tokenizer([prompt])), dim=-1)
            expected.append(float(torch.diagonal(image_features @ text_features.T)[0]))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-5)
    assert got.std() > 1e-4 and bool((got.abs() <= 1 + 1e-5).all())  # a cosine

    # open_clip's own transform (PIL resize) gives other pixels, so other scores: the order matters.
    _, _, pil_preprocess = open_clip.create_model_and_transforms("tiny-hps")
    pixels = torch.stack([pil_preprocess(image) for image in pics])
    with torch.no_grad():
        other = (F.normalize(model.encode_image(pixels), dim=-1) * F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)).sum(-1)
    assert (other - got).abs().max() > 1e-4


def test_hpsv2_bad_checkpoints_and_versions(hps_files, tmp_path):
    torch.save({"weights": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not an HPS checkpoint"):
        build_reward([{"name": "hpsv2", "args": {**hps_files, "checkpoint": str(tmp_path / "plain.pt")}}], device="cpu")(images(1), ["a"])
    with pytest.raises(ValueError, match="version must be one of v2.0, v2.1"):
        build_reward([{"name": "hpsv2", "args": {"version": "v3"}}])
    reward = build_reward([{"name": "hpsv2", "args": {"clip": hps_files["clip"], "checkpoint": str(tmp_path / "no.pt")}}])
    with pytest.raises(RewardError, match=r"checkpoint .*no\.pt not found; pass local files: rewards\.0\.args\.checkpoint=/path/to/no\.pt"):
        load_reward_models(reward, "rewards")
    reward = build_reward([{"name": "hpsv2", "args": {"clip": hps_files["clip"], "version": 2.0}}])
    with pytest.raises(RewardError, match=r"xswu/HPSv2/HPS_v2_compressed\.pt is not in the Hugging Face cache"):
        load_reward_models(reward, "rewards")


def test_score_command_with_hpsv2(hps_files, tmp_path, capsys):
    from raft_diffusion import scoring

    for i, image in enumerate(images(3)):
        image.save(tmp_path / f"{i}.png")
    args = json.dumps({**hps_files, "device": "cpu"})
    assert scoring.main([str(tmp_path), "--reward", "hpsv2", "--reward-args", args, "--prompt", "a cat",
                         "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    expected = build_reward([{"name": "hpsv2", "args": hps_files}], device="cpu")(images(3), ["a cat"] * 3)
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# ImageReward: a BLIP-style checkpoint (ImageReward.pt's key names), a med config, a BERT tokenizer

VISION = dict(width=32, depth=1, heads=2, patch=8, image=32)
MED = {"vocab_size": None, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
       "intermediate_size": 64, "max_position_embeddings": 40, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
       "pad_token_id": 0, "add_cross_attention": True, "architectures": ["BertModel"], "model_type": "bert"}
HEAD = (32, 16, 8, 8, 4)


@pytest.fixture(scope="module")
def image_reward_files(tmp_path_factory):
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("image_reward")
    words = ["a", "red", "blue", "circle", "square", "on", "green", "cat", "two", "dogs", "very", "long", "prompt"]
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(root / "tokenizer")
    med = {**MED, "vocab_size": len(tokenizer) + 2}  # BLIP adds [DEC] and [ENC]
    (root / "med_config.json").write_text(json.dumps(med))

    g = torch.Generator().manual_seed(2)
    state = {}

    def add(key, *shape, scale=0.2):
        state[key] = torch.randn(*shape, generator=g) * scale

    def linear(key, n_out, n_in):
        add(f"{key}.weight", n_out, n_in, scale=n_in**-0.5)
        add(f"{key}.bias", n_out, scale=0.05)

    def norm(key, n):
        state[f"{key}.weight"] = 1 + torch.randn(n, generator=g) * 0.1
        add(f"{key}.bias", n, scale=0.1)

    d, v = VISION["width"], "blip.visual_encoder."
    grid = VISION["image"] // VISION["patch"]
    add(v + "cls_token", 1, 1, d)
    add(v + "pos_embed", 1, grid * grid + 1, d)
    add(v + "patch_embed.proj.weight", d, 3, VISION["patch"], VISION["patch"], scale=0.1)
    add(v + "patch_embed.proj.bias", d, scale=0.05)
    for i in range(VISION["depth"]):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", d), linear(b + "attn.qkv", 3 * d, d), linear(b + "attn.proj", d, d)
        norm(b + "norm2", d), linear(b + "mlp.fc1", 4 * d, d), linear(b + "mlp.fc2", d, 4 * d)
    norm(v + "norm", d)
    h, t = med["hidden_size"], "blip.text_encoder."
    add(t + "embeddings.word_embeddings.weight", med["vocab_size"], h)
    add(t + "embeddings.position_embeddings.weight", med["max_position_embeddings"], h)
    state[t + "embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    norm(t + "embeddings.LayerNorm", h)
    for i in range(med["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", h), ("crossattention", d)):
            linear(b + f"{att}.self.query", h, h)
            linear(b + f"{att}.self.key", h, kv_width), linear(b + f"{att}.self.value", h, kv_width)
            linear(b + f"{att}.output.dense", h, h), norm(b + f"{att}.output.LayerNorm", h)
        linear(b + "intermediate.dense", med["intermediate_size"], h)
        linear(b + "output.dense", h, med["intermediate_size"]), norm(b + "output.LayerNorm", h)
    dims = [*HEAD, 1]
    for j, i in enumerate((0, 2, 4, 6, 7)):
        linear(f"mlp.layers.{i}", dims[j + 1], dims[j])
    linear("blip.vision_proj", 16, d)  # a BLIP pretraining key that the score does not use
    torch.save(state, root / "ImageReward.pt")
    return {"checkpoint": str(root / "ImageReward.pt"), "med_config": str(root / "med_config.json"),
            "tokenizer": str(root / "tokenizer"), "vision_heads": VISION["heads"]}


def _attention(q, k, v, heads, mask=None):
    b, n, width = q.shape
    split = lambda x: x.reshape(b, -1, heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-2, -1) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, width)


def reference_image_reward(sd: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageReward 1.5 (``ImageReward.score``): BLIP's ``vit.py`` VisionTransformer.forward, then
    ``med.py`` BertModel.forward in its default ``multimodal`` mode, then the MLP on token 0."""
    lin = lambda x, key: F.linear(x, sd[key + ".weight"], sd[key + ".bias"])  # noqa: E731
    ln = lambda x, key, eps: F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)  # noqa: E731
    v, heads = "blip.visual_encoder.", VISION["heads"]
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=VISION["patch"])
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + sd[v + "pos_embed"][:, : x.shape[1]]
    for i in range(VISION["depth"]):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attention(q, k, val, heads), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image_embeds = ln(x, v + "norm", 1e-6)

    t, eps, heads = "blip.text_encoder.", MED["layer_norm_eps"], MED["num_attention_heads"]
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = ln(x, t + "embeddings.LayerNorm", eps)
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py get_extended_attention_mask
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        a = _attention(lin(x, b + "attention.self.query"), lin(x, b + "attention.self.key"),
                       lin(x, b + "attention.self.value"), heads, extended)
        x = ln(lin(a, b + "attention.output.dense") + x, b + "attention.output.LayerNorm", eps)
        c = _attention(lin(x, b + "crossattention.self.query"), lin(image_embeds, b + "crossattention.self.key"),
                       lin(image_embeds, b + "crossattention.self.value"), heads)  # image mask: all ones
        x = ln(lin(c, b + "crossattention.output.dense") + x, b + "crossattention.output.LayerNorm", eps)
        ff = lin(F.gelu(lin(x, b + "intermediate.dense")), b + "output.dense")
        x = ln(ff + x, b + "output.LayerNorm", eps)
    r = x[:, 0, :].float()
    for i in (0, 2, 4, 6, 7):  # Linear, Dropout, ... (no activations), in eval mode
        r = lin(r, f"mlp.layers.{i}")
    return ((r - 0.16717362830052426) / 1.0333394966054072).reshape(-1)


def test_image_reward_matches_the_package(image_reward_files):
    """ImageReward 1.5's ``score``: the prompt padded/truncated to 35 BERT tokens, the image through
    ``_transform(224)`` (PIL bicubic resize of the shorter side, torchvision's centre crop
    round((d - 224) / 2), ToTensor, OpenAI normalisation), here at the tiny model's 32 px."""
    from transformers import AutoTokenizer

    reward = build_reward([{"name": "image_reward", "args": {**image_reward_files, "batch_size": 2}}], device="cpu")
    load_reward_models(reward, "rewards")
    pics, prompts = images(), PROMPTS
    got = reward(pics, prompts)

    sd = torch.load(image_reward_files["checkpoint"], weights_only=True)
    tokenizer = AutoTokenizer.from_pretrained(image_reward_files["tokenizer"])
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    expected = []
    with torch.no_grad():
        for image, prompt in zip(pics, prompts):
            text = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            assert text.input_ids.shape == (1, 35)
            crop = lambda h, w: (int(round((h - 32) / 2.0)), int(round((w - 32) / 2.0)))  # noqa: E731
            pixels = normalise(pil_resize_crop(image, 32, crop) / 255.0)[None]
            expected.append(float(reference_image_reward(sd, pixels, text.input_ids, text.attention_mask)[0]))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-5)
    assert got.std() > 1e-3


def test_image_reward_rejects_other_checkpoints(image_reward_files, tmp_path):
    torch.save({"visual.proj": torch.zeros(2)}, tmp_path / "other.pt")
    args = {**image_reward_files, "checkpoint": str(tmp_path / "other.pt")}
    with pytest.raises(ValueError, match="image_reward: not an ImageReward checkpoint"):
        build_reward([{"name": "image_reward", "args": args}], device="cpu").parts[0][2].load()
    reward = build_reward([{"name": "image_reward", "args": {"tokenizer": image_reward_files["tokenizer"]}}])
    with pytest.raises(RewardError, match=r"ImageReward\.pt is not in the Hugging Face cache.*; THUDM/ImageReward/med_config\.json .*"
                                          r"args\.checkpoint=/path/to/ImageReward\.pt rewards\.0\.args\.med_config=/path/to/med_config\.json$"):
        load_reward_models(reward, "rewards")


def test_the_runs_dtype_reaches_the_model_rewards(pickscore_files, hps_files, image_reward_files):
    """``build_reward(dtype=...)`` (train passes model.dtype) scores in that dtype unless args set one;
    bfloat16 scores stay close to float32 ones."""
    specs = [{"name": "pickscore", "args": pickscore_files}, {"name": "hpsv2", "args": hps_files},
             {"name": "image_reward", "args": image_reward_files}, {"name": "brightness"}]
    low = build_reward(specs, device="cpu", dtype="bfloat16")
    full = build_reward([{**s, "args": {**s["args"], "dtype": "float32"}} if "args" in s else s for s in specs],
                        device="cpu", dtype="bfloat16")
    assert [fn.dtype for _, _, fn in low.parts[:3]] == [torch.bfloat16] * 3
    assert [fn.dtype for _, _, fn in full.parts[:3]] == [torch.float32] * 3
    pics, prompts = images(3), PROMPTS[:3]
    got, expected = low.score_parts(pics, prompts), full.score_parts(pics, prompts)
    for name, tolerance in (("pickscore", 0.1), ("hpsv2", 0.02), ("image_reward", 0.1)):
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=tolerance)
