"""LLM adapter and text rewards on a tiny GPT-2 built from config (offline, CPU, seconds)."""

import json
import math
import sys
import types

import pytest
import torch
from accelerate import Accelerator
from transformers import (
    AutoModelForCausalLM,
    GPT2ForSequenceClassification,
)

from raft_diffusion.adapters.llm import (
    IGNORE_INDEX,
    LLMAdapter,
    ModelNotFoundError,
    causal_lm_loss,
    sft_batch,
)
from raft_diffusion.core.config import from_dict
from raft_diffusion.rewards import build_reward
from raft_diffusion.core.loop import distinct_n
from tests.lm_fixtures import PROMPTS, build_tiny_classifier, build_tiny_lm, make_tokenizer, tiny_config  # noqa: F401
from raft_diffusion.rewards.text import FILTERED_SCORE

pytestmark = pytest.mark.floor  # in the fast subset that `make test-min` runs at the dependency floors


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny_cls"))


def make_config(lm_dir, **sections):
    data = {
        "run": {"seed": 0},
        "model": {"kind": "llm", "pretrained": lm_dir, "lora": {"rank": 4, "alpha": 8}},
        "sampling": {"k": 4, "batch_size": 5},
        "llm": {"max_new_tokens": 6},
        "train": {"lr": 1e-2, "steps_per_stage": 4, "batch_size": 4},
        "rewards": [{"name": "word_count", "args": {"words": "good"}}],
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return from_dict(data)


def make_adapter(config):
    accelerator = Accelerator(cpu=True, mixed_precision=config.train.mixed_precision,
                              gradient_accumulation_steps=config.train.grad_accum)
    return LLMAdapter(config, accelerator)


def seeds_for(n, offset=0):
    return [offset + i for i in range(n)]


def test_generate_k_seeds_and_grouping(lm_dir):
    adapter = make_adapter(make_config(lm_dir))
    k = 3
    cands = adapter.generate(PROMPTS, k, seeds_for(len(PROMPTS) * k))
    assert len(cands) == len(PROMPTS) * k
    for n, c in enumerate(cands):
        assert (c.prompt_index, c.k_index, c.prompt, c.seed) == (n // k, n % k, PROMPTS[n // k], n)
        for key in ("prompt_ids", "response_ids"):
            ids = c.payload[key]
            assert ids.dtype == torch.long and ids.dim() == 1 and ids.device.type == "cpu"
        assert c.payload["prompt_ids"].tolist() == adapter.tokenizer(c.prompt)["input_ids"]
        assert 1 <= len(c.payload["response_ids"]) <= 6
        assert adapter.tokenizer.decode(c.payload["response_ids"], skip_special_tokens=True) == c.output
    again = adapter.generate(PROMPTS, k, seeds_for(len(PROMPTS) * k))
    assert [c.payload["response_ids"].tolist() for c in again] == [c.payload["response_ids"].tolist() for c in cands]
    other = adapter.generate(PROMPTS, k, seeds_for(len(PROMPTS) * k, offset=100))
    assert [c.output for c in other] != [c.output for c in cands]
    # A candidate depends on its own seed only: regenerated alone, in another batch, it is the same.
    alone = adapter.generate([PROMPTS[2]], 1, [cands[7].seed])[0]
    assert alone.payload["response_ids"].tolist() == cands[7].payload["response_ids"].tolist()
    # Sampling leaves the global RNG (which training uses) alone.
    state = torch.get_rng_state()
    adapter.generate(PROMPTS, 1, seeds_for(3))
    assert torch.equal(state, torch.get_rng_state())


def test_response_cut_at_eos_and_stop_string(lm_dir):
    adapter = make_adapter(make_config(lm_dir, llm={"stop": ["but"]}))
    ids = lambda text: adapter.tokenizer(text)["input_ids"]  # noqa: E731
    eos, pad = adapter.tokenizer.eos_token_id, adapter.tokenizer.pad_token_id
    tokens = torch.tensor(ids("good and nice") + [eos, pad, pad])
    response, text = adapter._split_response(tokens)
    assert response.tolist() == ids("good and nice") + [eos]  # EOS kept: fine-tuning learns to stop
    assert text == "good and nice"
    tokens = torch.tensor(ids("good but bad and") + [eos])
    response, text = adapter._split_response(tokens)
    assert response.tolist() == ids("good but")  # up to the stop string, which ends the response
    assert text.strip() == "good"


def test_prompt_tokens_get_no_loss(lm_dir):
    adapter = make_adapter(make_config(lm_dir))
    cands = adapter.generate(PROMPTS, 2, seeds_for(6))
    pad = adapter.tokenizer.pad_token_id
    batch = sft_batch(cands, pad)
    for row, c in enumerate(cands):
        n, m = len(c.payload["prompt_ids"]), len(c.payload["response_ids"])
        assert (batch["labels"][row, :n] == IGNORE_INDEX).all()
        assert batch["labels"][row, n: n + m].tolist() == c.payload["response_ids"].tolist()
        assert (batch["labels"][row, n + m:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == n + m
    with_prompt = sft_batch(cands, pad, train_on_prompt=True)
    n = len(cands[0].payload["prompt_ids"])
    assert with_prompt["labels"][0, :n].tolist() == cands[0].payload["prompt_ids"].tolist()

    # The loss does not see the logits that predict prompt tokens: changing them changes nothing,
    # and they get no gradient, while the logits predicting response tokens do.
    logits = torch.randn(*batch["input_ids"].shape, len(adapter.tokenizer), requires_grad=True)
    loss = causal_lm_loss(logits, batch["labels"])
    loss.backward()
    n0 = len(cands[0].payload["prompt_ids"])
    perturbed = logits.detach().clone()
    perturbed[0, : n0 - 1] += 5 * torch.randn_like(perturbed[0, : n0 - 1])
    assert torch.equal(causal_lm_loss(perturbed, batch["labels"]), loss.detach())
    assert logits.grad[0, : n0 - 1].abs().sum() == 0
    assert logits.grad[0, n0 - 1].abs().sum() > 0  # the last prompt position predicts the first response token
    with_prompt_loss = causal_lm_loss(perturbed, with_prompt["labels"])
    assert not torch.equal(with_prompt_loss, causal_lm_loss(logits.detach(), with_prompt["labels"]))


def test_rule_reward_rises_over_raft_stages(lm_dir):
    config = make_config(lm_dir, model={"lora": {"rank": 8, "alpha": 16}}, sampling={"k": 8, "batch_size": 24},
                         train={"lr": 3e-2, "steps_per_stage": 8, "batch_size": 6})
    adapter = make_adapter(config)
    reward = build_reward(config.rewards)
    eval_seeds = seeds_for(len(PROMPTS) * 8, offset=10_000)

    def mean_reward():
        cands = adapter.generate(PROMPTS, 8, eval_seeds)
        return reward([c.output for c in cands], PROMPTS).mean().item()

    before = mean_reward()
    for stage in range(5):  # generate -> score -> keep the best of K per prompt -> fine-tune
        cands = adapter.generate(PROMPTS, 8, seeds_for(len(PROMPTS) * 8, offset=100 * stage))
        scores = reward([c.output for c in cands], [c.prompt for c in cands]).view(len(PROMPTS), 8)
        chosen = [cands[i * 8 + int(j)] for i, j in enumerate(scores.argmax(1))]
        stats = adapter.finetune(chosen)
        assert stats["steps"] == 8 and stats["seconds"] > 0 and stats["loss_last"] < stats["loss_first"] * 2
    after = mean_reward()
    assert after > before + 1.0, (before, after)


def test_log_ratio_zero_before_training(lm_dir):
    adapter = make_adapter(make_config(lm_dir))
    cands = adapter.generate(PROMPTS, 2, seeds_for(6))
    assert torch.allclose(adapter.log_ratio(cands), torch.zeros(6), atol=1e-5)
    adapter.finetune(cands)
    after = adapter.log_ratio(cands)
    assert after.shape == (6,) and after.abs().max() > 1e-3 and after.mean() > 0  # trained on them: more likely

    full = make_adapter(make_config(lm_dir, model={"lora": {"rank": 0}}))
    assert torch.allclose(full.log_ratio(cands), torch.zeros(6), atol=1e-5)


def _one_stage(adapter, stage):
    cands = adapter.generate(PROMPTS, 4, seeds_for(12, offset=1000 * stage))
    return adapter.finetune(cands[::2])


def _weights(adapter):
    return {name: p.detach().clone() for name, p in adapter.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rank", [4, 0])
def test_resume_is_bit_identical(lm_dir, tmp_path, rank):
    from accelerate.state import AcceleratorState, GradientState

    # Dropout draws from the global RNG, so a wrong restore of it would show.
    config = make_config(lm_dir, model={"lora": {"rank": rank, "alpha": 8, "dropout": 0.1}},
                         train={"steps_per_stage": 3, "batch_size": 2, "grad_accum": 2})
    straight = make_adapter(config)
    torch.manual_seed(123)
    for stage in range(2):
        _one_stage(straight, stage)
    expected = _weights(straight)

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    first = make_adapter(config)
    torch.manual_seed(123)
    _one_stage(first, 0)
    first.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "random_states_0.pkl").is_file()

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.manual_seed(999)  # a fresh process would start elsewhere
    resumed = make_adapter(config)
    resumed.load(tmp_path / "ckpt")
    _one_stage(resumed, 1)
    got = _weights(resumed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert any(not torch.equal(got[name], _weights(first)[name]) for name in expected)  # stage 2 did train


def test_export_reloads_and_generates_the_same(lm_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    adapter = make_adapter(make_config(lm_dir))
    adapter.finetune(adapter.generate(PROMPTS, 2, seeds_for(6)))
    adapter.export(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    ids = torch.tensor([adapter.tokenizer("the movie was good and")["input_ids"]])
    with torch.no_grad():
        reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "lora")).eval()
        assert torch.allclose(reloaded(ids).logits, adapter.model(ids).logits, atol=1e-5)
    again = make_adapter(make_config(lm_dir, model={"init_lora": str(tmp_path / "lora")}))
    seeds = seeds_for(6, offset=77)
    expected = [c.output for c in adapter.generate(PROMPTS, 2, seeds)]
    assert [c.output for c in again.generate(PROMPTS, 2, seeds)] == expected

    full = make_adapter(make_config(lm_dir, model={"lora": {"rank": 0}}))
    full.finetune(full.generate(PROMPTS, 2, seeds_for(6)))
    full.export(tmp_path / "full")
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).eval()
        assert torch.allclose(reloaded(ids).logits, full.model(ids).logits, atol=1e-5)


def test_moving_average_is_what_samples_and_exports(lm_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    adapter = make_adapter(make_config(lm_dir, train={"ema_decay": 0.5, "lr": 1e-2}))
    for stage in range(2):
        adapter.finetune(adapter.generate(PROMPTS, 2, seeds_for(6, offset=100 * stage)))
    adapter.export(tmp_path / "lora")
    ids = torch.tensor([adapter.tokenizer("the movie was good and")["input_ids"]])
    with torch.no_grad():
        reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "lora")).eval()(ids).logits
        trained = adapter.model(ids).logits
        with adapter.finetuner.averaged():
            averaged = adapter.model(ids).logits
    assert not torch.allclose(trained, averaged, atol=1e-4)
    assert torch.allclose(reloaded, averaged, atol=1e-5)


def test_chat_template_is_applied(lm_dir, tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}the {{ m.content }}{% endfor %}{% if add_generation_prompt %} it{% endif %}"
    )
    AutoModelForCausalLM.from_pretrained(lm_dir).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    adapter = make_adapter(make_config(str(tmp_path), llm={"chat_template": True}))
    assert adapter.encode_prompt("movie was") == tokenizer("the movie was it")["input_ids"]
    with pytest.raises(ValueError, match="chat template"):
        make_adapter(make_config(lm_dir, llm={"chat_template": True}))


def test_missing_model_is_one_clear_error(tmp_path):
    config = make_config(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        make_adapter(config)
    assert isinstance(err.value, ModelNotFoundError) and "model.pretrained" in str(err.value)
    config = make_config("nobody-has/this-model")
    with pytest.raises(ModelNotFoundError) as err:
        make_adapter(config)
    message = str(err.value)
    assert "\n" not in message and "nobody-has/this-model" in message and "local" in message


def test_hf_reward_model_scores_the_chosen_logit(classifier_dir):
    responses = [" good and nice", " bad", " very awful but great", ""]
    prompts = ["the movie was", "a pizza is", "the phone was", "it was"]
    reward = build_reward([{"name": "hf_reward_model", "args": {"model": classifier_dir, "batch_size": 3}}])
    scores = reward(responses, prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32

    model = GPT2ForSequenceClassification.from_pretrained(classifier_dir).eval()
    tokenizer = make_tokenizer()
    with torch.no_grad():
        expected = [model(**tokenizer(p + r, return_tensors="pt")).logits[0, 1].item()
                    for r, p in zip(responses, prompts)]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-4)
    negative = build_reward([{"name": "hf_reward_model", "args": {"model": classifier_dir, "label": "neg"}}])
    assert not torch.allclose(negative(responses, prompts), scores)
    only_response = build_reward([{"name": "hf_reward_model",
                                   "args": {"model": classifier_dir, "prompt_format": "{response}"}}])
    assert not torch.allclose(only_response(responses, prompts), scores)
    pair = build_reward([{"name": "hf_reward_model", "args": {"model": classifier_dir, "text_pair": True}}])
    assert torch.allclose(pair(responses, prompts), scores, atol=1e-4)  # this tokenizer joins a pair plainly
    with pytest.raises(ValueError, match="label"):
        build_reward([{"name": "hf_reward_model", "args": {"model": classifier_dir, "label": "maybe"}}])


def test_word_count_and_filters():
    responses = ["Good, good! not goodness", "bad # good", "nothing"]
    prompts = ["p"] * 3
    count = build_reward([{"name": "word_count", "args": {"words": ["good"]}}])
    assert count(responses, prompts).tolist() == [2.0, 1.0, 0.0]
    exact = build_reward([{"name": "word_count", "args": {"words": "good", "case_sensitive": True}}])
    assert exact(responses, prompts).tolist() == [1.0, 1.0, 0.0]

    dropped = build_reward([{"name": "word_count", "args": {"words": "good", "filter": {"drop_containing": ["#"]}}}])
    assert dropped(responses, prompts).tolist() == [2.0, FILTERED_SCORE, 0.0]

    module = types.ModuleType("raft_test_text_filters")
    module.short_only = lambda responses, prompts: [len(r) < 12 for r in responses]
    module.length = lambda responses, prompts: [float(len(r)) for r in responses]
    sys.modules[module.__name__] = module
    try:
        wrapped = build_reward([{"name": "filtered", "args": {
            "reward": {"target": "raft_test_text_filters:length"},
            "filter": "raft_test_text_filters:short_only",
            "filtered_score": -5.0,
        }}])
        assert wrapped(responses, prompts).tolist() == [-5.0, 10.0, 7.0]
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(ValueError, match="filter"):
        build_reward([{"name": "word_count", "args": {"words": "good", "filter": {"keep_only": ["x"]}}}])


def test_distinct_n():
    assert distinct_n(["a b c", "a b d"], n=2) == pytest.approx(3 / 4)
    assert distinct_n(["a a a a"], n=1) == pytest.approx(1 / 4)
    assert distinct_n(["one"], n=2) == 0.0


def test_llm_run_through_the_loop_shows_its_loss(lm_dir, tmp_path, capsys):
    from raft_diffusion.core.loop import format_stage_line
    from raft_diffusion.core.protocols import TRAIN_STATS
    from raft_diffusion.recipe import train

    config = make_config(lm_dir, run={"output_dir": str(tmp_path), "name": "llm", "stages": 2, "save_images": False},
                         prompts={"items": PROMPTS, "eval_items": ["a movie is"]}, eval={"every": 1, "k": 4},
                         log={"tensorboard": False, "report": True},
                         replay={"stages": 1}, guard={"metric": "eval_reward"})  # the loop-level recipe serves text too
    run_dir = train(config)
    records = run_dir.read_metrics()
    trained = [r for r in records if r["stage"] > 0]
    assert len(trained) == 2
    for r in trained:
        assert {f"train_{key}" for key in TRAIN_STATS} <= set(r)  # the same keys as the diffusion adapter's
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert f"loss {r['train_loss']:.4f}" in format_stage_line(r, 2)
    assert "loss " in capsys.readouterr().out  # the stage lines printed during the run
    assert 'alt="loss"' in run_dir.report.read_text()  # the report plots it
    assert (run_dir.final / "adapter_config.json").is_file()
    # save_images: false keeps the held-out texts (eval.k of them per evaluation), which the report shows.
    for stage in range(3):
        held_out = [json.loads(line) for line in (run_dir.stage_dir(stage) / "eval_samples.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in held_out] == ["a movie is"] * 4 and all(isinstance(r["output"], str) for r in held_out)
    assert "Held-out samples" in run_dir.report.read_text()
    assert trained[1]["n_trained_on"] == 2 * trained[0]["n_trained_on"]  # stage 2 also replays stage 1's chosen
    assert (run_dir.checkpoint_dir(2) / "replay.json").is_file()
    assert json.loads((run_dir.root / "outcome.json").read_text())["rule"] == "best eval_reward"
