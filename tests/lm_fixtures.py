"""A tiny GPT-2 (and a GPT-2 sequence classifier) with a word-level tokenizer, built from config in a
second, saved as ordinary Hugging Face folders: what the LLM tests load instead of a hub model."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

WORDS = "the a movie pizza phone was is and but good bad great awful nice dull it i liked hated very".split()
PROMPTS = ["the movie was", "a pizza is", "the phone was"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_config(tokenizer, **extra) -> GPT2Config:
    return GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                      initializer_range=0.2, eos_token_id=0, bos_token_id=0, pad_token_id=1, **extra)


def build_tiny_lm(path: str | Path, dropout: float = 0.1) -> str:
    """``dropout``: GPT-2's own (embeddings, attention, residual); 0 makes training deterministic."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(tokenizer, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_tiny_classifier(path: str | Path) -> str:
    tokenizer = make_tokenizer()
    torch.manual_seed(1)
    config = tiny_config(tokenizer, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
