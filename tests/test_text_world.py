"""The text demo world: corpus determinism, prompt splits, gold sentiment scorer."""

import re

import numpy as np

from raft_diffusion.demo import text_world as w
from raft_diffusion.rewards import build_reward


def test_corpus_is_deterministic_and_mixed():
    assert w.sample_reviews(50, seed=3) == w.sample_reviews(50, seed=3)
    assert w.sample_reviews(50, seed=3) != w.sample_reviews(50, seed=4)
    reviews = w.sample_reviews(2000, seed=0)
    openings = w.all_prompts()
    assert all(any(r.startswith(o + " ") for o in openings) for r in reviews)
    gold = w.gold_sentiment(reviews)
    # Mixed sentiment: plenty of positive and of negative reviews, so there is something to align.
    assert 0.3 < (gold > 0).mean() < 0.7 and 0.3 < (gold < 0).mean() < 0.7
    vocabulary = set(w.vocabulary())
    assert {word for r in reviews for word in re.findall(r"[a-z]+", r.lower())} <= vocabulary


def test_prompt_splits_are_disjoint_and_cover_every_subject():
    train, held_out = w.train_prompts(), w.eval_prompts()
    assert len(train) == 78 and len(held_out) == 26 and not set(train) & set(held_out)
    assert len(set(train)) == len(train) and train == w.train_prompts()
    for subjects in w.SUBJECTS.values():
        for subject in subjects:
            assert any(f" {subject} " in f" {p} " for p in train)
            assert any(f" {subject} " in f" {p} " for p in held_out)
    assert not (set(w.gold_sentiment(train + held_out)) - {0.0})  # prompts carry no sentiment themselves


def test_gold_sentiment_signs():
    scores = w.gold_sentiment([
        " absolutely delicious and the staff was friendly. I loved it.",
        " bland, but the price was great.",
        " awful. Avoid it.",
        " GREAT",
        " goodness knows. It arrived on time.",
        "",
    ])
    assert scores.tolist() == [3.0, 0.0, -2.0, 1.0, 0.0, 0.0]
    assert not w.POSITIVE_WORDS & w.NEGATIVE_WORDS


def test_labelled_reviews_are_noisy_gold_labels():
    labelled = w.labelled_reviews(2000, seed=5)
    assert labelled == w.labelled_reviews(2000, seed=5) and len(labelled) == 2000
    texts, labels = zip(*labelled)
    gold, labels = w.gold_sentiment(texts), np.array(labels)
    # The label is 1 with probability sigmoid(gold): mostly the gold sign, graded by its size.
    assert labels[gold >= 2].mean() > 0.85 and labels[gold <= -2].mean() < 0.15
    assert 0.3 < labels[gold == 0].mean() < 0.7
    assert labels[gold == 1].mean() > labels[gold == 0].mean() > labels[gold == -1].mean()


def test_gold_is_a_registered_reward_that_scores_the_response():
    gold = build_reward([{"name": "demo_gold_sentiment"}])
    scores = gold([" great and tasty.", " dull."], ["The pizza was", "This movie is"])
    assert scores.tolist() == [2.0, -1.0]
