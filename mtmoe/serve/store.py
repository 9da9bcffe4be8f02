"""The slow tier: every expert of every MoE layer, one blob each, in `experts.safetensors`.

File format: safetensors (no pickle), one uint8 tensor [nbytes] per expert named `{layer}.{e}`
(e.g. `dec1.3`, e the expert's index in its layer: the compact index of a pruned layer), stored
one after another; the metadata records each layer's ExpertLayout and the size and mtime of the
model.safetensors it was cut from. It is written once, streaming one expert at a time, and
rebuilt when model.safetensors changes or the file is unreadable.

The file is memory-mapped read-only as one uint8 tensor: loading an expert is one copy of its
blob from the mapping into a fast-tier slot (`copy_into`), done by the calling thread, the
compute thread (see mtmoe.serve.loader for why no other thread does it). The OS page cache may
serve a read from RAM rather than from the disk (on a box where the file fits in the page cache,
after the first read it will); `slow_gbps` models a slower tier: one `Channel` of that
bandwidth, which every read shares (an on-demand load and a prefetch queue for it rather than
each getting the full bandwidth, as they would if each read were only stretched to its own
bytes / bandwidth). An on-demand read (`read_into`) returns once the channel has carried it; a
prefetch's time on the channel is kept by the loader.

A model on a GPU uses PinnedStore instead: the blobs in page-locked CPU RAM, copied to the GPU
on a side CUDA stream.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open

from mtmoe.errors import ExportError
from mtmoe.model.keys import expert_key, experts_prefix
from mtmoe.serve.layout import ExpertLayout

STORE_FORMAT = "mtmoe-expert-store-1"


@dataclass
class LayerSpec:
    """What the store holds for one MoE layer: `num_experts` blobs of `layout`, cut from the
    source tensors `{prefix}experts.{e}.{tensor name}` (e.g. `decoder.1.ffn.experts.3.fc1.weight`)."""
    prefix: str
    num_experts: int
    layout: ExpertLayout


def blob_name(layer: str, expert: int) -> str:
    """The name of one expert's blob in experts.safetensors, e.g. `dec1.3`."""
    return f"{layer}.{expert}"


def _source_stamp(source: Path) -> str:
    st = source.stat()
    return json.dumps({"bytes": st.st_size, "mtime_ns": st.st_mtime_ns})


def _metadata(source: Path, layers: dict[str, LayerSpec]) -> dict[str, str]:
    return {"format": STORE_FORMAT, "source": _source_stamp(source),
            "layers": json.dumps({name: {"experts": spec.num_experts, "layout": spec.layout.to_json()}
                                  for name, spec in layers.items()})}


def build_store(source: Path, out: Path, layers: dict[str, LayerSpec]) -> None:
    """Writes the store from `source` (a model.safetensors), one expert in memory at a time;
    the file appears complete or not at all (written under a temporary name, then renamed)."""
    entries = [(blob_name(name, e), spec.layout.nbytes) for name, spec in layers.items()
               for e in range(spec.num_experts)]
    header: dict = {"__metadata__": _metadata(source, layers)}
    offset = 0
    for key, nbytes in entries:
        header[key] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        try:
            src = safe_open(str(source), framework="pt")
        except Exception as e:
            raise ExportError(f"{source}: unreadable ({e})") from e
        with src, open(tmp, "wb") as f:
            _check_source_experts(source, set(src.keys()), layers)
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name, spec in layers.items():
                for e in range(spec.num_experts):
                    tensors = {s.name: src.get_tensor(expert_key(spec.prefix, e, s.name)) for s in spec.layout.specs}
                    f.write(spec.layout.pack(tensors).numpy().tobytes())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _check_source_experts(source: Path, keys: set[str], layers: dict[str, LayerSpec]) -> None:
    """The source's expert tensors are exactly the ones the model's layouts expect."""
    for name, spec in layers.items():
        have = {k for k in keys if k.startswith(experts_prefix(spec.prefix))}
        want = {expert_key(spec.prefix, e, s.name) for e in range(spec.num_experts) for s in spec.layout.specs}
        if have != want:
            raise ExportError(f"{source}: the experts of MoE layer {name} do not match the model "
                              f"(missing {sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]})")


def _is_current(path: Path, source: Path, layers: dict[str, LayerSpec]) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() == _metadata(source, layers)
    except Exception:  # missing, truncated or not safetensors: rebuild
        return False


def wait_until(deadline: float) -> None:
    """Busy-waits until perf_counter() reaches `deadline`: how compute waits for the simulated tier.

    A stall on a real tier ends when a DMA completes, and a GPU runtime's synchronize spins by
    default; `time.sleep` would add the OS's wake-up latency to every stall and leave the core
    to idle and cool between: measured here (scripts/bench_serve.py's 8-expert model, 1/4 of the
    experts resident in a shared pool, 1.5 GB/s, in one process, interleaved, vs all resident),
    0.80x sleeping and 0.86x spinning with loads on demand, 0.84x and 0.87x with speculative
    prefetch, the same loads either way. The compute thread's CPU time then includes its stalls."""
    while time.perf_counter() < deadline:
        pass


class Channel:
    """The simulated slow tier (`serve.slow_gbps`): one channel of `gbps` GB/s that carries one read
    at a time, in the order they reach it. Times are `time.perf_counter()` seconds."""

    def __init__(self, gbps: float):
        self.gbps = gbps
        self._lock = threading.Lock()  # reads from several threads may claim it
        self.free_at = 0.0  # when the channel has carried every read claimed so far

    def claim(self, nbytes: int) -> float:
        """A read of `nbytes` reaching the channel now: when it will have been carried."""
        with self._lock:
            self.free_at = max(time.perf_counter(), self.free_at) + nbytes / (self.gbps * 1e9)
            return self.free_at

    def start_by(self, nbytes: int, queued_at: float, now: float) -> Optional[float]:
        """A read that reached the channel at `queued_at`, behind those claimed before it: when it
        will have been carried, if the channel has started it by `now`; else None (not started:
        it claims nothing, and a prefetch not started can still be cancelled)."""
        with self._lock:
            start = max(queued_at, self.free_at)
            if start > now:
                return None
            self.free_at = start + nbytes / (self.gbps * 1e9)
            return self.free_at


class DiskStore:
    """Expert blobs read from the memory-mapped store file (the slow tier of a CPU model)."""

    def __init__(self, path: Path, layers: dict[str, LayerSpec], slow_gbps: float = 0.0):
        self.path, self.layers, self.slow_gbps = Path(path), layers, slow_gbps
        self.channel: Optional[Channel] = Channel(slow_gbps) if slow_gbps else None
        with open(self.path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid once the file is closed
        with warnings.catch_warnings():  # read-only memory: torch warns that writing to it is undefined
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(self._map, dtype=torch.uint8)[8 + header_len:]
        self._blobs = {key: data[entry["data_offsets"][0]:entry["data_offsets"][1]]
                       for key, entry in header.items() if key != "__metadata__"}  # views, never written

    def nbytes(self, layer: str) -> int:
        return self.layers[layer].layout.nbytes

    def copy_into(self, layer: str, expert: int, dst: torch.Tensor) -> None:
        """Copies expert `expert` of `layer` into dst uint8 [nbytes] (CPU), now, in this thread."""
        dst.copy_(self._blobs[blob_name(layer, expert)])

    def read_into(self, layer: str, expert: int, dst: torch.Tensor) -> None:
        """An on-demand read: `copy_into`, returning (with `slow_gbps`) once the channel has carried
        the blob, behind the reads it carries already."""
        done_at = self.channel.claim(dst.numel()) if self.channel is not None else None
        self.copy_into(layer, expert, dst)
        if done_at is not None:
            wait_until(done_at)


def open_store(source: Path, path: Path, layers: dict[str, LayerSpec], slow_gbps: float = 0.0) -> DiskStore:
    """The store at `path` for the experts of `source`, written first if missing or stale."""
    source, path = Path(source), Path(path)
    if not _is_current(path, source, layers):
        try:
            build_store(source, path, layers)
        except OSError as e:
            raise ExportError(f"{path}: cannot write the expert store ({e}); set serve.store_dir to a "
                              "writable folder") from e
    return DiskStore(path, layers, slow_gbps)


PINNED_SEGMENT_BYTES = 1 << 28
"""Size of the page-locked segments the GPU store packs expert blobs into (256 MiB, a power of two)."""
BLOB_ALIGN = 256
"""Byte alignment of each blob in a segment (the copy engine's reads start aligned)."""


def pack_segments(sizes: Sequence[int], segment_bytes: int = PINNED_SEGMENT_BYTES,
                  align: int = BLOB_ALIGN) -> tuple[list[int], list[tuple[int, int]]]:
    """Blobs of `sizes` bytes, in order, packed into segments -> (bytes of each segment, (segment,
    offset) of each blob).

    Why segments: torch's pinned host allocator rounds every allocation up to a power of two, so
    one allocation per expert blob (8.0 MB for a 512x2048 fp32 expert -> 16 MiB) costs up to ~2x
    the store in page-locked RAM, and one allocation for the whole store up to 2x as well. Every
    segment but the last is exactly `segment_bytes` (a power of two, raised to the largest blob's),
    which rounding leaves as it is; the last is as large as its blobs need. Pinned RAM is then the
    store's bytes plus less than one segment plus each segment's unusable tail (< one blob)."""
    capacity = max(segment_bytes, 1 << (max(sizes, default=1) - 1).bit_length())
    segments: list[int] = []
    placed: list[tuple[int, int]] = []
    used = capacity  # no open segment yet
    for nbytes in sizes:
        start = -(-used // align) * align
        if start + nbytes > capacity:
            segments.append(0)
            start = 0
        placed.append((len(segments) - 1, start))
        used = start + nbytes
        segments[-1] = used
    segments = [capacity] * (len(segments) - 1) + segments[-1:]
    return segments, placed


def pinned(nbytes: int) -> torch.Tensor:
    """An empty uint8 [nbytes] tensor in page-locked CPU RAM."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def copy_blobs(disk: DiskStore, allocate=pinned) -> tuple[list[torch.Tensor], dict[tuple[str, int], torch.Tensor]]:
    """Every blob of `disk`, copied into segments made by `allocate(nbytes)` (`pack_segments`) ->
    (the segments, {(layer, expert): the blob's view into its segment})."""
    keys = [(name, e) for name, spec in disk.layers.items() for e in range(spec.num_experts)]
    sizes = [disk.nbytes(name) for name, _ in keys]
    segment_sizes, placed = pack_segments(sizes)
    segments = [allocate(nbytes) for nbytes in segment_sizes]
    blobs = {}
    for key, nbytes, (segment, offset) in zip(keys, sizes, placed):
        blobs[key] = segments[segment][offset:offset + nbytes]
        disk.copy_into(*key, blobs[key])
    return segments, blobs


class PinnedStore:
    """The slow tier of a model on a GPU: every blob in page-locked CPU RAM (`copy_blobs`), copied
    to the GPU on a side CUDA stream, so copies overlap the kernels of the compute stream."""

    def __init__(self, disk: DiskStore, device: torch.device):
        self.layers = disk.layers
        self.channel = None  # copies from pinned RAM; slow_gbps simulates a tier of a CPU model
        self._segments, self._blobs = copy_blobs(disk)
        self._device = device
        self._copy_stream = torch.cuda.Stream(device)

    def nbytes(self, layer: str) -> int:
        return self.layers[layer].layout.nbytes

    def copy_into(self, layer: str, expert: int, dst: torch.Tensor) -> torch.cuda.Event:
        """Queues the copy into dst (GPU) and returns the event the compute stream must wait for.
        The copy first waits for the compute stream (the stream current now, the one decoding runs
        on): kernels still queued there may read the slot's previous expert.
        `dst` was allocated on the compute stream: `record_stream` keeps the caching allocator from
        handing its memory to another tensor, once the slot lets go of it (a cache `release`), before
        the copy written into it here has finished."""
        compute = torch.cuda.current_stream(self._device)
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_stream(compute)
            dst.copy_(self._blobs[layer, expert], non_blocking=True)
            dst.record_stream(self._copy_stream)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return done

    read_into = copy_into  # no simulated channel: a read is the copy
