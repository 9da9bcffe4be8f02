"""Batched beam search against slow references: greedy = step-by-step argmax without a cache, and
batched beam search = one sentence at a time."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from helpers import TINY
from mtmoe.config import MoEConfig
from mtmoe.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from mtmoe.model.generation import beam_search, beam_search_finished, best_hypothesis, translate_ids, translate_ids_per_penalty
from mtmoe.model.seq2seq import build_model
from mtmoe.scoring import score_direction



def random_model(seed=0):
    """A random tiny MoE model with EOS made likelier, so hypotheses end at varied lengths."""
    model = build_model(60, TINY, MoEConfig(num_experts=4, top_k=2), seed=seed).eval()
    with torch.no_grad():
        model.embed.weight[EOS_ID] *= 3.0
    return model


def greedy_reference(model, src: torch.Tensor, max_len: int) -> list[int]:
    """No cache, full re-decode each step: the slow path."""
    memory, keep, _, _ = model.encode(src)
    out = [BOS_ID]
    for step in range(max_len):
        logits, _, _ = model.decode(torch.tensor([out]), memory, keep)
        logp = logits[0, -1].log_softmax(-1)
        logp[[PAD_ID, BOS_ID, UNK_ID]] = float("-inf")
        if step == max_len - 1:
            return out[1:]
        token = int(logp.argmax())
        if token == EOS_ID:
            return out[1:]
        out.append(token)
    return out[1:]


def test_greedy_matches_uncached_reference():
    model = random_model()
    g = torch.Generator().manual_seed(1)
    for length in (3, 6, 9):
        src = torch.cat([torch.randint(4, 60, (1, length), generator=g), torch.tensor([[EOS_ID]])], dim=1)
        max_len = int((length + 1) * 1.5 + 10)  # source length counts its EOS
        with torch.no_grad():
            fast = beam_search(model, src, beam=1)[0]
            slow = greedy_reference(model, src, max_len)
        assert fast == slow


def beam_reference(model, src: torch.Tensor, beam: int, max_len: int, banned=()) -> list[tuple[float, list[int]]]:
    """One sentence, no cache, plain lists: each step re-decodes every live prefix from scratch and
    ranks all (beam, token) candidates by sum log p; of the best 2*beam, those ending in EOS among
    the best `beam` are finalized (once `beam` are, the search ends), the best `beam` others continue."""
    memory, keep, _, _ = model.encode(src)
    beams, finished = [(0.0, [BOS_ID])], []
    for step in range(max_len):
        candidates = []
        for score, tokens in beams:
            logits, _, _ = model.decode(torch.tensor([tokens]), memory, keep)
            logp = logits[0, -1].float().log_softmax(-1)
            logp[[PAD_ID, BOS_ID, UNK_ID, *banned]] = float("-inf")
            if step == max_len - 1:  # the length limit: only EOS
                logp[torch.arange(len(logp)) != EOS_ID] = float("-inf")
            candidates += [(score + float(lp), tokens, v) for v, lp in enumerate(logp.tolist()) if lp > float("-inf")]
        candidates.sort(key=lambda c: -c[0])
        best = candidates[:2 * beam]
        for score, tokens, v in best[:beam]:
            if v == EOS_ID and len(finished) < beam:
                finished.append((score, tokens[1:]))
        if len(finished) >= beam:
            return finished
        beams = [(score, tokens + [v]) for score, tokens, v in best if v != EOS_ID][:beam]
    return finished


def test_beam_search_matches_uncached_reference():
    """Beams 2-5 on a batch of sentences: every sentence's finalized hypotheses (in the order they
    finished) equal the one-sentence uncached search's, the scores to float rounding."""
    model = random_model(seed=2)
    g = torch.Generator().manual_seed(2)
    lengths = (2, 5, 8, 3)
    srcs = [torch.cat([torch.randint(4, 60, (length,), generator=g), torch.tensor([EOS_ID])]) for length in lengths]
    batch = torch.nn.utils.rnn.pad_sequence(srcs, batch_first=True, padding_value=PAD_ID)
    for beam in (2, 3, 5):
        with torch.no_grad():
            fast = beam_search_finished(model, batch, beam=beam, max_len_a=1.0, max_len_b=4)
            for src, got in zip(srcs, fast):
                slow = beam_reference(model, src[None], beam, max_len=len(src) + 4)
                assert [tokens for _, tokens in got] == [tokens for _, tokens in slow]
                np.testing.assert_allclose([s for s, _ in got], [s for s, _ in slow], rtol=1e-5)
    assert any(len(set(map(len, (t for _, t in f)))) > 1 for f in fast)  # hypotheses of varied lengths


def test_banned_tokens_are_never_produced():
    """`banned_ids` (a vocabulary's language tags and <mask>) leave every hypothesis: the tokens the
    unbanned search produces most are banned, and the search equals the reference with the same ban."""
    model = random_model(seed=3)
    g = torch.Generator().manual_seed(3)
    srcs = [torch.cat([torch.randint(4, 60, (length,), generator=g), torch.tensor([EOS_ID])]) for length in (4, 7)]
    batch = torch.nn.utils.rnn.pad_sequence(srcs, batch_first=True, padding_value=PAD_ID)
    with torch.no_grad():
        free = beam_search_finished(model, batch, beam=3, max_len_a=1.0, max_len_b=4)
        produced = np.bincount([t for f in free for _, tokens in f for t in tokens], minlength=60)
        banned = [int(t) for t in np.argsort(-produced)[:3] if produced[t]]
        assert banned  # the unbanned search produced them
        fast = beam_search_finished(model, batch, beam=3, max_len_a=1.0, max_len_b=4, banned_ids=banned)
        for src, got in zip(srcs, fast):
            assert not {t for _, tokens in got for t in tokens} & set(banned)
            slow = beam_reference(model, src[None], 3, max_len=len(src) + 4, banned=banned)
            assert [tokens for _, tokens in got] == [tokens for _, tokens in slow]


def test_batched_beam_equals_one_at_a_time():
    model = random_model(seed=3)
    rng = np.random.default_rng(0)
    sentences = [rng.integers(4, 60, size=n) for n in (2, 7, 4, 11, 5)]
    batched = translate_ids(model, sentences, tag_id=4, beam=4, max_tokens=4096)
    single = [translate_ids(model, [s], tag_id=4, beam=4)[0] for s in sentences]
    assert batched == single
    assert all(EOS_ID not in hyp for hyp in batched)


def test_directions_decoded_together_equal_each_decoded_alone():
    """Validation decodes every direction's sentences in shared batches (a tag per sentence): each
    translation is the one its direction decoded alone gives (the slow path), greedy and beam."""
    model = random_model(seed=6)  # one whose output depends on the tag, and ends at varied lengths
    rng = np.random.default_rng(1)
    sentences = [rng.integers(6, 60, size=n) for n in (3, 8, 5, 10, 2, 7)]
    tags = [4, 5, 4, 5, 5, 4]
    for beam in (1, 3):
        together = translate_ids(model, sentences, tags, beam=beam, max_tokens=4096)
        alone = {tag: translate_ids(model, [s for s, t in zip(sentences, tags) if t == tag], tag, beam=beam)
                 for tag in (4, 5)}
        assert together == [alone[t].pop(0) for t in tags]
        assert together != translate_ids(model, sentences, 4, beam=beam)  # the tags matter: the test can tell
    with pytest.raises(ValueError, match="2 tag ids for 6 sentences"):
        translate_ids(model, sentences, [4, 5], beam=1)


def test_validation_translates_each_direction_as_alone():
    """greedy_translations (validation's BLEU input) decodes all directions at once and hands each
    direction its own lines' translations, in order."""
    from types import SimpleNamespace

    from mtmoe.train.validation import greedy_translations, greedy_translations_per_direction

    model = random_model(seed=6)
    rng = np.random.default_rng(3)
    lines = {lang: [rng.integers(6, 60, size=n) for n in sizes] for lang, sizes in
             {"en": (3, 8, 5), "de": (10, 2, 7), "fr": (4, 4, 9)}.items()}
    tag = {"en": 4, "de": 5, "fr": 4}
    vocab = SimpleNamespace(tag_id=tag.get, special_ids={4, 5}, decode=lambda ids: " ".join(map(str, ids)))

    class Valid:  # TokenizedCorpus's reading side
        def line(self, lang, i):
            return lines[lang][i]

        def __len__(self):
            return 3

    data = SimpleNamespace(directions=[("en", "de"), ("de", "fr"), ("fr", "en")], vocab=vocab, valid=Valid())
    got = greedy_translations(model, data, max_tokens=1024)
    assert list(got) == ["en-de", "de-fr", "fr-en"]
    assert got == greedy_translations_per_direction(model, data, max_tokens=1024)
    for src, tgt in data.directions:
        alone = translate_ids(model, lines[src], tag[tgt], beam=1, banned_ids=[4, 5])
        assert got[f"{src}-{tgt}"] == [vocab.decode(h) for h in alone]


def test_best_hypothesis_ranks_by_length_normalised_score():
    finished = [(-4.0, [5, 6, 7, 8, 9]), (-2.0, [5]), (-2.0, [6])]  # sum log p, ids without EOS
    assert best_hypothesis(finished, 0.0) == [5]  # raw score; ties: the first to finish
    assert best_hypothesis(finished, 1.0) == [5, 6, 7, 8, 9]  # -4/6 > -2/2
    assert best_hypothesis(finished, 0.5) == [5]  # -4/sqrt(6) = -1.63 < -2/sqrt(2) = -1.41


def test_one_search_per_penalty_equals_a_search_per_penalty():
    """The length penalty only ranks finished hypotheses, so the grid of a tuning run comes from one
    search (translate_ids_per_penalty) and must equal one search per penalty (the slow path)."""
    model = random_model(seed=5)
    rng = np.random.default_rng(2)
    sentences = [rng.integers(4, 60, size=n) for n in (3, 9, 5, 12, 6, 2)]
    penalties = [0.0, 0.6, 1.0, 4.0]
    shared = translate_ids_per_penalty(model, sentences, tag_id=4, beam=4, length_penalties=penalties)
    separate = [translate_ids(model, sentences, tag_id=4, beam=4, length_penalty=lp) for lp in penalties]
    assert shared == separate
    assert shared[0] != shared[-1]  # the penalties pick different hypotheses here: the test can tell


def test_sacrebleu_scores_and_signature():
    perfect = score_direction(["a small cat sits on the mat ."], ["a small cat sits on the mat ."])
    assert perfect["bleu"] == 100.0 and perfect["chrf"] == 100.0
    assert perfect["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


@pytest.mark.gpu
def test_beam_search_reads_the_gpu_once_per_step():
    """On CUDA (a dense model: no expert loop): the search waits for the device once per decoding step
    (its one read), once per step in which sentences finished (their index copied to the device) and
    at most twice more at the start, counted by torch.cuda.set_sync_debug_mode("warn"). (Its
    hypotheses are not compared with the CPU's: float rounding may break a near-tie the other way.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none here)")
    model = build_model(60, TINY, MoEConfig(enabled=False), seed=4).eval()
    with torch.no_grad():
        model.embed.weight[EOS_ID] *= 3.0
    g = torch.Generator().manual_seed(3)
    srcs = [torch.cat([torch.randint(4, 60, (length,), generator=g), torch.tensor([EOS_ID])]) for length in (3, 9, 5, 7)]
    batch = torch.nn.utils.rnn.pad_sequence(srcs, batch_first=True, padding_value=PAD_ID)
    with torch.no_grad():
        model = model.cuda()
        beam_search_finished(model, batch.cuda(), beam=4)  # warm-up
        steps = []
        decode = model.decode
        model.decode = lambda *a, **k: steps.append(1) or decode(*a, **k)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                on_gpu = beam_search_finished(model, batch.cuda(), beam=4)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= len(steps) + len(srcs) + 2, [str(w.message)[:120] for w in syncs[:8]]
    assert [len(f) for f in on_gpu] == [4] * len(srcs)

