"""Train the text demo's models on the synthetic review corpus (deterministic, CPU, about a minute).

* ``llm/``: a small GPT-2 language model and its byte-level BPE tokenizer, trained on reviews;
  the policy RAFT aligns (``model.pretrained: demo:llm``).
* ``sentiment/``: a smaller GPT-2 sequence classifier with one output, the log-odds that a
  review is positive, trained on reviews labelled by their gold sentiment sign; the proxy
  reward (``hf_reward_model`` with ``model: demo:sentiment``).

Both folders are ordinary Hugging Face folders (config.json, model.safetensors, tokenizer.json)
that ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` / ``AutoTokenizer`` load.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from raft_diffusion.demo import text_world

EOS, PAD = "<|endoftext|>", "<|pad|>"
VOCAB_SIZE = 768
CONTEXT = 64  # positions: a review is at most ~35 tokens, a RAFT prompt + response well under 64

LM_SHAPE = dict(n_embd=96, n_layer=3, n_head=4)
CLASSIFIER_SHAPE = dict(n_embd=64, n_layer=2, n_head=2)


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on ``texts``, with EOS and PAD tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, model_max_length=CONTEXT
    )


def _gpt2_config(tokenizer, **shape) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **shape,
    )


def _encode(tokenizer, texts: list[str], add_eos: bool) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(x + [tokenizer.eos_token_id] if add_eos else x)[:CONTEXT] for x in ids]


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(model, batches, steps: int, lr: float, generator: torch.Generator, loss_fn) -> float:
    """AdamW with warmup + cosine decay; returns the mean loss of the last 10 % of steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    tail = []
    n = len(batches)
    order = torch.randperm(n, generator=generator)
    for step in range(steps):
        if step and step % n == 0:
            order = torch.randperm(n, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss = loss_fn(model, batches[order[step % n]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    model.eval()
    return sum(tail) / len(tail)


def _lm_loss(model, batch):
    ids, mask = batch
    labels = ids.masked_fill(mask == 0, -100)  # pads are not targets; the EOS closing each review is
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _classifier_loss(model, batch):
    ids, mask, labels = batch
    logit = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    return torch.nn.functional.binary_cross_entropy_with_logits(logit, labels.float())


def _batches(rows, batch_size, pad_id, labels=None):
    out = []
    for start in range(0, len(rows), batch_size):
        ids, mask = _pad(rows[start: start + batch_size], pad_id)
        out.append((ids, mask) if labels is None else (ids, mask, torch.tensor(labels[start: start + batch_size])))
    return out


def _save_atomically(save, final: Path) -> None:
    """Write with ``save(tmp_dir)``, then rename into place (a reader never sees half a folder)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the assets are package data
        for f in tmp.iterdir():
            f.chmod(0o644)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.no_grad()
def _classifier_accuracy(model, batches) -> float:
    right = total = 0
    for ids, mask, labels in batches:
        right += ((model(input_ids=ids, attention_mask=mask).logits[:, 0] > 0) == (labels == 1)).sum().item()
        total += len(labels)
    return right / total


def build_text_assets(out_dir, quick: bool = False, seed: int = 0, threads: int = 2) -> dict:
    """Train and write ``out_dir/llm`` and ``out_dir/sentiment``; returns what was built.

    ``quick`` trains a fraction of the steps (for smoke tests; the models are then weak).
    Deterministic for a given ``seed`` on a given machine; leaves the global RNG untouched.
    ``threads``: torch CPU threads (1 is faster when other jobs already load every core).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(out_dir, quick, seed, start)
    finally:
        torch.set_num_threads(previous_threads)


def _build(out_dir: Path, quick: bool, seed: int, start: float) -> dict:
    lm_steps, classifier_steps = (60, 40) if quick else (600, 300)
    lm_texts = text_world.sample_reviews(4000 if quick else 24000, seed)
    labelled = text_world.labelled_reviews(2000 if quick else 8000, seed + 1)
    held_out = text_world.labelled_reviews(1000, seed + 2)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        tokenizer = build_tokenizer(lm_texts)
        pad = tokenizer.pad_token_id

        lm = GPT2LMHeadModel(_gpt2_config(tokenizer, **LM_SHAPE))
        lm_batches = _batches(_encode(tokenizer, lm_texts, add_eos=True), 64, pad)
        lm_loss = _train(lm, lm_batches, lm_steps, 3e-3, generator, _lm_loss)

        classifier_tokenizer = tokenizer  # the same vocabulary, saved again next to the classifier
        config = _gpt2_config(classifier_tokenizer, **CLASSIFIER_SHAPE)
        # One logit, the log-odds of "positive", like the single-output reward models of RLHF.
        config.num_labels = 1
        config.id2label, config.label2id = {0: "positive"}, {"positive": 0}
        classifier = GPT2ForSequenceClassification(config)
        texts, labels = [t for t, _ in labelled], [y for _, y in labelled]
        cls_batches = _batches(_encode(classifier_tokenizer, texts, add_eos=False), 64, pad, labels)
        cls_loss = _train(classifier, cls_batches, classifier_steps, 3e-3, generator, _classifier_loss)
        eval_batches = _batches(_encode(classifier_tokenizer, [t for t, _ in held_out], add_eos=False), 128, pad,
                                [y for _, y in held_out])
        accuracy = _classifier_accuracy(classifier, eval_batches)

    def save_lm(path):
        lm.save_pretrained(path)
        tokenizer.save_pretrained(path)

    def save_classifier(path):
        classifier.save_pretrained(path)
        classifier_tokenizer.save_pretrained(path)

    _save_atomically(save_lm, out_dir / "llm")
    _save_atomically(save_classifier, out_dir / "sentiment")
    return {
        "llm": {
            "path": str(out_dir / "llm"),
            "parameters": sum(p.numel() for p in lm.parameters()),
            "bytes": _folder_bytes(out_dir / "llm"),
            "train_loss": round(lm_loss, 4),
            "steps": lm_steps,
        },
        "sentiment": {
            "path": str(out_dir / "sentiment"),
            "parameters": sum(p.numel() for p in classifier.parameters()),
            "bytes": _folder_bytes(out_dir / "sentiment"),
            "train_loss": round(cls_loss, 4),
            "held_out_accuracy": round(accuracy, 4),
            "steps": classifier_steps,
        },
        "seed": seed,
        "quick": quick,
        "seconds": round(time.perf_counter() - start, 1),
    }
