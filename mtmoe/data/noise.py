"""mBART-style noise for denoising (DAE) examples: text infilling and sentence permutation.

Works on token ids of one sentence. Text infilling masks about `mask_ratio` of the tokens in spans
whose lengths are drawn from Poisson(`poisson_lambda`); each span becomes a single `<mask>` (a span
of length 0 inserts one), so the model must also predict how many tokens are missing. Sentence
permutation shuffles the sentences of a line (split after sentence-final pieces).
"""

from __future__ import annotations

import numpy as np


def permute_sentences(ids: np.ndarray, is_sentence_end: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`ids` [L] with its sentences (ending where `is_sentence_end[id]`) in random order."""
    ends = np.flatnonzero(is_sentence_end[ids]) + 1
    bounds = [0, *[int(e) for e in ends if e < len(ids)], len(ids)]
    pieces = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(pieces) < 2:
        return ids
    return np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])


def infill_spans(ids: np.ndarray, mask_id: int, rng: np.random.Generator, mask_ratio: float = 0.35,
                 poisson_lambda: float = 3.5) -> np.ndarray:
    """`ids` [L] -> noised [L'] (L' <= L + 1): spans replaced by one `mask_id` each."""
    n = len(ids)
    budget = int(round(n * mask_ratio))
    if n == 0 or budget == 0:
        return ids.copy()
    masked = np.zeros(n, dtype=bool)
    span_starts: list[int] = []
    insertions: list[int] = []
    while budget > 0:
        length = min(int(rng.poisson(poisson_lambda)), budget)
        start = int(rng.integers(0, n - length + 1))
        if length == 0:
            insertions.append(start)
            budget -= 1  # an inserted mask counts against the budget, or a lambda ~0 would loop
            continue
        if masked[start:start + length].any():
            budget -= 1  # overlapping draw: give up a token of budget so the loop always ends
            continue
        masked[start:start + length] = True
        span_starts.append(start)
        budget -= length
    out: list[int] = []
    starts = set(span_starts)
    inserts = set(insertions)
    for i in range(n):
        if i in inserts:
            out.append(mask_id)
        if masked[i]:
            if i in starts:
                out.append(mask_id)
            continue
        out.append(int(ids[i]))
    return np.asarray(out, dtype=ids.dtype)
