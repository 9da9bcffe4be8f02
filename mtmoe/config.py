"""Structured configs: one dataclass per concern, registered in Hydra's ConfigStore, plus one
`validate()` that checks the whole tree before any compute starts.

The YAML files under `conf/` fill these dataclasses; Hydra rejects wrong types and unknown keys
in YAML and plain overrides (structured-config schema). Keys added with `+key=value` get past the
schema (OmegaConf keeps them as extra attributes), so each app config has its own `validate*()`
that rejects unknown keys under typed sections (naming the closest known key) and impossible
values or combinations, with a message that names the field (e.g.
``moe.num_experts=6 is not divisible by moe.ep_size=4``), before any compute starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional, Sequence, get_args

from hydra.core.config_store import ConfigStore

from mtmoe.errors import ConfigError

# Choices, each written once. OmegaConf cannot type a field as Literal (and an Enum would change
# the values written to model.json and config.json), so a choice field is a plain str/int field
# declared with `choice(...)`: its options travel in the field's metadata and `check_choices`
# checks every such field of an app config, naming it.
DataFormat = Literal["text", "json", "parquet", "csv"]
TooLong = Literal["skip", "truncate", "fail"]
SpmModelType = Literal["unigram", "bpe", "char", "word"]
Activation = Literal["relu", "gelu"]
Positions = Literal["sinusoidal", "learned"]
TopK = Literal[1, 2]
Dispatch = Literal["grouped", "reference"]
ExpertStorage = Literal["stacked", "per_expert"]
WandbMode = Literal["offline", "online", "disabled"]
ZeroStage = Literal[0, 1, 2, 3]
Offload = Literal["none", "cpu", "nvme"]
ValidBleu = Literal["final", "always", "never"]
ValidModel = Literal["auto", "whole", "partitioned"]
ScheduleKind = Literal["constant", "linear", "stepwise", "curriculum"]
PrefetchPolicy = Literal["none", "speculative", "pregate", "language"]
ServeBudget = Literal["layer", "model"]
PruneRule = Literal["loss", "coverage", "global"]
Quant = Literal["none", "int8", "int4"]
QUANT_BITS = {"int8": 8, "int4": 4}
"""Bits of each `quant` choice but none."""


DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_spec(field: str, spec: str) -> str:
    """`spec` when it is a `device=` value (auto, cpu, cuda, cuda:N), else ConfigError naming `field`.
    Syntax only: `resolve_device` checks that the device exists."""
    if not isinstance(spec, str) or not DEVICE_SPEC.match(spec):
        raise ConfigError(f"{field}={spec!r}: expected auto, cpu, cuda or cuda:N")
    return spec


def choice(default, options) -> Any:
    """A config field whose value must be one of the Literal `options` (checked by `check_choices`)."""
    assert default in get_args(options), (default, options)
    return field(default=default, metadata={"choices": get_args(options)})


def _check_allowed(key: str, value, allowed: tuple) -> Any:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")
    return value


def check_choice(key: str, value, options) -> Any:
    """`value` when it is one of the Literal `options`, else ConfigError naming `key`."""
    return _check_allowed(key, value, get_args(options))


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every `choice(...)` field of the config dataclass `obj`, and of the dataclasses it holds."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "choices" in f.metadata:
            _check_allowed(f"{prefix}{f.name}", value, f.metadata["choices"])
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")


@dataclass
class DataConfig:
    corpus_dir: str = "data/multi30k"
    """Folder holding the line-aligned corpus files (relative paths resolve against the project root)."""
    train_prefix: str = "train"
    valid_prefix: str = "val"
    test_prefix: str = "test_2016_flickr"
    format: str = choice("text", DataFormat)
    """`text`: one file per language, `{prefix}.{lang}` or `{prefix}.{lang}.gz`;
    `json`/`parquet`/`csv`: one file `{prefix}.{format}` with one column per language (read by `datasets`)."""
    langs: list[str] = field(default_factory=lambda: ["en", "de", "fr", "cs"])
    directions: str = "all"
    """`all` (every ordered pair), `pivot` (to and from `data.pivot`), or a quoted list: `'en-de,de-en'`."""
    pivot: str = "en"
    temperature: float = 5.0
    """Direction sampling: p(direction) ∝ size^(1/T); T=1 is proportional, large T is uniform."""
    vocab_size: int = 8000
    spm_model_type: str = choice("unigram", SpmModelType)
    spm_sample_lines: int = 200000
    max_len: int = 128
    """Token limit per side, counting the language tag and </s>."""
    too_long: str = choice("skip", TooLong)
    """Training lines longer than `max_len` in any language: `skip` (counted and reported),
    `truncate`, or `fail` (error naming the first such file and line)."""
    max_train_lines: int = 0
    """Use only the first N training lines (0 = all); for quick experiments."""
    val_lines: int = 200
    """Lines per direction used for the periodic validation (loss and BLEU)."""
    cache_dir: str = "~/.cache/mtmoe"


@dataclass
class ModelConfig:
    name: str = "base"
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = choice("relu", Activation)
    positions: str = choice("sinusoidal", Positions)
    """`sinusoidal` or `learned`."""
    max_positions: int = 512


@dataclass
class MoEConfig:
    enabled: bool = True
    """False (the `moe=dense` preset) gives a plain Transformer baseline."""
    num_experts: int = 4
    top_k: int = choice(1, TopK)
    every: int = 2
    """An MoE FFN replaces the dense FFN in every `every`-th layer (layers every-1, 2*every-1, ...)."""
    ep_size: int = 1
    """Expert-parallel group size: each rank holds num_experts/ep_size experts."""
    capacity_factor: float = 1.25
    """Training capacity = ceil(k * tokens / num_experts * factor); 0 (or less) is dropless: every
    real token reaches its top-k experts, no capacity at all (MegaBlocks' dMoE)."""
    eval_capacity_factor: float = 0.0
    """Capacity factor in eval mode (validation, decoding, export); 0 = no token is dropped."""
    min_capacity: int = 4
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    use_rts: bool = True
    """Random Token Selection: when an expert overflows, keep a uniformly random subset of its
    tokens instead of the earliest positions."""
    pregate: bool = False
    """Pre-gated MoE: each MoE layer's routing is computed one MoE layer earlier in the same stack
    (the first routes itself), so a serving runtime knows the next layer's experts in advance
    (`serve.prefetch=pregate`). Same parameters as a normal model."""
    dispatch: str = choice("grouped", Dispatch)
    """`grouped`: kept (token, expert) rows ordered by expert, experts run as one grouped GEMM, no
    host sync (mtmoe.model.moe). `reference`: the capacity-buffer index dispatch it replaced, one
    expert at a time (slower; for checking and benchmarks). Same results either way."""
    expert_storage: str = choice("stacked", ExpertStorage)
    """`stacked`: each MoE layer's experts in [E, ...] tensors (one grouped GEMM). `per_expert`: one
    module per expert, run one after another; for ZeRO-3 with offload (`parallel=zero3_nvme` sets
    it), where a parameter is gathered whole when it runs. Same weights, checkpoints and exports."""
    kept_experts: dict[str, list[int]] = field(default_factory=dict)
    """Set by expert pruning in exports: MoE layer (`enc1`, `dec1`, ...) -> ids of the experts it keeps."""


@dataclass
class WandbConfig:
    mode: str = choice("offline", WandbMode)
    """`offline` (default: logs under the run dir, sync later), `online`, or `disabled`."""
    project: str = "mtmoe"
    name: Optional[str] = None


@dataclass
class TrainConfig:
    seed: int = 1
    max_steps: int = 0
    """0 = no step limit (then `max_minutes` must be set)."""
    max_minutes: float = 0.0
    """Wall-clock budget for the training loop; 0 = none."""
    max_tokens: int = 1024
    """Token budget of one batch per rank: sentences * max(src_len, tgt_len) <= max_tokens."""
    lr: float = 1e-3
    warmup_steps: int = 1000
    cooldown: float = 0.0
    """Fraction of the budget (`max_steps`, or `max_minutes` of training time) at its end over which
    the lr falls linearly to 0, after the inverse-sqrt schedule; 0 = none. Ending at lr 0 gives, in
    one run, the gain that averaging the last checkpoints gives (the noise of the last updates
    averaged out). Each step trains at the factor of the budget spent when it starts (under a step
    budget exactly; under a time budget as of the step before, by the time all ranks agreed on)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    device: str = "auto"
    """Where each rank trains: `auto` (its LOCAL_RANK's GPU when CUDA is there, else the CPU), `cuda`
    (a GPU per rank, refused without one) or `cpu` (also on a GPU machine). See mtmoe.device."""
    bf16: Optional[bool] = None
    """bf16 autocast for forward/backward (bf16 compute, fp32 master weights and Adam state); None
    (default): on a GPU with bf16, off on a CPU (fast there only with avx512_bf16)."""
    gpu_memory_gib: float = 0.0
    """Caps the GPU memory each rank's allocator may hold (0 = no cap), as if the GPU were that
    small: beyond it an allocation fails with CUDA's out-of-memory error. For finding what fits a
    smaller GPU quickly (scripts/bench_scale.py --device cuda); refused when the rank trains on the
    CPU. The run's results.json reports the peak held (`peak_gpu_memory_gib`)."""
    accumulate: int = 1
    """Micro-batches per optimizer step and rank (gradient accumulation): the global batch is
    world size x accumulate token-budget batches, and the loss is normalised by its target tokens,
    so world 1 x accumulate 2 computes the same update as world 2 x accumulate 1."""
    zero_stage: int = choice(0, ZeroStage)
    """0-2: DeepSpeed's native MoE with expert parallelism. 3: every parameter, experts included,
    is partitioned over all ranks (no expert parallelism: moe.ep_size must be 1), which is what
    lets parameters live on NVMe (`parallel=zero3_nvme`)."""
    offload_optimizer: str = choice("none", Offload)
    """`cpu`: optimizer state and step on the CPU (DeepSpeedCPUAdam; ZeRO 1-3). `nvme`: Adam state
    swapped to `train.nvme_path` (ZeRO-3 only)."""
    offload_param: str = choice("none", Offload)
    """`cpu` or `nvme`: parameters live off the accelerator between uses (ZeRO-3 only)."""
    nvme_path: str = ""
    """Where NVMe offload swaps: '' = `<run dir>/nvme_swap`, else a folder of the run's own under this
    path (`mtmoe-<hash of the run dir>`, so runs may share one); removed when the run ends."""
    nvme_buffer_mib: int = 64
    """Size of each of DeepSpeed's pinned parameter swap buffers (aio `buffer_size`); the largest single
    parameter must fit in one, so big experts need more."""
    threads: int = 0
    """torch threads per rank; 0 = auto (`mtmoe.device.rank_threads`): 1 on a CPU rank (one thread per
    rank is the fast layout of a small CPU box), on a GPU rank the node's cores shared among its ranks
    (DeepSpeed's CPU Adam under `offload_optimizer=cpu` runs on them)."""
    log_every: int = 20
    valid_every: int = 1000
    """Steps between validations (per-direction loss on `data.val_lines` lines); 0 = only at the end."""
    valid_bleu: str = choice("final", ValidBleu)
    """Greedy BLEU/chrF in validation: `final` (the last validation only), `always`, or `never`."""
    valid_model: str = choice("auto", ValidModel)
    """Under ZeRO-3 (`train.zero_stage=3`), what validation runs: `whole`, a copy of the whole model on
    rank 0's device, gathered one parameter at a time and dropped afterwards; `partitioned`, the
    partitioned model itself on every rank in lock-step, which gathers each layer's parameters at
    every forward, i.e. at every greedy decoding step (3-5x slower on a CPU, measured by
    scripts/bench_zero3_validation.py); `auto`, `whole` when the fp32 weights take at most a quarter
    of the memory free on rank 0's device. Other stages validate the model as it is."""
    save_every: int = 1000
    """Steps between DeepSpeed checkpoints; 0 = only at the end; -1 = never (benchmarks)."""
    resume: bool = True
    """Re-running a command in the same run dir (`hydra.run.dir=...`) resumes from its newest good checkpoint."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest N, >= 1); 2 or more give a corrupt newest one a fallback."""
    snapshots: int = 0
    """Checkpoints saved at evenly spaced points of the budget's last `snapshot_span` fraction, from
    its start to the end of the run (besides the `save_every` ones), marked as snapshots: the run
    keeps its newest `keep_checkpoints` checkpoints and its newest `snapshots` snapshots, so all of
    them stay, and `mtmoe-export average=N` of the run averages the weights of its newest N
    snapshots. 0 = none."""
    snapshot_span: float = 0.1
    """The fraction of the budget (steps or training time, as `cooldown`) the snapshots spread over."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss (each is withheld: no update;
    noticed at the next log record, `mtmoe.train.guard`); 0 = never stop."""
    progress: bool = True
    plot: bool = True
    """Write `train_curves.png` (loss and validation curves) at the end of the run: ~1 s of matplotlib,
    worth leaving out of sweeps of many short jobs."""


@dataclass
class ScheduleConfig:
    kind: str = choice("constant", ScheduleKind)
    """How the share of auxiliary tasks (denoising) moves: constant, linear, stepwise, curriculum."""
    start: float = 0.0
    end: float = 0.0
    steps: int = 0
    """Steps over which `linear`/`curriculum` go from `start` to `end`."""
    milestones: list[list[float]] = field(default_factory=list)
    """`stepwise`: [[step, share], ...]."""


@dataclass
class InitConfig:
    from_dense: Optional[str] = None
    """Experts from Dense: a trained dense run dir (or export) of the same shape; every expert starts
    as its layer's dense FFN, gates start fresh."""
    aggregate: Optional[list[str]] = None
    """Aggregation of Experts: two trained MoE runs (or exports) of the same shape whose expert counts
    add up to moe.num_experts; experts and gate rows concatenated, shared weights averaged."""
    from_moe: Optional[str] = None
    """Every weight from a trained MoE run (or unpruned export) of the same shape and expert count,
    e.g. to fine-tune a normal MoE model into pre-gated form (`moe.pregate=true`)."""
    noise: float = 0.0
    """EfD: Gaussian noise added to each expert copy, as a fraction of the weight's std."""


@dataclass
class LaunchConfig:
    ranks: int = 0
    """> 0: this Hydra job starts `deepspeed --num_gpus <ranks>` for itself and waits (one launch
    per job, so multirun sweeps over distributed jobs work); 0: train in this process (world of
    one, or the ranks a `deepspeed` launcher started)."""
    launcher_args: str = ""
    """Extra `deepspeed` launcher arguments, e.g. `--hostfile hosts --num_nodes 2 --master_port 29600`."""


@dataclass
class TranslationParams:
    """`tasks.translation`."""
    lines: dict[str, int] = field(default_factory=dict)
    """Per-direction line limits, e.g. `{cs-en: 3000, en-cs: 3000}` (low-resource simulations):
    the direction draws only the first N usable lines."""

    def __post_init__(self):
        for direction, n in self.lines.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"lines.{direction}={n!r} must be a whole number >= 1 (the direction's first N lines)")


@dataclass
class DenoisingParams:
    """`tasks.denoising`."""
    langs: list[str] = field(default_factory=list)
    """Languages to denoise (default: every training language)."""
    mask_ratio: float = 0.35
    poisson_lambda: float = 3.5
    permute_sentences: bool = False

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio} must be in (0, 1)")
        if not self.poisson_lambda > 0:
            raise ValueError(f"poisson_lambda={self.poisson_lambda} must be > 0 (the mean span length; at 0 every "
                             f"span would be an inserted <mask> and nothing would be masked)")


TASK_PARAMS: dict[str, type] = {"translation": TranslationParams, "denoising": DenoisingParams}
"""The parameter schema of each training task (`tasks.<name>`); a task added in
`mtmoe/data/tasks/` registers its own with `register_task` there."""


def task_names() -> list[str]:
    return sorted(TASK_PARAMS)


def parse_task_params(name: str, raw: Optional[dict[str, Any]]):
    """The task's params dataclass from its config dict; unknown keys are an error naming them."""
    if name not in TASK_PARAMS:
        raise ConfigError(f"tasks.{name}: unknown task (known: {task_names()})")
    params_cls = TASK_PARAMS[name]
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"tasks.{name}: unknown parameter(s) {unknown} (known: {sorted(known)})")
    try:
        return params_cls(**raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tasks.{name}: {e}") from e


@dataclass
class TrainAppConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    init: InitConfig = field(default_factory=InitConfig)
    tasks: dict[str, Any] = field(default_factory=lambda: {"translation": {}})
    """Training tasks and their parameters (`mtmoe/data/tasks/`), e.g. `{translation: {},
    denoising: {langs: [cs]}}`; the `tasks/` config group has presets."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed JSON keys merged last over the generated DeepSpeed config."""


@dataclass
class ServeConfig:
    experts_per_layer: Optional[float] = None
    """Experts of each MoE layer kept in fast memory: a count (>= 1) or a fraction of the layer's
    experts (< 1, rounded up), at least moe.top_k. None (default): every expert resident, the
    plain model, no serving runtime."""
    prefetch: str = choice("none", PrefetchPolicy)
    """How the next MoE layer's experts are loaded ahead of time: `none` (on demand only),
    `speculative` (the next layer's router applied to this layer's input), `pregate` (the plan of a
    model trained with moe.pregate=true), `language` (each layer's cache seeded and held with the
    experts the request's direction uses most, from the export's routing statistics; the router of
    each MoE layer applied ahead for every token, at up to two points before the layer; a call's
    missing experts streamed while its others compute)."""
    budget: str = choice("model", ServeBudget)
    """Whose slots the resident experts take: `model` (default: all MoE layers share
    experts_per_layer x their number; a prediction may take the least recently used slot of any
    layer, a miss only while its layer holds less than its share; so the encoder, which runs once
    per sentence and needs most of its experts then, and the decoder, which needs few per step,
    take turns) or `layer` (each MoE layer keeps its own experts_per_layer slots).
    scripts/bench_serve.py --budgets layer model compares them."""
    store_dir: Optional[str] = None
    """Where the expert store `experts.safetensors` is written on first use; default: the export dir."""
    slow_gbps: float = 0.0
    """Simulated slow-tier bandwidth in GB/s for benchmarks: one channel of that bandwidth, shared
    by every expert read (on-demand loads and prefetches queue for it); 0 = as fast as the store
    file reads (often the OS page cache)."""


@dataclass
class SubsetConfig:
    mass: Optional[float] = None
    """Load only the experts carrying this share of the direction's routing (e.g. 0.9), per MoE
    layer, from the routing statistics stored in the export; None: every expert. mtmoe-eval picks a
    subset per direction."""


@dataclass
class TuneConfig:
    on: Optional[str] = None
    """Corpus prefix (e.g. data/multi30k/val) on which the decoding settings are picked before the
    test set is scored: each (beam, length penalty) of the grid decodes the first `lines` lines of
    every scored direction, and the one with the best mean BLEU decodes the test set. None: no tuning."""
    beams: Optional[list[int]] = None
    """Beam sizes tried; None: `beam` alone."""
    length_penalties: list[float] = field(default_factory=lambda: [0.6, 1.0, 1.4])
    """Length penalties tried (a hypothesis scores sum log p / (length + 1)^penalty)."""
    lines: int = 200
    """Lines per direction of `on` decoded for each setting (0 = all)."""


@dataclass
class EvalAppConfig:
    model: str = "???"
    """Export directory (config.json, model.safetensors, spm.model)."""
    test: str = "data/multi30k/test_2016_flickr"
    """Corpus prefix: files `{test}.{lang}[.gz]`."""
    langs: Optional[list[str]] = None
    directions: Any = None
    """A list `[en-de,de-en]`, a string `en-de,de-en`, or `all`; default: the directions the model was
    trained on (its config.json `training` record; every direction for older exports) among `langs`.
    Directions outside that record are scored as zero-shot and reported apart."""
    beam: int = 4
    length_penalty: float = 1.0
    max_tokens: int = 4096
    limit: int = 0
    """Score only the first N lines (0 = all)."""
    out: Optional[str] = None
    telemetry: bool = False
    """Also record routing telemetry on the test set (teacher-forced): `<out stem>.telemetry.json` + `.png`."""
    workers: int = 1
    """Decoding processes (directions are shared out); each uses `threads` threads (default 1)."""
    threads: int = 0
    """torch threads per process; 0 = torch default (1 per worker when workers > 1)."""
    device: str = "auto"
    """Where the model runs: `auto` (the GPU when CUDA is there, else the CPU), `cpu`, `cuda`, `cuda:N`."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Serving with only some experts resident (`serve.experts_per_layer`, `serve.prefetch`); see mtmoe.serve."""
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    """Per-direction expert subsets at load time (`subset.mass`); see mtmoe.export.subset."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Pick `beam` and `length_penalty` on a held-out set (`tune.on`) first; see mtmoe.eval.tune."""


@dataclass
class PruneConfig:
    keep: Optional[float] = None
    """Keep this many experts per layer (>= 1) or this fraction of them (< 1), chosen by `rule`."""
    rule: str = choice("loss", PruneRule)
    """How `keep` chooses, per MoE layer: `loss` (the experts whose removal raises the teacher-forced
    calibration loss least, mean + worst direction; measured, ~1 pass over `loss_lines` lines per
    direction for each candidate set), `coverage` (every language keeps as much of its routing
    share as possible: encoder layers by source, decoder layers by target language) or `global`
    (the largest overall routing share)."""
    direction: Optional[str] = None
    """Per-direction pruning, e.g. `en-de`: keep the experts carrying `mass` of its routing."""
    mass: float = 0.9
    calibration: str = "data/multi30k/val"
    """Corpus prefix whose routing telemetry decides what is kept (and gives the stored routing
    statistics, `routing_stats`)."""
    lines: int = 300
    """Calibration lines per direction (0 = all): ~4k tokens per direction and layer is plenty for
    routing shares, and telemetry over all 12 x 1014 val pairs costs minutes on a CPU."""
    loss_lines: int = 100
    """Calibration lines per direction for `rule=loss` (each candidate set is one teacher-forced pass
    over them)."""
    per_layer: bool = False
    """`rule=loss`: keep the same number of experts in every MoE layer, instead of `keep` of the
    model's experts spent where the measured loss says (mtmoe.export.calibrate)."""


@dataclass
class ExportAppConfig:
    checkpoint: str = "???"
    """A training run dir (its latest checkpoint), a checkpoint tag dir, or an existing export dir."""
    out: str = "???"
    overwrite: bool = False
    """Replace an existing export at `out` (otherwise an existing export is never touched)."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: str = choice("none", Quant)
    """Expert weight quantization: none, int8 or int4 (`QUANT_BITS`)."""
    device: str = "auto"
    """Where calibration (routing statistics, the `loss` pruning rule) runs: `auto`, `cpu`, `cuda`, `cuda:N`.
    The export itself is written from host memory."""
    average: int = 1
    """Export the mean of the weights of the run's newest N checkpoints (up to the one exported; see
    `train.snapshots`); 1 = that checkpoint alone."""
    routing_stats: bool = True
    """Store the exported model's routing statistics on `prune.calibration` (`prune.lines` lines per
    direction) as routing.json: per-direction subsets (`subset.mass`) and language-aware serving
    (`serve.prefetch=language`) read them."""


def prune_config(prune: PruneConfig | dict) -> PruneConfig:
    """`prune` as a PruneConfig: export_run's callers may give a dict of its fields (None = the
    field's default); an unknown key is refused, naming it."""
    if isinstance(prune, PruneConfig):
        return prune
    check_keys(prune, [f.name for f in dataclasses.fields(PruneConfig)], "prune.")
    return PruneConfig(**{k: v for k, v in prune.items() if v is not None})


def pruning_requested(prune: PruneConfig) -> bool:
    """Whether `prune` prunes: by `keep` (over the model) or by `direction`."""
    return prune.keep is not None or bool(prune.direction)


def validate_prune(prune: PruneConfig) -> None:
    """Rejects a `prune.*` combination that cannot be carried out, or one with a setting that the
    chosen way of pruning does not use (it would be ignored without a word), before any work.
    `calibration` and `lines` also give the stored routing statistics: they always apply."""
    check_choices(prune, "prune.")
    default = PruneConfig()
    if prune.keep is not None and prune.direction:
        raise ConfigError("set prune.keep (global) or prune.direction (per direction), not both")
    keep = prune.keep
    if keep is not None and (keep <= 0 or (keep >= 1 and keep != int(keep))):
        raise ConfigError(f"prune.keep={keep}: give a number of experts per layer (a whole number >= 1) or a "
                          f"fraction of them (0 < keep < 1)")
    if not 0 < prune.mass <= 1:
        raise ConfigError(f"prune.mass={prune.mass} must be in (0, 1] (the share of a direction's routing kept)")
    for name in ("lines", "loss_lines"):
        if getattr(prune, name) < 0:
            raise ConfigError(f"prune.{name}={getattr(prune, name)} must be >= 0 (0 = all lines)")
    if prune.direction is not None:
        parts = prune.direction.split("-")
        if "," in prune.direction or len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise ConfigError(f"prune.direction={prune.direction}: give one direction like en-de (a subset per "
                              f"direction; `all`, `pivot` or lists are not directions)")
    if prune.direction:
        used = {"mass"}
    elif keep is not None:
        used = {"rule"} | ({"loss_lines", "per_layer"} if prune.rule == "loss" else set())
    else:
        used = set()
    ignored = [f"prune.{name}={getattr(prune, name)}" for name in ("rule", "mass", "loss_lines", "per_layer")
               if name not in used and getattr(prune, name) != getattr(default, name)]
    if ignored:
        how = (f"prune.direction={prune.direction} keeps `mass` of its routing" if prune.direction
               else f"prune.rule={prune.rule} does not use them" if keep is not None
               else "nothing is pruned without prune.keep or prune.direction")
        raise ConfigError(f"{', '.join(ignored)}: not used ({how})")


@dataclass
class TranslateAppConfig:
    model: str = "???"
    src: str = "???"
    tgt: str = "???"
    beam: int = 4
    length_penalty: float = 1.0
    batch_lines: int = 64
    threads: int = 0
    device: str = "auto"
    """Where the model runs: `auto` (the GPU when CUDA is there, else the CPU), `cpu`, `cuda`, `cuda:N`."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Serving with only some experts resident (`serve.experts_per_layer`, `serve.prefetch`); see mtmoe.serve."""
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    """Only the experts this direction needs (`subset.mass`); see mtmoe.export.subset."""


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainAppConfig)
    cs.store(name="eval_schema", node=EvalAppConfig)
    cs.store(name="export_schema", node=ExportAppConfig)
    cs.store(name="translate_schema", node=TranslateAppConfig)


RUN_DEFINING = {
    "model": ("d_model", "n_heads", "d_ff", "encoder_layers", "decoder_layers", "activation", "positions",
              "max_positions"),
    "moe": ("enabled", "num_experts", "top_k", "every", "pregate"),
    "vocab": ("vocab_size", "spm_model_type", "spm_sample_lines"),
}
"""The settings that define a run's weights (its model.json): resuming with other values is refused
(`train/checkpoint.py`). The other model/MoE settings (dropout, capacity factors, loss weights, RTS,
ep_size) are training choices a resumed run may change; `vocab` are the `data.*` settings that
decide the vocabulary (besides the languages and the training text)."""


def check_keys(given: Iterable[str], known: Sequence[str], prefix: str = "") -> None:
    """ConfigError naming the first of `given` that is not in `known` (with the closest known key)."""
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(known)}"
            raise ConfigError(f"{prefix}{key}: unknown key ({hint})")


def check_known_keys(obj: Any, prefix: str = "") -> None:
    """Rejects keys a typed section does not have, e.g. `+train.max_step=5` (OmegaConf keeps a key
    added with `+` as an extra attribute of the dataclass). Dict-typed fields (`tasks`, whose
    parameters the task plugins check, the raw `deepspeed` section, `moe.kept_experts`) take any key."""
    if not dataclasses.is_dataclass(obj):
        return
    known = [f.name for f in dataclasses.fields(obj)]
    check_keys(vars(obj), known, prefix)
    for name in known:
        check_known_keys(getattr(obj, name), f"{prefix}{name}.")


def _check_beam(beam: int) -> None:
    """The beam size eval and translate share."""
    if beam < 1:
        raise ConfigError(f"beam={beam} must be >= 1 (1 = greedy)")


def check_subset(subset: SubsetConfig, serve: ServeConfig) -> None:
    """`subset.*` in range and not combined with offloading (checked before any weight is read)."""
    if subset.mass is None:
        return
    if not 0 < subset.mass <= 1:
        raise ConfigError(f"subset.mass={subset.mass} must be in (0, 1]")
    if serve.experts_per_layer is not None:
        raise ConfigError("subset.mass and serve.experts_per_layer exclude each other: a subset holds its "
                          "experts resident; offload the full export instead")


TELEMETRY_NEEDS_OUT = ("telemetry=true needs out=FILE.json: the telemetry is written beside the report "
                       "(<out stem>.telemetry.json + .png)")


def validate_eval(cfg: EvalAppConfig) -> None:
    """Rejects an impossible `mtmoe-eval` config before any weight or text is read."""
    check_known_keys(cfg)
    check_choices(cfg)
    check_device_spec("device", cfg.device)
    _check_beam(cfg.beam)
    d = cfg.directions
    if d is not None and not (isinstance(d, str) or (isinstance(d, list) and all(isinstance(x, str) for x in d))):
        raise ConfigError(f"directions={d!r}: expected a list [en-de,de-en], a string 'en-de,de-en' or all")
    for name in ("limit", "workers", "threads"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 0")
    if cfg.max_tokens < 1:
        raise ConfigError(f"max_tokens={cfg.max_tokens} must be >= 1")
    if cfg.telemetry and not cfg.out:
        raise ConfigError(TELEMETRY_NEEDS_OUT)
    check_subset(cfg.subset, cfg.serve)
    check_tune(cfg.tune)


def check_tune(tune: TuneConfig) -> None:
    """`tune.*`: a non-empty grid of beams >= 1 and length penalties >= 0, lines >= 0."""
    if tune.on is None:
        return
    for beam in tune.beams or []:
        _check_beam(beam)
    if tune.beams is not None and not tune.beams:
        raise ConfigError("tune.beams=[]: give at least one beam size (or leave it unset: `beam` alone)")
    if not tune.length_penalties or any(lp < 0 for lp in tune.length_penalties):
        raise ConfigError(f"tune.length_penalties={list(tune.length_penalties)}: give one or more penalties >= 0")
    if tune.lines < 0:
        raise ConfigError(f"tune.lines={tune.lines} must be >= 0 (0 = all)")


def validate_translate(cfg: TranslateAppConfig) -> None:
    """Rejects an impossible `mtmoe-translate` config before the model is loaded."""
    check_known_keys(cfg)
    check_choices(cfg)
    check_device_spec("device", cfg.device)
    _check_beam(cfg.beam)
    if cfg.batch_lines < 1:
        raise ConfigError(f"batch_lines={cfg.batch_lines} must be >= 1")
    if cfg.threads < 0:
        raise ConfigError(f"threads={cfg.threads} must be >= 0 (0: torch's default)")
    check_subset(cfg.subset, cfg.serve)


def validate_export(cfg: ExportAppConfig) -> None:
    """Rejects an impossible `mtmoe-export` config before the checkpoint is read."""
    check_known_keys(cfg)
    check_choices(cfg)
    check_device_spec("device", cfg.device)
    validate_prune(cfg.prune)
    if cfg.average < 1:
        raise ConfigError(f"average={cfg.average} must be >= 1 (the number of newest checkpoints averaged)")


def validate_model(model: ModelConfig, moe: MoEConfig) -> None:
    """Checks the model/MoE fields that do not depend on the parallel layout."""
    check_choices(model, "model.")
    check_choices(moe, "moe.")
    for name in ("d_model", "n_heads", "d_ff", "encoder_layers", "decoder_layers", "max_positions"):
        if getattr(model, name) < 1:
            raise ConfigError(f"model.{name}={getattr(model, name)} must be >= 1")
    for name in ("dropout", "attention_dropout"):
        if not 0 <= getattr(model, name) < 1:
            raise ConfigError(f"model.{name}={getattr(model, name)} must be in [0, 1) (a probability)")
    for name in ("min_capacity", "aux_loss_weight", "z_loss_weight"):
        if getattr(moe, name) < 0:
            raise ConfigError(f"moe.{name}={getattr(moe, name)} must be >= 0")
    if model.d_model % model.n_heads:
        raise ConfigError(f"model.d_model={model.d_model} is not divisible by model.n_heads={model.n_heads}")
    for name in ("capacity_factor", "eval_capacity_factor"):
        if not math.isfinite(getattr(moe, name)):
            raise ConfigError(f"moe.{name}={getattr(moe, name)} must be a finite number (<= 0: no capacity limit)")
    if moe.enabled:
        if moe.num_experts < 1:
            raise ConfigError(f"moe.num_experts={moe.num_experts} must be >= 1")
        if moe.top_k > moe.num_experts:
            raise ConfigError(f"moe.top_k={moe.top_k} exceeds moe.num_experts={moe.num_experts}")
        if moe.every < 1:
            raise ConfigError(f"moe.every={moe.every} must be >= 1")
        if max(model.encoder_layers, model.decoder_layers) < moe.every:
            raise ConfigError(
                f"moe.every={moe.every} with {model.encoder_layers}+{model.decoder_layers} layers makes no layer an "
                f"MoE layer (every moe.every-th layer of a stack is one): set moe.every <= "
                f"{max(model.encoder_layers, model.decoder_layers)}, or moe.enabled=false for a dense model")
        for layer, ids in moe.kept_experts.items():
            ids = list(ids)
            if len(set(ids)) != len(ids) or not all(0 <= int(e) < moe.num_experts for e in ids):
                raise ConfigError(f"moe.kept_experts.{layer}={ids}: expert ids must be distinct and in "
                                  f"[0, moe.num_experts={moe.num_experts})")
            if len(ids) < moe.top_k:
                raise ConfigError(f"moe.kept_experts.{layer}={ids} keeps fewer experts than moe.top_k={moe.top_k} "
                                  "chooses per token")
        if moe.ep_size < 1 or moe.num_experts % moe.ep_size:
            raise ConfigError(
                f"moe.num_experts={moe.num_experts} is not divisible by moe.ep_size={moe.ep_size}")
        if moe.pregate and max(model.encoder_layers, model.decoder_layers) // moe.every < 2:
            raise ConfigError(
                f"moe.pregate=true needs two MoE layers in a stack (the first routes the second); with "
                f"moe.every={moe.every} and {model.encoder_layers}+{model.decoder_layers} layers there is one: "
                f"set moe.every=1")


def check_optimizer(t: TrainConfig) -> None:
    """The optimizer's and loss's numbers, checked before any data is read (torch and DeepSpeed would
    refuse some of them only after the data and the model are built, with a traceback)."""
    if not t.lr > 0:
        raise ConfigError(f"train.lr={t.lr} must be > 0")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
    if not 0 <= t.cooldown < 1:
        raise ConfigError(f"train.cooldown={t.cooldown} must be in [0, 1) (a fraction of the budget)")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas={list(t.betas)} must be two numbers in [0, 1)")
    if not t.adam_eps > 0:
        raise ConfigError(f"train.adam_eps={t.adam_eps} must be > 0")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
    if t.clip_norm < 0:
        raise ConfigError(f"train.clip_norm={t.clip_norm} must be >= 0 (0: no clipping)")


def validate(cfg: TrainAppConfig, world_size: int = 1) -> None:
    """Rejects impossible configs before any data is read or any process group is used."""
    check_known_keys(cfg)
    check_choices(cfg)
    validate_model(cfg.model, cfg.moe)
    if cfg.moe.enabled and world_size % cfg.moe.ep_size:
        raise ConfigError(
            f"world size {world_size} is not divisible by moe.ep_size={cfg.moe.ep_size} "
            f"(expert-parallel groups must tile the ranks)")
    t = cfg.train
    check_device_spec("train.device", t.device)
    for name in ("max_steps", "max_minutes"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 0 (0: no such budget)")
    if t.max_steps <= 0 and t.max_minutes <= 0:
        raise ConfigError("set train.max_steps or train.max_minutes: the run has no budget")
    for name in ("max_train_lines", "val_lines"):
        if getattr(cfg.data, name) < 0:
            raise ConfigError(f"data.{name}={getattr(cfg.data, name)} must be >= 0")
    if t.gpu_memory_gib < 0:
        raise ConfigError(f"train.gpu_memory_gib={t.gpu_memory_gib} must be >= 0 (0 = no cap)")
    if t.threads < 0:
        raise ConfigError(f"train.threads={t.threads} must be >= 0 (0 = auto: 1 per CPU rank, a GPU rank's share "
                          f"of the node's cores)")
    if t.max_tokens < max(16, cfg.data.max_len):
        raise ConfigError(f"train.max_tokens={t.max_tokens} is smaller than data.max_len={cfg.data.max_len}: a "
                          f"sentence of that length would make a batch over the budget (raise train.max_tokens, or "
                          f"lower data.max_len)")
    check_optimizer(t)
    if t.zero_stage == 3 and cfg.moe.enabled and cfg.moe.ep_size != 1:
        raise ConfigError(
            f"train.zero_stage=3 with moe.ep_size={cfg.moe.ep_size}: unsupported. DeepSpeed's native MoE "
            f"(expert parallelism) refuses ZeRO-3; under ZeRO-3 mtmoe partitions every expert over all "
            f"ranks instead: set moe.ep_size=1 (parallel=zero3_nvme does)")
    if t.offload_param != "none" and t.zero_stage != 3:
        raise ConfigError(f"train.offload_param={t.offload_param} needs train.zero_stage=3 (got {t.zero_stage}): "
                          f"only ZeRO-3 partitions parameters")
    if t.accumulate < 1:
        raise ConfigError(f"train.accumulate={t.accumulate} must be >= 1")
    if t.offload_optimizer != "none" and t.zero_stage == 0:
        raise ConfigError(f"train.offload_optimizer={t.offload_optimizer} needs train.zero_stage 1, 2 or 3 "
                          f"(got 0): DeepSpeed offloads the optimizer of a ZeRO optimizer")
    if t.offload_optimizer == "nvme" and t.zero_stage != 3:
        raise ConfigError(f"train.offload_optimizer=nvme needs train.zero_stage=3 (got {t.zero_stage}): "
                          f"DeepSpeed swaps optimizer state to NVMe only under ZeRO-3")
    if t.nvme_buffer_mib < 1:
        raise ConfigError(f"train.nvme_buffer_mib={t.nvme_buffer_mib} must be >= 1")
    if cfg.data.temperature <= 0:
        raise ConfigError(f"data.temperature={cfg.data.temperature} must be > 0")
    if len(set(cfg.data.langs)) != len(cfg.data.langs) or len(cfg.data.langs) < 2:
        raise ConfigError(f"data.langs={list(cfg.data.langs)} must list at least two distinct languages")
    if cfg.data.max_len < 4:
        raise ConfigError(f"data.max_len={cfg.data.max_len} is too small (tag + token + </s> need 3)")
    if cfg.data.max_len > cfg.model.max_positions:
        raise ConfigError(f"data.max_len={cfg.data.max_len} exceeds model.max_positions={cfg.model.max_positions}: "
                          f"the model has no position for the longest batches")
    if t.log_every < 1:
        raise ConfigError(f"train.log_every={t.log_every} must be >= 1 (steps between log records)")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    if t.valid_every < 0:
        raise ConfigError(f"train.valid_every={t.valid_every} must be >= 0 (0 = only at the end)")
    if t.save_every < -1:
        raise ConfigError(f"train.save_every={t.save_every} must be >= -1 (0 = only at the end, -1 = never)")
    if t.snapshots < 0:
        raise ConfigError(f"train.snapshots={t.snapshots} must be >= 0")
    if t.snapshots and not 0 < t.snapshot_span < 1:
        raise ConfigError(f"train.snapshot_span={t.snapshot_span} must be in (0, 1) (a fraction of the budget)")
    if t.snapshots and t.save_every < 0:
        raise ConfigError(f"train.snapshots={t.snapshots} with train.save_every={t.save_every}: snapshots are "
                          f"checkpoints, and save_every=-1 saves none")
    if t.max_bad_steps < 0:
        raise ConfigError(f"train.max_bad_steps={t.max_bad_steps} must be >= 0")
    if cfg.init.from_dense or cfg.init.aggregate or cfg.init.from_moe:
        if sum(bool(x) for x in (cfg.init.from_dense, cfg.init.aggregate, cfg.init.from_moe)) > 1:
            raise ConfigError("init.from_dense, init.aggregate and init.from_moe exclude each other")
        if not cfg.moe.enabled:
            raise ConfigError("init.from_dense/init.aggregate/init.from_moe build an MoE model: moe.enabled must be true")
        if t.zero_stage == 3:
            raise ConfigError("init.from_dense/init.aggregate/init.from_moe with train.zero_stage=3: unsupported (under ZeRO-3 the "
                              "parameters are partitioned while the model is built, before weights could be copied in)")
        if cfg.init.aggregate is not None and len(cfg.init.aggregate) != 2:
            raise ConfigError(f"init.aggregate={list(cfg.init.aggregate)}: expected two runs")
    sch = cfg.schedule
    for name, value in (("start", sch.start), ("end", sch.end), *((f"milestones[{i}]", m[1] if len(m) == 2 else -1)
                                                                   for i, m in enumerate(sch.milestones))):
        if not 0 <= value <= 1:
            raise ConfigError(f"schedule.{name}: a share in [0, 1] (milestones are [step, share] pairs), got {value}")
    if sch.kind in ("linear", "curriculum") and sch.steps <= 0:
        raise ConfigError(f"schedule.kind={sch.kind} needs schedule.steps > 0")
    if not cfg.tasks:
        raise ConfigError("tasks: at least one training task is needed")
    for name, params in cfg.tasks.items():
        parse_task_params(name, params)
    if cfg.init.noise < 0:
        raise ConfigError(f"init.noise={cfg.init.noise} must be >= 0")
    if cfg.init.noise and not cfg.init.from_dense:
        raise ConfigError(f"init.noise={cfg.init.noise} only applies to init.from_dense (experts copied from "
                          f"one dense FFN); it would be ignored here")
