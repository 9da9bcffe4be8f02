"""The device decision (mtmoe.device) and the batches' way to the device, on any machine; the
refusals of a missing GPU name the field before anything is written."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from helpers import compose_train, run_cli, tiny_overrides
from mtmoe import device as devices
from mtmoe.config import check_device_spec, validate
from mtmoe.data.batching import BatchStream, DeviceFeed, collate
from mtmoe.data.tokenized import TokenizedCorpus
from mtmoe.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


@pytest.mark.parametrize("spec", ["tpu", "cuda:", "cuda:x", "CPU", "", "cuda0"])
def test_device_spec_syntax_is_checked(spec):
    with pytest.raises(ConfigError, match=r"^device='.*': expected auto, cpu, cuda or cuda:N"):
        check_device_spec("device", spec)


def test_cpu_and_auto_resolve_here():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert devices.resolve_device("auto") == expected
    assert devices.training_device("cpu", local_rank=3) == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_cuda_is_refused_naming_the_field(spec):
    with pytest.raises(ConfigError, match=rf"^eval\.device={spec}: this machine has no CUDA device"):
        devices.resolve_device(spec, "eval.device")


def test_gpu_index_that_does_not_exist_is_refused(monkeypatch, cudnn_attention_flag):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^device=cuda:2: there is no such GPU \(this machine has 2: cuda:0\.\.cuda:1\)"):
        devices.resolve_device("cuda:2")
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    # a training rank takes its LOCAL_RANK's GPU, and cannot be told another
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.training_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"local rank 2 has no GPU of its own \(this node has 2\)"):
        devices.training_device("cuda", local_rank=2)
    with pytest.raises(ConfigError, match=r"^train\.device=cuda:1: a training rank uses the GPU of its LOCAL_RANK"):
        devices.training_device("cuda:1", local_rank=0)


@pytest.fixture
def cudnn_attention_flag():
    """Restores torch's process-wide cuDNN-attention switch after the test."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_a_gpu_decision_takes_cudnn_out_of_attention(monkeypatch, cudnn_attention_flag):
    """cuDNN's attention builds a plan per new shape (see `choose_attention_kernels`): deciding on a
    GPU turns it off for the process, unless MTMOE_CUDNN_ATTENTION=1; deciding on the CPU leaves it."""
    monkeypatch.delenv(devices.KEEP_CUDNN_ATTENTION, raising=False)
    torch.backends.cuda.enable_cudnn_sdp(True)
    devices.resolve_device("cpu")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setenv(devices.KEEP_CUDNN_ATTENTION, "1")
    devices.choose_attention_kernels(torch.device("cuda", 0))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.delenv(devices.KEEP_CUDNN_ATTENTION)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_free_host_memory_is_in_bytes_and_below_the_total():
    """What `train.valid_model=auto` weighs a whole copy of the model against, on a CPU rank."""
    import os

    free = devices.free_memory_bytes(torch.device("cpu"))
    assert 2**20 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_rank_threads_one_per_cpu_rank_and_a_share_of_the_cores_per_gpu_rank(monkeypatch):
    """train.threads=0 (auto): a CPU rank runs 1 thread, a GPU rank its share of the cores it may run
    on (CPU Adam under optimizer offload runs on them), split among the node's ranks; a number given
    is kept; a negative one is refused naming the field."""
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    gpu = torch.device("cuda", 0)  # only its type is read: no CUDA needed
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert devices.rank_threads(0, torch.device("cpu")) == 1
    assert devices.rank_threads(0, gpu) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert devices.rank_threads(0, gpu) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert devices.rank_threads(0, gpu) == 1
    assert devices.rank_threads(3, gpu) == devices.rank_threads(3, torch.device("cpu")) == 3
    with pytest.raises(ConfigError, match=r"^train\.threads=-1 must be >= 0"):
        validate(compose_train(["model=tiny", "train.threads=-1", "train.max_steps=1"]))


def test_bf16_defaults_and_refusal(monkeypatch):
    cpu = torch.device("cpu")
    assert devices.resolve_bf16(None, cpu) is False and devices.resolve_bf16(True, cpu) is True
    monkeypatch.setattr(devices, "bf16_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    gpu = torch.device("cuda", 0)
    assert devices.resolve_bf16(None, gpu) is False and devices.resolve_bf16(False, gpu) is False
    with pytest.raises(ConfigError, match=r"^train\.bf16=true: Tesla V100 has no bf16"):
        devices.resolve_bf16(True, gpu)
    monkeypatch.setattr(devices, "bf16_supported", lambda device: True)
    assert devices.resolve_bf16(None, gpu) is True


def test_gpu_memory_cap_is_refused_on_a_cpu_and_above_the_gpu(monkeypatch):
    """train.gpu_memory_gib caps a GPU's allocator: refused, naming the field, for a rank on the CPU
    (before the process group starts) and for more than the GPU has; 0 is no cap; negative is refused
    by the config check."""
    devices.cap_memory(torch.device("cpu"), 0.0)  # no cap: nothing to refuse
    with pytest.raises(ConfigError, match=r"^train\.gpu_memory_gib=4\.0: caps a GPU's memory, and this rank "
                                          r"computes on the cpu"):
        devices.cap_memory(torch.device("cpu"), 4.0)
    from mtmoe.train.layout import TrainingLayout

    with pytest.raises(ConfigError, match=r"^train\.gpu_memory_gib=2\.0: caps a GPU's memory"):
        TrainingLayout(compose_train(["model=tiny", "train.device=cpu", "train.gpu_memory_gib=2", "train.max_steps=1"]))
    with pytest.raises(ConfigError, match=r"^train\.gpu_memory_gib=-1\.0 must be >= 0"):
        validate(compose_train(["model=tiny", "train.gpu_memory_gib=-1", "train.max_steps=1"]))
    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "H100")
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: fractions.append((f, device)))
    gpu = torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^train\.gpu_memory_gib=96\.0: more than H100 has \(80\.0 GiB\)"):
        devices.cap_memory(gpu, 96.0)
    devices.cap_memory(gpu, 8.0)
    assert fractions == [(0.1, gpu)]
    assert devices.peak_memory_gib(torch.device("cpu")) is None


def test_collectives_use_the_cpu_without_a_process_group():
    assert devices.collective_device() == torch.device("cpu")


def small_stream() -> BatchStream:
    rng = np.random.default_rng(0)
    lines = {lang: [rng.integers(5, 40, size=rng.integers(2, 12)).astype(np.int32) for _ in range(60)]
             for lang in ("en", "de")}
    corpus = TokenizedCorpus(["en", "de"], {lang: np.concatenate(x) for lang, x in lines.items()},
                             {lang: np.concatenate([[0], np.cumsum([len(y) for y in x])]) for lang, x in lines.items()},
                             {lang: [""] * 60 for lang in lines})
    return BatchStream.translation(corpus, [("en", "de"), ("de", "en")], np.array([0.5, 0.5]),
                                   {"en": 1, "de": 2}, max_tokens=64, max_len=16, seed=3, chunk_sentences=40)


def test_batch_to_keeps_its_token_counts():
    batch = collate([np.arange(5, 9), np.arange(5, 7)], [np.arange(5, 8), np.arange(5, 10)], [1, 1], 16)
    moved = batch.to(torch.device("meta"))
    assert moved.src.device.type == "meta" and moved.counts == (batch.num_target_tokens, batch.num_source_tokens)
    assert moved.num_target_tokens == 3 + 1 + 5 + 1 and moved.num_source_tokens == 6 + 4
    assert batch.to(torch.device("cpu")) is batch


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_device_feed_hands_out_the_streams_batches_and_its_position(device):
    """On a device other than the CPU the feed copies one batch ahead; its state_dict is still the
    stream position after the last batch handed out, so a resumed stream starts at the next one.
    ('meta' stands in for a GPU: the copy-ahead path without one.)"""
    feed = DeviceFeed(small_stream(), torch.device(device))
    reference = small_stream()
    expected = iter(reference)
    for _ in range(7):
        got, want = next(feed), next(expected)
        assert got.src.device.type == device and got.src.shape == want.src.shape
        assert got.num_target_tokens == want.num_target_tokens
        if device == "cpu":
            assert torch.equal(got.src, want.src)
        assert feed.state_dict() == reference.state_dict()
    resumed = small_stream()
    resumed.load_state_dict(feed.state_dict())
    for a, b in zip(itertools.islice(resumed, 3), itertools.islice(expected, 3)):
        assert torch.equal(a.src, b.src) and torch.equal(a.tgt_out, b.tgt_out)


@no_cuda
def test_apps_refuse_cuda_without_cuda_before_writing(tmp_path, corpus, cache_dir, exports):
    run = tmp_path / "run"
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run, **{"train.device": "cuda"}))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.device=cuda: this machine has no CUDA device" in proc.stderr
    assert not (run / "train_log.jsonl").exists() and not (run / "model.json").exists()
    out = tmp_path / "report.json"
    proc = run_cli("mtmoe-eval", [f"model={exports['full']}", f"test={corpus / 'test_2016_flickr'}", f"out={out}",
                                  "device=cuda:1"])
    assert proc.returncode == 2 and "device=cuda:1: this machine has no CUDA device" in proc.stderr
    assert not out.exists()
    proc = run_cli("mtmoe-translate", [f"model={exports['full']}", "src=en", "tgt=de", "device=tpu"], stdin="a dog\n")
    assert proc.returncode == 2 and "device='tpu': expected auto, cpu, cuda or cuda:N" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("bf16", [False, True])
def test_engine_forward_runs_in_bf16_when_train_bf16(bf16):
    """DeepSpeed's engine turns off an autocast its caller opened unless its config has a
    `torch_autocast` section: with train.bf16 the engine's forward computes in bf16 (the logits come
    out bf16), without it in fp32; the parameters stay fp32 either way."""
    from mtmoe.train.layout import TrainingLayout
    from mtmoe.train.trainer import compute_loss

    cfg = compose_train(["model=tiny", f"train.bf16={str(bf16).lower()}", "moe.ep_size=1", "moe.num_experts=2",
                         "moe.every=1", "train.max_steps=1", "train.device=cpu"])
    layout = TrainingLayout(cfg)
    assert layout.bf16 is bf16 and layout.device == torch.device("cpu")
    model = layout.build_model(40)
    engine, *_ = layout.initialize(model)
    batch = collate([np.arange(5, 12)], [np.arange(5, 10)], [1], 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = engine(batch.src, batch.tgt_in)[0]
    assert logits.dtype == (torch.bfloat16 if bf16 else torch.float32)
    total = compute_loss(engine, batch, cfg, 0.1, bf16)[0]
    engine.backward(total)
    engine.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
