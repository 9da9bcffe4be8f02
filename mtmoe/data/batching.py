"""Token-budget batches of mixed directions, reproducible from (seed, position) alone.

The stream is cut into chunks. Chunk c is built from its own RNG seeded with (seed, c): it draws
`chunk_sentences` examples (direction by temperature, line uniformly, i.e. with replacement),
sorts them by length so batches carry little padding, packs them greedily so that
`sentences * max(src_len, tgt_len) <= max_tokens`, and shuffles the batch order. A position is
(chunk, batch-in-chunk); resuming at a position needs no replay of earlier randomness.

Data parallelism: every rank builds the same global stream and takes batches
`rank, rank + world, ...`, so ranks see disjoint batches and the global order is fixed by the seed.
With gradient accumulation, micro-batch m of step s on rank r is global batch
`(s * accumulate + m) * world + r`: world 1 x accumulate 2 and world 2 x accumulate 1 see the same
batches in the same steps. The global order does not depend on the layout at all: a step's batches
may span the end of a chunk (no batch is dropped to make chunks hold whole steps, which, before,
threw away up to world x accumulate - 1 batches per chunk and stopped runs of more ranks than a
chunk has batches).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from mtmoe.config import TranslationParams
from mtmoe.data.sampling import Direction
from mtmoe.data.tasks.base import Source
from mtmoe.data.tasks.translation import TranslationTask
from mtmoe.data.tokenized import TokenizedCorpus
from mtmoe.data.vocab import BOS_ID, EOS_ID, PAD_ID
from mtmoe.errors import ConfigError

log = logging.getLogger("mtmoe")


@dataclass
class Batch:
    """One padded batch. Shapes: src [B, S], tgt_in/tgt_out [B, T] (int64, PAD_ID=0)."""
    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    source_ids: torch.Tensor  # [B] index of each row's source in the stream's `sources` (a direction or a task source)
    counts: Optional[tuple[int, int]] = field(default=None, repr=False, compare=False)
    """(target, source) real tokens, counted on the host by `to` before the copy, so that reading
    them from a batch on a GPU does not wait for the device."""

    @property
    def num_target_tokens(self) -> int:
        return self.counts[0] if self.counts else int((self.tgt_out != PAD_ID).sum())

    @property
    def num_source_tokens(self) -> int:
        return self.counts[1] if self.counts else int((self.src != PAD_ID).sum())

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """This batch on `device` (itself when it is there). To a GPU the host tensors are pinned
        first, so that with `non_blocking` the copy runs asynchronously on the current stream."""
        if self.src.device == torch.device(device):
            return self
        counts = self.counts or (self.num_target_tokens, self.num_source_tokens)
        pin = non_blocking and torch.device(device).type == "cuda" and self.src.device.type == "cpu"
        moved = [(t.pin_memory() if pin else t).to(device, non_blocking=non_blocking)
                 for t in (self.src, self.tgt_in, self.tgt_out, self.source_ids)]
        return Batch(*moved, counts=counts)


def source_token_limit(max_len: int) -> int:
    """The most tokens of a source sentence a batch keeps: `data.max_len` less the target-language
    tag and </s> (`collate` cuts the rest)."""
    return max_len - 2


def padded_lengths(src_len, tgt_len, max_len: int):
    """(source, target) row lengths as `collate` lays a pair out: the source cut to max_len - 2 tokens
    plus its tag and </s>, the target cut to max_len - 1 plus <s> (tgt_in) or </s> (tgt_out). Takes
    ints or integer arrays; the one rule that batching by tokens and `collate` share."""
    return np.minimum(src_len, source_token_limit(max_len)) + 2, np.minimum(tgt_len, max_len - 1) + 1


def collate(src_seqs: Sequence[np.ndarray], tgt_seqs: Sequence[np.ndarray], tag_ids: Sequence[int],
            max_len: int, source_ids: Sequence[int] | None = None) -> Batch:
    """src = <2tgt> tokens </s>;  tgt_in = <s> tokens;  tgt_out = tokens </s> (right-padded). The
    batch's token counts are taken here, on the host, so that no step reads them from a device."""
    n = len(src_seqs)
    s_len, t_len = (int(x.max()) for x in padded_lengths(np.array([len(s) for s in src_seqs]),
                                                         np.array([len(t) for t in tgt_seqs]), max_len))
    src = np.full((n, s_len), PAD_ID, dtype=np.int64)
    tgt_in = np.full((n, t_len), PAD_ID, dtype=np.int64)
    tgt_out = np.full((n, t_len), PAD_ID, dtype=np.int64)
    for i, (s, t, tag) in enumerate(zip(src_seqs, tgt_seqs, tag_ids)):
        s = s[: source_token_limit(max_len)]
        t = t[: max_len - 1]
        src[i, 0] = tag
        src[i, 1:len(s) + 1] = s
        src[i, len(s) + 1] = EOS_ID
        tgt_in[i, 0] = BOS_ID
        tgt_in[i, 1:len(t) + 1] = t
        tgt_out[i, :len(t)] = t
        tgt_out[i, len(t)] = EOS_ID
    dirs = torch.tensor(source_ids if source_ids is not None else [0] * n, dtype=torch.long)
    counts = (int(np.count_nonzero(tgt_out != PAD_ID)), int(np.count_nonzero(src != PAD_ID)))
    return Batch(torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out), dirs, counts=counts)


def pack_by_tokens(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Greedy packing of examples (already in the wanted order) into index groups with
    count * max(longest src, longest tgt) <= max_tokens. Lengths include the added specials."""
    batches, start, longest = [], 0, 0
    for i in range(len(src_lens)):
        longest_i = max(longest, int(src_lens[i]), int(tgt_lens[i]))
        if i > start and (i - start + 1) * longest_i > max_tokens:
            batches.append(np.arange(start, i))
            start, longest_i = i, max(int(src_lens[i]), int(tgt_lens[i]))
        longest = longest_i
    if start < len(src_lens):
        batches.append(np.arange(start, len(src_lens)))
    return batches


@dataclass
class StreamPosition:
    chunk: int = 0
    batch: int = 0
    batches_before: int = 0
    """Global batches in the chunks before `chunk`."""
    steps_before: Optional[float] = None
    """Optimizer steps those batches made (each chunk's batches / the batches per step of the layout
    that read it): the multitask schedule's clock at `chunk`. None: batches_before / this layout's
    batches per step (a position saved before it was recorded)."""

    def as_dict(self) -> dict:
        return {"chunk": self.chunk, "batch": self.batch, "batches_before": self.batches_before,
                "steps_before": self.steps_before}


def translation_sources(corpus: TokenizedCorpus, directions: Sequence[Direction], rows: np.ndarray) -> list[Source]:
    return TranslationTask(TranslationParams()).sources(corpus, rows, directions, vocab=None)


class BatchStream:
    """Endless, seed-determined stream of training batches over several sources (directions,
    denoising languages, ...)."""

    def __init__(self, sources: Sequence[Source], probs_at: Callable[[float], np.ndarray],
                 tag_ids: dict[str, int], max_tokens: int, max_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, chunk_sentences: int = 4000, accumulate: int = 1):
        """`sources` (mtmoe.data.tasks) sampled by `probs_at(step)` (a multitask `Mixture.probs`).
        `accumulate`: micro-batches per optimizer step: step s takes global batches
        s * world_size * accumulate onwards, so global batch g lands in the same step under every
        layout with the same world_size x accumulate."""
        self.sources = list(sources)
        self.probs_at = probs_at
        self.tag_ids = tag_ids
        self.max_tokens = max_tokens
        self.max_len = max_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.chunk_sentences = chunk_sentences
        self.batches_per_step = world_size * accumulate
        self.position = StreamPosition()
        self._cache: dict[int, list] = {}

    @classmethod
    def translation(cls, corpus: TokenizedCorpus, directions: Sequence[Direction], probs: np.ndarray,
                    tag_ids: dict[str, int], max_tokens: int, max_len: int, seed: int,
                    rows: np.ndarray | None = None, **kwargs) -> "BatchStream":
        """Translation only: `directions` sampled with the fixed `probs`, lines from `rows`
        (default all; see `data.too_long`)."""
        rows = np.arange(len(corpus)) if rows is None else np.asarray(rows)
        fixed = np.asarray(probs)
        return cls(translation_sources(corpus, directions, rows), lambda step: fixed, tag_ids, max_tokens,
                   max_len, seed, **kwargs)

    def _chunk(self, chunk: int, steps_before: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """[(source index[B], line index[B], example index in chunk[B]), ...] per global batch;
        the sources sampled by the schedule at step `steps_before`."""
        rng = np.random.default_rng([self.seed, chunk])
        probs = self.probs_at(steps_before)
        src_idx = rng.choice(len(self.sources), size=self.chunk_sentences, p=probs)
        draws = rng.random(self.chunk_sentences)
        lines = np.empty(self.chunk_sentences, dtype=np.int64)
        src_len = np.empty(self.chunk_sentences, dtype=np.int64)
        tgt_len = np.empty(self.chunk_sentences, dtype=np.int64)
        for k, source in enumerate(self.sources):
            sel = src_idx == k
            lines[sel] = source.rows[(draws[sel] * len(source.rows)).astype(np.int64)]
            src_len[sel], tgt_len[sel] = padded_lengths(source.src_len[lines[sel]], source.tgt_len[lines[sel]],
                                                        self.max_len)
        order = np.lexsort((src_len, tgt_len))
        groups = pack_by_tokens(src_len[order], tgt_len[order], self.max_tokens)
        rng.shuffle(groups)
        return [(src_idx[order[g]], lines[order[g]], order[g]) for g in groups]

    def make_batch(self, chunk: int, src_idx: np.ndarray, line_idx: np.ndarray, example_idx: np.ndarray) -> Batch:
        src, tgt, tags = [], [], []
        for k, i, j in zip(src_idx, line_idx, example_idx):
            source = self.sources[k]
            rng = np.random.default_rng([self.seed, chunk, int(j)]) if source.random else None
            s, t = source.make(int(i), rng)
            src.append(s)
            tgt.append(t)
            tags.append(self.tag_ids[source.tgt_lang])
        return collate(src, tgt, tags, self.max_len, src_idx.tolist())

    def _groups(self, chunk: int, steps_before: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`_chunk`, kept from the position's chunk on (a step's batches may span several)."""
        if chunk not in self._cache:
            self._cache = {c: g for c, g in self._cache.items() if c >= self.position.chunk}
            self._cache[chunk] = self._chunk(chunk, steps_before)
            if not self._cache[chunk]:  # every chunk would be empty alike: the stream would search forever
                raise ConfigError(f"a data chunk of {self.chunk_sentences} sentences packs into no batch")
        return self._cache[chunk]

    def _next_chunk(self, pos: StreamPosition, batches: int) -> StreamPosition:
        """The position at the start of the chunk after `pos`'s, which holds `batches` batches."""
        return StreamPosition(pos.chunk + 1, pos.batch - batches, pos.batches_before + batches,
                              pos.steps_before + batches / self.batches_per_step)

    def __iter__(self) -> Iterator[Batch]:
        if self.position.steps_before is None:
            self.position.steps_before = self.position.batches_before / self.batches_per_step
        while True:
            pos = self.position
            groups = self._groups(pos.chunk, pos.steps_before)
            if pos.batch >= len(groups):  # used up (or a resumed position past its end): the next chunk
                self.position = self._next_chunk(pos, len(groups))
                continue
            ahead = StreamPosition(pos.chunk, pos.batch + self.rank, pos.batches_before, pos.steps_before)
            while ahead.batch >= len(groups):  # this rank's batch of the step lies in a later chunk
                ahead = self._next_chunk(ahead, len(groups))
                groups = self._groups(ahead.chunk, ahead.steps_before)
            self.position.batch += self.world_size
            yield self.make_batch(ahead.chunk, *groups[ahead.batch])

    def state_dict(self) -> dict:
        return self.position.as_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resumes at `state`. A position saved by a layout with another world size x accumulate
        is moved on to the next step boundary of this one (in the global batch order: a step is
        world x accumulate consecutive global batches, and ranks read them in lockstep)."""
        batch, before = int(state["batch"]), int(state.get("batches_before", 0))
        aligned = -(-(before + batch) // self.batches_per_step) * self.batches_per_step - before
        if aligned != batch:
            log.warning("data stream: resuming at batch %d of chunk %s, the next step boundary of %d batches per "
                        "step (saved at batch %d by another layout)", aligned, state["chunk"],
                        self.batches_per_step, batch)
        steps = state.get("steps_before")
        self.position = StreamPosition(int(state["chunk"]), aligned, before, None if steps is None else float(steps))


class DeviceFeed:
    """The batches of a `BatchStream` on `device`, each copied one batch ahead: the copy of batch
    i + 1 (pinned host memory, non-blocking) is queued before batch i is handed out, so it runs
    while step i computes. On a CPU it hands out the stream's batches as they are.

    `state_dict()` is the stream position after the last batch handed out, not after the one
    copied ahead, so a checkpoint resumes at the first batch not trained on."""

    def __init__(self, stream: BatchStream, device: torch.device):
        self.stream, self.device = stream, torch.device(device)
        self._batches = iter(stream)
        self._state = stream.state_dict()
        self._ahead: Optional[tuple[Batch, dict]] = None

    def _fetch(self) -> tuple[Batch, dict]:
        batch = next(self._batches)
        return batch.to(self.device, non_blocking=True), self.stream.state_dict()

    def __iter__(self) -> "DeviceFeed":
        return self

    def __next__(self) -> Batch:
        batch, self._state = self._ahead if self._ahead is not None else self._fetch()
        self._ahead = self._fetch() if self.device.type != "cpu" else None
        return batch

    def state_dict(self) -> dict:
        return dict(self._state)
