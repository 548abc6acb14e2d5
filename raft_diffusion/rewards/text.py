"""Text rewards: Hugging Face reward models, a word-count rule, and response filters.

Registered names:

* ``hf_reward_model``: an ``AutoModelForSequenceClassification`` reward model with its own
  tokenizer; the score is one of its logits (default: the single logit of a 1-output reward
  model, the last of a 2-class classifier, or the one named by ``label``). Loaded once, run
  without gradients.
* ``word_count``: how often given words occur in the response (whole words).
* ``filtered``: wraps any other reward (registered or ``module:function``) with a filter.

**Filters.** Every reward here takes ``filter`` (and ``filtered_score``): responses the filter
rejects get the fixed score ``filtered_score`` instead of the reward's, so best-of-K selection
passes them over (RAFT's LLaMA run dropped responses with a character its reward model liked).
``filter`` is either ``"package.module:function"``, a function ``(responses, prompts) -> sequence
of bool`` that returns True for the responses to *keep*, or a built-in, ``{drop_containing:
[substring, ...]}``. ``filtered_score`` defaults to :data:`FILTERED_SCORE` = -1e4: below any real
reward-model logit, yet finite, so means and standard deviations stay numbers (a stage's mean
reward then drops visibly by about 1e4 times the share of rejected responses). A prompt whose K
responses are all rejected still has a best candidate; set ``selection`` so that it is dropped,
or keep K large enough.

Example::

    rewards:
      - name: hf_reward_model
        args: {model: OpenAssistant/reward-model-deberta-v3-large-v2, filter: {drop_containing: ["#"]}}
      - name: filtered
        args: {reward: {target: my_pkg.scores:politeness}, filter: my_pkg.scores:is_english}
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from raft_diffusion.rewards.registry import RewardError, build_reward_fn, import_target, to_scores

FILTERED_SCORE = -1e4


# ---------------------------------------------------------------------------------------------
# Filters


def drop_containing(substrings: Sequence[str]) -> Callable[[list, list], list[bool]]:
    """Built-in filter: reject responses that contain any of ``substrings``."""
    if isinstance(substrings, str):
        substrings = [substrings]
    if not substrings or not all(isinstance(s, str) and s for s in substrings):
        raise RewardError("filter drop_containing: expected a list of non-empty strings")
    subs = list(substrings)
    return lambda responses, prompts: [not any(s in str(r) for s in subs) for r in responses]


BUILTIN_FILTERS = {"drop_containing": drop_containing}


def build_filter(spec) -> Callable[[list, list], Sequence[bool]] | None:
    """``None``, ``"module:function"`` or ``{builtin_name: argument}`` -> a keep-mask function."""
    if spec is None:
        return None
    if isinstance(spec, str) and ":" in spec:
        fn = import_target(spec)
        if not callable(fn):
            raise RewardError(f"filter {spec!r} is not callable")
        return fn
    if isinstance(spec, dict) and len(spec) == 1:
        name, argument = next(iter(spec.items()))
        if name in BUILTIN_FILTERS:
            return BUILTIN_FILTERS[name](argument)
    raise RewardError(f"filter {spec!r}: expected 'package.module:function' or one of "
                      f"{', '.join('{' + n + ': [...]}' for n in BUILTIN_FILTERS)}")


class FilteredReward:
    """Scores the responses ``keep`` accepts with ``reward``; the others get ``filtered_score``."""

    def __init__(self, reward: Callable, keep: Callable, filtered_score: float = FILTERED_SCORE, name: str = "reward"):
        self.reward, self.keep, self.name = reward, keep, name
        self.filtered_score = float(filtered_score)

    def load(self) -> None:
        """Load the wrapped reward's model now, if it loads one (see ``train.load_reward_models``)."""
        if callable(getattr(self.reward, "load", None)):
            self.reward.load()

    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        mask = [bool(k) for k in self.keep(outputs, prompts)]
        if len(mask) != len(outputs):
            raise RewardError(f"filter of {self.name!r} returned {len(mask)} values for {len(outputs)} responses")
        scores = torch.full((len(outputs),), self.filtered_score, dtype=torch.float32)
        kept = [i for i, k in enumerate(mask) if k]
        if kept:
            values = self.reward([outputs[i] for i in kept], [prompts[i] for i in kept])
            scores[kept] = to_scores(values, len(kept), self.name)
        return scores


def with_filter(reward: Callable, filter=None, filtered_score: float = FILTERED_SCORE, name: str = "reward"):
    keep = build_filter(filter)
    return reward if keep is None else FilteredReward(reward, keep, filtered_score, name)


def filtered(reward: dict, filter, filtered_score: float = FILTERED_SCORE, device: str | None = None):
    """Any reward spec (``{name: ..., args: ...}`` or ``{target: "module:function"}``) behind a filter."""
    if not isinstance(reward, dict):
        raise RewardError("reward 'filtered': args.reward must be a reward spec {name: ..., args: {...}}")
    label, fn = build_reward_fn(reward, device)
    return with_filter(fn, filter, filtered_score, label)


# ---------------------------------------------------------------------------------------------
# Rewards


class HFRewardModel:
    """A sequence-classification reward model scoring ``prompt_format.format(prompt=..., response=...)``."""

    def __init__(self, model: str, label=None, batch_size: int = 16, max_length: int = 512,
                 chat_template: bool = False, prompt_format: str = "{prompt}{response}", text_pair: bool = False,
                 dtype: str = "float32", device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from raft_diffusion.hub import load_pretrained

        if dtype not in ("float32", "float16", "bfloat16"):
            raise RewardError(f"hf_reward_model: dtype must be float32, float16 or bfloat16, got {dtype!r}")
        try:
            prompt_format.format(prompt="", response="")
        except (KeyError, IndexError, ValueError):
            raise RewardError(
                f"hf_reward_model: prompt_format {prompt_format!r} may use only {{prompt}} and {{response}}"
            ) from None
        self.device = torch.device(device or "cpu")
        self.tokenizer = load_pretrained(AutoTokenizer, model, "hf_reward_model args.model")
        self.model = load_pretrained(AutoModelForSequenceClassification, model, "hf_reward_model args.model",
                                     dtype=getattr(torch, dtype))
        self.model.to(self.device).eval().requires_grad_(False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # GPT-style classifiers find the last token through it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if chat_template and text_pair:
            raise RewardError("hf_reward_model: use either chat_template or text_pair, not both")
        if chat_template and not self.tokenizer.chat_template:
            raise RewardError(f"hf_reward_model: chat_template is true but {model!r} has no chat template")
        self.index = self._label_index(label)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.chat_template, self.prompt_format, self.text_pair = chat_template, prompt_format, text_pair

    def _label_index(self, label) -> int:
        n = self.model.config.num_labels
        if label is None:
            if n > 2:
                raise RewardError(f"hf_reward_model: the model has {n} labels "
                                  f"({', '.join(map(str, self.model.config.id2label.values()))}); pass args.label")
            return n - 1
        if isinstance(label, str):
            names = self.model.config.label2id
            if label not in names:
                raise RewardError(f"hf_reward_model: label {label!r} is not one of {', '.join(map(str, names))}")
            return int(names[label])
        if not isinstance(label, int) or not -n <= label < n:
            raise RewardError(f"hf_reward_model: label index {label!r} out of range for {n} outputs")
        return label % n

    def _texts(self, responses: list, prompts: list[str]) -> list[str]:
        if self.chat_template:
            return [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": str(r)}], tokenize=False)
                for r, p in zip(responses, prompts)]
        return [self.prompt_format.format(prompt=p, response=r) for r, p in zip(responses, prompts)]

    @torch.no_grad()
    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        if self.text_pair:  # question and answer as the tokenizer's two segments (BERT/DeBERTa reward models)
            firsts, seconds = list(prompts), [str(o) for o in outputs]
        else:
            firsts, seconds = self._texts(outputs, prompts), None
        scores = []
        for start in range(0, len(firsts), self.batch_size):
            end = start + self.batch_size
            enc = self.tokenizer(firsts[start:end], seconds[start:end] if seconds else None, padding=True,
                                 truncation=True, max_length=self.max_length, add_special_tokens=not self.chat_template,
                                 return_tensors="pt").to(self.device)
            scores.append(self.model(**enc).logits[:, self.index].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def hf_reward_model(model: str, label=None, batch_size: int = 16, max_length: int = 512, chat_template: bool = False,
                    prompt_format: str = "{prompt}{response}", text_pair: bool = False, dtype: str = "float32",
                    device: str | None = None, filter=None, filtered_score: float = FILTERED_SCORE):
    """Hugging Face sequence-classification reward model (``model``: hub id, folder, or ``demo:sentiment``).

    The text scored is ``prompt_format`` filled with the prompt and the response, or the reward
    tokenizer's chat template over a user/assistant exchange (``chat_template``), or the pair
    (prompt, response) as two segments (``text_pair``, e.g. OpenAssistant's DeBERTa reward models).
    ``label``: the logit used as score, by index or name (default: the only one, or the last of two).
    """
    reward = HFRewardModel(model, label, batch_size, max_length, chat_template, prompt_format, text_pair, dtype, device)
    return with_filter(reward, filter, filtered_score, "hf_reward_model")


def word_count(words, case_sensitive: bool = False, filter=None, filtered_score: float = FILTERED_SCORE):
    """Occurrences of ``words`` (a word or a list) as whole words in each response."""
    words = [words] if isinstance(words, str) else list(words or [])
    if not words or not all(isinstance(w, str) and w for w in words):
        raise RewardError("word_count: args.words must be a word or a list of non-empty words")
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", 0 if case_sensitive else re.IGNORECASE)

    def count(outputs: list, prompts: list[str]) -> list[float]:
        return [float(len(pattern.findall(str(o)))) for o in outputs]

    return with_filter(count, filter, filtered_score, "word_count")
