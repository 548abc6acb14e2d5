"""Causal language models for RAFT: K sampled responses per prompt, masked SFT on the chosen ones.

Any ``transformers`` ``AutoModelForCausalLM`` (a hub id, a local folder, or ``demo:llm``), trained
either through a peft LoRA (``model.lora.rank > 0``) or in full (``rank: 0``).

* **Sampling** runs ``model.generate`` on left-padded batches of ``sampling.batch_size``
  sequences. Each candidate draws its tokens from its own ``torch.Generator`` seeded with its
  seed (a logits processor samples, greedy decoding then takes the sampled token), so a
  candidate depends on its seed alone, not on the batch it shared, and the global RNG that
  training uses is never touched. Temperature (the paper's lambda), top-k and top-p are
  transformers' own logits warpers. A response ends at EOS (kept in its token ids, so that
  fine-tuning learns to stop) or at a ``llm.stop`` string (cut from its text).
* **Fine-tuning** is supervised next-token loss on prompt + response with the prompt tokens
  masked out (``llm.train_on_prompt`` keeps them), AdamW through ``accelerate``.
* **log_ratio** is ``log p(response | prompt)`` under the policy minus under the frozen
  reference (the base model: LoRA disabled, or the pretrained weights reloaded for full
  fine-tuning), for KL-shaped ranking.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from raft_diffusion.adapters.training import Finetuner, check_lora_targets
from raft_diffusion.core import progress
from raft_diffusion.core.config import ConfigError
from raft_diffusion.core.prompts import PromptError
from raft_diffusion.core.protocols import Candidate
from raft_diffusion.assets import resolve
from raft_diffusion.hub import ModelNotFoundError, load_pretrained  # noqa: F401  (errors re-exported for callers)

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the positions whose label is not ``IGNORE_INDEX`` (their mean,
    or with ``reduction="sum"`` their sum)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def _loss_tokens(candidate: Candidate, train_on_prompt: bool) -> int:
    """How many next-token targets of ``candidate`` carry loss in :func:`sft_batch` (the first token predicts nothing)."""
    n, m = len(candidate.payload["prompt_ids"]), len(candidate.payload["response_ids"])
    return n + m - 1 if train_on_prompt else m


def sft_batch(candidates: list[Candidate], pad_id: int, train_on_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for prompt + response.

    Labels are the input ids on response tokens and ``IGNORE_INDEX`` on prompt tokens (unless
    ``train_on_prompt``) and padding. Right padding keeps the default position ids right.
    """
    rows = [(c.payload["prompt_ids"], c.payload["response_ids"]) for c in candidates]
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        n, m = len(prompt), len(response)
        input_ids[i, :n] = prompt
        input_ids[i, n: n + m] = response
        attention_mask[i, : n + m] = 1
        labels[i, n: n + m] = response
        if train_on_prompt:
            labels[i, :n] = prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SeededSampling(LogitsProcessor):
    """Samples row ``i``'s next token from its own generator and returns scores whose argmax is it.

    Used with greedy decoding: ``model.generate`` then emits exactly the sampled token. The
    token is drawn by inverting the CDF of the warped distribution with one uniform per row and
    step, so a row's tokens depend only on its seed and its own logits.
    """

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        warpers = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = self.warpers(input_ids, scores.float())
        probs = scores.softmax(-1).double()
        cdf = probs.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators]).to(scores.device)
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp_(max=cdf.shape[-1] - 1)
        # Rounding at the top of the CDF could land on a zero-probability tail token: take the last live one.
        last_live = (probs > 0).cumsum(-1).argmax(-1, keepdim=True)
        token = torch.where(probs.gather(-1, token) > 0, token, last_live)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def _peft_default_targets(model) -> list[str] | str:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(model.config, "model_type", None))
    return known if known else "all-linear"


def _targets_are_conv1d(model, targets) -> bool:
    """GPT-2 style models store linear layers transposed (transformers' Conv1D); peft must know."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(targets, str):
        return False
    return any(isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets
               for name, module in model.named_modules())


@dataclass
class LLMSettings:
    """The ``llm:`` config section: settings of the causal-language-model adapter."""

    # Sampling
    temperature: float = 1.0  # the paper's lambda
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings; the response is cut before them
    # Loading
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template
    trust_remote_code: bool = False  # only when you trust the model repository
    # Fine-tuning
    train_on_prompt: bool = False  # also put loss on prompt tokens (LMFlow's RAFT does)

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ConfigError(message)

        check(self.temperature > 0, f"llm.temperature must be > 0, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"llm.top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, f"llm.top_k must be >= 0, got {self.top_k}")
        check(self.max_new_tokens >= 1, f"llm.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(0 <= self.min_new_tokens <= self.max_new_tokens, "llm.min_new_tokens must be in [0, max_new_tokens]")


class LLMAdapter:
    """RAFT adapter for causal language models (see the module docstring)."""

    config_section = "llm"  # the config section of these settings
    Settings = LLMSettings

    def __init__(self, config, accelerator):
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        m = config.model
        self.settings = config.adapter if isinstance(config.adapter, LLMSettings) else LLMSettings()
        self.full_finetune = m.lora.rank == 0 and not m.init_lora
        self.tokenizer = load_pretrained(
            AutoTokenizer, m.pretrained, "model.pretrained", revision=m.revision, trust_remote_code=self.settings.trust_remote_code
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # labels come from lengths, so pad == eos is safe
        if self.settings.chat_template and not self.tokenizer.chat_template:
            raise ConfigError(f"llm.chat_template is true but the tokenizer of {m.pretrained!r} has no chat template")
        self.dtype = self._weights_dtype()
        model = self._load_base()
        self.eos_ids = self._eos_ids(model)
        if config.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = self._add_lora(model)
        self._reference_model = None  # full fine-tuning: the pretrained weights, loaded on first log_ratio

        # AdamW, the batch order (its own seeded generator) and checkpoints: the shared scaffold.
        self.finetuner = Finetuner(accelerator, {"model": model}, config, config.run.seed, device_placement=True)
        self.train_model = self.finetuner.models[0]  # DDP-wrapped when distributed
        self.model = accelerator.unwrap_model(self.train_model)
        self.model.eval()

    # -- construction ---------------------------------------------------------------------------

    def _weights_dtype(self) -> torch.dtype:
        m = self.config.model
        if m.dtype != "auto":
            dtype = getattr(torch, m.dtype)
            if self.full_finetune and dtype == torch.float16:
                raise ConfigError("model.dtype float16 cannot be trained in full (lora.rank 0): use bfloat16, "
                                 "or float32 with train.mixed_precision fp16")
            return dtype
        if self.device.type == "cuda" and not self.full_finetune:  # frozen base weights: half precision
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    def _load_base(self):
        m = self.config.model
        model = load_pretrained(
            AutoModelForCausalLM, m.pretrained, "model.pretrained",
            revision=m.revision, variant=m.variant, dtype=self.dtype, trust_remote_code=self.settings.trust_remote_code,
        )
        return model.to(self.device)

    def _eos_ids(self, model) -> list[int]:
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not ids:
            raise ConfigError(f"model.pretrained: {self.config.model.pretrained!r} defines no EOS token")
        return ids

    def _add_lora(self, model):
        m = self.config.model
        if self.full_finetune:
            return model.requires_grad_(True)
        from peft import LoraConfig, PeftModel, get_peft_model

        # LoRA A matrices are random: draw them from the run seed, without moving the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.run.seed)
            if m.init_lora:
                path = resolve(m.init_lora)
                if not Path(path).is_dir():
                    raise ModelNotFoundError(f"model.init_lora: folder {path} does not exist")
                return PeftModel.from_pretrained(model, path, is_trainable=True)
            if m.lora.targets:
                check_lora_targets(model, m.lora.targets, f"the language model {m.pretrained!r}")
            targets = list(m.lora.targets) or _peft_default_targets(model)
            lora = LoraConfig(
                r=m.lora.rank,
                lora_alpha=m.lora.alpha,
                lora_dropout=m.lora.dropout,
                target_modules=targets,
                fan_in_fan_out=_targets_are_conv1d(model, targets),
                task_type="CAUSAL_LM",
            )
            return get_peft_model(model, lora)

    # -- sampling -------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids the model is conditioned on (chat template applied when configured)."""
        if self.settings.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:  # an empty prompt: start from BOS (or EOS, GPT-2's document separator)
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else self.eos_ids[0]]
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and len(ids) + self.settings.max_new_tokens > context:
            raise PromptError(f"prompt of {len(ids)} tokens + llm.max_new_tokens "
                              f"{self.settings.max_new_tokens} exceeds the model's context of {context}")
        return ids

    def _generation_config(self) -> GenerationConfig:
        s = self.settings
        pad = self.tokenizer.pad_token_id
        return GenerationConfig(
            do_sample=False,  # SeededSampling samples; greedy decoding then takes its token
            num_beams=1,
            temperature=1.0,
            top_k=None,
            top_p=1.0,
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens or None,
            stop_strings=list(s.stop) or None,
            eos_token_id=self.eos_ids,
            # Finished rows are filled with EOS, not padding: transformers drops an all-ones attention
            # mask (a batch of equal-length prompts) and then warns about any pad token fed back in.
            pad_token_id=self.eos_ids[0],
            suppress_tokens=None if pad in self.eos_ids else [pad],  # a response never contains padding
            use_cache=True,
        )

    def _split_response(self, tokens: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Cut generated tokens at EOS (kept, so fine-tuning learns to stop), padding or a stop string.

        Returns the response ids and the response text (without EOS and without the stop string)."""
        eos = torch.tensor(self.eos_ids)
        ends = torch.nonzero(torch.isin(tokens, eos) | (tokens == self.tokenizer.pad_token_id)).flatten()
        end = int(ends[0]) if len(ends) else len(tokens)
        body = tokens[:end]
        keep = tokens[: end + 1] if end < len(tokens) and int(tokens[end]) in self.eos_ids else body
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        text = decode(body)
        found = [(text.find(s), s) for s in self.settings.stop if s and s in text]
        if not found:
            return keep.clone(), text
        pos, stop = min(found)
        lo, hi = 1, len(body)  # smallest prefix whose text contains the stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if stop in decode(body[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return body[:lo].clone(), text[:pos]

    @torch.no_grad()
    def generate(self, prompts: list[str], k: int, seeds: list[int]) -> list[Candidate]:
        """``k`` sampled responses per prompt, grouped by prompt; candidate ``i * k + j`` uses ``seeds[i * k + j]``."""
        if len(seeds) != len(prompts) * k:
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts x k={k}")
        with self.finetuner.averaged():
            return self._generate(prompts, k, seeds)

    def _generate(self, prompts: list[str], k: int, seeds: list[int]) -> list[Candidate]:
        s = self.settings
        prompt_ids = [self.encode_prompt(p) for p in prompts]
        jobs = [(i, j) for i in range(len(prompts)) for j in range(k)]
        generation_config = self._generation_config()
        pad = self.tokenizer.pad_token_id
        candidates = []
        self.model.eval()
        batch_size = self.config.sampling.batch_size
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start: start + batch_size]
            rows = [prompt_ids[i] for i, _ in batch]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, ids in enumerate(rows):  # left padding: every prompt ends where generation starts
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                attention_mask[r, width - len(ids):] = 1
            sampler = SeededSampling([seeds[i * k + j] for i, j in batch], s.temperature, s.top_k, s.top_p)
            with self.accelerator.autocast():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    generation_config=generation_config,
                    logits_processor=LogitsProcessorList([sampler]),
                    tokenizer=self.tokenizer if s.stop else None,
                )
            progress.advance(len(batch))
            for (i, j), tokens in zip(batch, out[:, width:].cpu()):
                response_ids, text = self._split_response(tokens)
                candidates.append(Candidate(
                    prompt=prompts[i],
                    seed=seeds[i * k + j],
                    output=text,
                    payload={"prompt_ids": torch.tensor(prompt_ids[i], dtype=torch.long), "response_ids": response_ids},
                    prompt_index=i,
                    k_index=j,
                ))
        return candidates

    # -- training -------------------------------------------------------------------------------

    def finetune(self, chosen: list[Candidate]) -> dict[str, float]:
        """SFT on the chosen responses: ``train.steps_per_stage`` AdamW steps of ``grad_accum``
        micro-batches of ``train.batch_size`` responses per process."""
        if not chosen:
            raise ValueError("finetune: no chosen candidates")
        t = self.config.train
        world = self.accelerator.num_processes

        def micro_batch_loss(idx: torch.Tensor, mine: slice) -> torch.Tensor:
            batch = sft_batch([chosen[i] for i in idx[mine]], self.tokenizer.pad_token_id, self.settings.train_on_prompt)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            logits = self.train_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      use_cache=False).logits
            # Sum over this process's tokens, divided by the tokens of the whole global micro-batch
            # (times the processes, which DDP's gradient mean divides out): every token weighs the
            # same, so N processes train exactly as one process with the N times larger batch.
            total_tokens = int(sum(_loss_tokens(chosen[i], self.settings.train_on_prompt) for i in idx))
            return causal_lm_loss(logits, batch["labels"], reduction="sum") * world / max(total_tokens, 1)

        return self.finetuner.fit(len(chosen), micro_batch_loss)

    # -- KL-shaped ranking ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _reference(self):
        """The frozen reference model: the base model without LoRA, or the pretrained weights."""
        if not self.full_finetune:
            with self.model.disable_adapter():
                yield self.model
            return
        if self._reference_model is None:
            self._reference_model = self._load_base().eval().requires_grad_(False)
        yield self._reference_model

    @torch.no_grad()
    def _response_logprobs(self, model, candidates: list[Candidate]) -> torch.Tensor:
        out = []
        for start in range(0, len(candidates), self.config.sampling.batch_size):
            batch = sft_batch(candidates[start: start + self.config.sampling.batch_size], self.tokenizer.pad_token_id)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            with self.accelerator.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            logits = logits[:, :-1].float()
            # log_softmax at the targets only, without a second vocabulary-sized tensor
            token_logp = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            out.append((token_logp * (targets != IGNORE_INDEX)).sum(-1).cpu())
        return torch.cat(out)

    def log_ratio(self, candidates: list[Candidate]) -> torch.Tensor:
        """``log p(response | prompt)`` under the policy minus under the reference, per candidate (float32 [N])."""
        if not candidates:
            return torch.zeros(0)
        self.model.eval()
        with self.finetuner.averaged():  # the policy that sampled them
            policy = self._response_logprobs(self.model, candidates)
        with self._reference() as reference:
            base = self._response_logprobs(reference, candidates)
        return (policy - base).float()

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, path) -> None:
        """Trainable weights, optimizer (and grad scaler), schedule and every RNG. Call on every process."""
        self.finetuner.save(path)

    def load(self, path) -> None:
        self.finetuner.load(path)

    def export(self, path) -> None:
        """peft adapter folder (LoRA) or full Hugging Face model folder, plus the tokenizer."""
        if self.accelerator.is_main_process:
            path = Path(path)
            path.mkdir(parents=True, exist_ok=True)
            with self.finetuner.averaged():
                self.model.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))
