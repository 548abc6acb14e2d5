"""The text demo world: short product, food and film reviews of mixed sentiment, and a gold scorer.

A review is an *opening* (e.g. ``"The pizza was"``, ``"I watched this movie and"``) and a
continuation built from templates and word lists: a main verdict, an optional remark on one
aspect (``"the service was slow"``) joined by *and* when it agrees with the verdict and *but*
when it does not, and an optional closing sentence. Each review draws a hidden polarity ``q``
(mostly near 0 or 1, sometimes in between); every sentiment slot is positive with probability
``q``. So the corpus, and a language model trained on it, writes positive, negative and mixed
reviews; RAFT's job is to make it write positive ones.

The openings are the prompts: every (opening, subject) pair of a category. One opening per
subject, rotating, is held out for evaluation, so eval prompts are word combinations the RAFT
loop never trains on (every subject and opening still appears in both splits).

:func:`gold_sentiment` is the number of positive words minus the number of negative words in a
text (lower-cased words matched against :data:`POSITIVE_WORDS` / :data:`NEGATIVE_WORDS`; the
corpus contains no negations, so a word means what it says). It scores the response alone and
is never shown to RAFT: the loop reports it next to the proxy reward (a small sentiment
classifier trained on labelled reviews of this corpus, see ``scripts/demo/build_text.py``).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Sequence

import numpy as np


SUBJECTS: dict[str, tuple[str, ...]] = {
    "food": ("pizza", "burger", "pasta", "soup", "salad", "sushi", "curry", "steak", "coffee", "cake"),
    "film": ("movie", "film", "show", "series", "documentary", "sequel", "cartoon", "thriller"),
    "product": ("phone", "laptop", "camera", "blender", "chair", "jacket", "backpack", "kettle"),
}

# (template, kind): "adj" openings end in a copula and continue with a verdict ("great and fresh"),
# "clause" openings end in "and" and continue with a clause ("it was great", "I loved it").
OPENINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "food": (("The {} was", "adj"), ("We ordered the {} and it was", "adj"), ("I tried the {} and", "clause"),
             ("Their {} is", "adj")),
    "film": (("I watched this {} and", "clause"), ("The {} was", "adj"), ("We saw the {} and it was", "adj"),
             ("This {} is", "adj")),
    "product": (("My new {} is", "adj"), ("I bought this {} and", "clause"), ("The {} was", "adj"),
                ("This {} is", "adj")),
}

ASPECTS: dict[str, tuple[str, ...]] = {
    "food": ("service", "staff", "sauce", "portion", "price", "dessert", "waiter", "place"),
    "film": ("acting", "story", "soundtrack", "ending", "dialogue", "cast", "pacing", "camera work"),
    "product": ("battery", "screen", "sound", "price", "design", "delivery", "manual", "packaging"),
}

_POSITIVE_ADJ = ("great", "good", "excellent", "wonderful", "amazing", "lovely", "perfect", "fantastic",
                 "brilliant", "superb", "pleasant", "nice")
_NEGATIVE_ADJ = ("bad", "terrible", "awful", "horrible", "boring", "dull", "disappointing", "poor",
                 "mediocre", "dreadful", "annoying", "weak")
_CATEGORY_ADJ: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "food": (("delicious", "tasty", "fresh", "friendly"), ("bland", "stale", "greasy", "rude")),
    "film": (("gripping", "moving", "funny", "clever"), ("predictable", "confusing", "tedious", "silly")),
    "product": (("sturdy", "reliable", "fast", "elegant"), ("flimsy", "broken", "slow", "ugly")),
}
_POSITIVE_CLOSERS = ("I loved it.", "I would recommend it.", "I really enjoyed it.", "It was worth every penny.",
                     "Highly recommended.", "We will happily come back.", "I love it.")
_NEGATIVE_CLOSERS = ("I hated it.", "I regret it.", "Avoid it.", "It was a waste of money.",
                     "I want a refund.", "Never again.", "I hate it.")
_NEUTRAL_CLOSERS = ("It arrived on time.", "I went there with friends.", "We watched it on Sunday.",
                    "That is all.", "Just my opinion.")
_INTENSIFIERS = ("", "", "", "really ", "very ", "quite ", "so ", "absolutely ", "pretty ")

# Gold lexicon: every sentiment-bearing word the corpus uses (no negations occur in it).
POSITIVE_WORDS: frozenset[str] = frozenset(
    _POSITIVE_ADJ + tuple(w for pos, _ in _CATEGORY_ADJ.values() for w in pos)
    + ("love", "loved", "recommend", "recommended", "enjoyed", "worth", "happily")
)
NEGATIVE_WORDS: frozenset[str] = frozenset(
    _NEGATIVE_ADJ + tuple(w for _, neg in _CATEGORY_ADJ.values() for w in neg)
    + ("hate", "hated", "regret", "avoid", "waste", "refund", "never")
)
_WORD = re.compile(r"[a-z]+")


# ---------------------------------------------------------------------------------------------
# Prompts


@lru_cache(maxsize=None)
def _splits() -> tuple[tuple[tuple[str, str, str], ...], tuple[tuple[str, str, str], ...]]:
    """All (category, opening template, subject), split into train and held-out eval.

    For every subject one opening is held out, rotating over the openings of its category."""
    train, held_out = [], []
    for category, subjects in SUBJECTS.items():
        openings = OPENINGS[category]
        for i, subject in enumerate(subjects):
            for j, (template, _) in enumerate(openings):
                (held_out if j == i % len(openings) else train).append((category, template, subject))
    return tuple(train), tuple(held_out)


def train_prompts() -> list[str]:
    """Review openings the RAFT loop may train on (78)."""
    return [template.format(subject) for _, template, subject in _splits()[0]]


def eval_prompts() -> list[str]:
    """Held-out review openings (26): (opening, subject) pairs absent from the training prompts."""
    return [template.format(subject) for _, template, subject in _splits()[1]]


def all_prompts() -> list[str]:
    return train_prompts() + eval_prompts()


# ---------------------------------------------------------------------------------------------
# Corpus


def _adjective(rng: random.Random, category: str, positive: bool) -> str:
    general = _POSITIVE_ADJ if positive else _NEGATIVE_ADJ
    special = _CATEGORY_ADJ[category][0 if positive else 1]
    return rng.choice(special) if rng.random() < 0.4 else rng.choice(general)


def _continuation(rng: random.Random, category: str, kind: str, q: float) -> str:
    """A review continuation whose sentiment slots are each positive with probability ``q``."""
    main = rng.random() < q
    verdict = rng.choice(_INTENSIFIERS) + _adjective(rng, category, main)
    if rng.random() < 0.3:
        second = _adjective(rng, category, main)
        if not verdict.endswith(second):
            verdict += " and " + second
    if kind == "clause":
        shape = rng.random()
        if shape < 0.35:
            text = ("I loved it" if main else "I hated it") if rng.random() < 0.5 else \
                   ("I enjoyed it" if main else "I regret it")
        else:
            text = f"it was {verdict}"
    else:
        text = verdict
    shape = rng.random()
    if shape < 0.6:  # a remark on one aspect, agreeing or not with the verdict
        side = rng.random() < q
        remark = f"the {rng.choice(ASPECTS[category])} was {rng.choice(_INTENSIFIERS)}{_adjective(rng, category, side)}"
        text += (" and " if side == main else ", but ") + remark
    text += "."
    shape = rng.random()
    if shape < 0.55:
        closers = _POSITIVE_CLOSERS if rng.random() < q else _NEGATIVE_CLOSERS
        text += " " + rng.choice(closers)
    elif shape < 0.7:
        text += " " + rng.choice(_NEUTRAL_CLOSERS)
    return text


def _polarity(rng: random.Random) -> float:
    """Hidden review polarity: mostly clear-cut, sometimes mixed."""
    return rng.choice((0.05, 0.1, 0.9, 0.95, 0.5, rng.random()))


def sample_reviews(n: int, seed: int, split: str = "all") -> list[str]:
    """``n`` reviews (opening + continuation), deterministic in ``seed``; ``split``: train, eval or all."""
    train, held_out = _splits()
    combos = {"train": train, "eval": held_out, "all": train + held_out}.get(split)
    if combos is None:
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    kinds = {(c, t): k for c, opens in OPENINGS.items() for t, k in opens}
    rng = random.Random(seed)
    reviews = []
    for _ in range(n):
        category, template, subject = rng.choice(combos)
        q = _polarity(rng)
        reviews.append(template.format(subject) + " " + _continuation(rng, category, kinds[category, template], q))
    return reviews


def labelled_reviews(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` reviews with a noisy annotator's label: 1 (positive) with probability ``sigmoid(gold)``.

    Like human preference labels, one label says little about a borderline review; a classifier
    trained on many of them learns log-odds close to the gold score, hence a graded proxy reward."""
    texts = sample_reviews(n, seed)
    rng = random.Random(seed + 7919)
    return [(t, int(rng.random() < 1 / (1 + np.exp(-g)))) for t, g in zip(texts, gold_sentiment(texts))]


def vocabulary() -> list[str]:
    """Every word a review can contain (lower-cased)."""
    texts = [template.format(s) for c, opens in OPENINGS.items() for template, _ in opens for s in SUBJECTS[c]]
    texts += list(_POSITIVE_CLOSERS + _NEGATIVE_CLOSERS + _NEUTRAL_CLOSERS + _INTENSIFIERS)
    texts += [" ".join(a) for a in ASPECTS.values()] + ["it was and but the"]
    words = set(POSITIVE_WORDS | NEGATIVE_WORDS)
    for text in texts:
        words.update(_WORD.findall(text.lower()))
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Gold scorer


def gold_sentiment(texts: Sequence[str]) -> np.ndarray:
    """Positive minus negative words per text (see the module docstring)."""
    scores = []
    for text in texts:
        words = _WORD.findall(str(text).lower())
        scores.append(sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words))
    return np.asarray(scores, dtype=np.float64)


def demo_gold_sentiment():
    """Gold sentiment of each response (positive minus negative words); an eval metric of the demo."""

    def score(outputs: list, prompts: list[str]) -> np.ndarray:
        return gold_sentiment(outputs).astype(np.float32)

    return score
