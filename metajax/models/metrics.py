"""Scores of generated text against references, computed on the host: chrF and exact match.

The jittable metrics of a model's outputs (accuracy, bits per token or byte) are in
:mod:`metajax.models.losses`, beside the losses they share their terms with.
"""

from __future__ import annotations

import numpy as np


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus-level chrF (sacrebleu ``CHRF()`` defaults: character 6-grams, beta 2), 0..100.

    Corpus-level: n-gram statistics are pooled over all the pairs before the F-score, the
    standard form; averaging sentence-level scores instead would weigh a two-letter name as
    much as a long one and is noisier on names this short.
    """
    from sacrebleu.metrics import CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def exact_match(hypotheses: list[str], references: list[str]) -> float:
    """The fraction of hypotheses identical to their reference."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    return float(np.mean([h == r for h, r in zip(hypotheses, references, strict=True)]))


def text_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """``{"chrf": chrf(...), "exact_match": exact_match(...)}``."""
    return {
        "chrf": chrf(hypotheses, references),
        "exact_match": exact_match(hypotheses, references),
    }
