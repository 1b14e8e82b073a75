"""Typed experiment configuration.

One nested dataclass per concern; YAML files; dotted command-line overrides
(``--train.lr=3e-4``, ``--model.position.name=fire``, ``--model.position.options.init_L=64``);
validation that names the bad key and the allowed values; the resolved config is written
next to every run (``config.yaml``) and every checkpoint.

Rules:
* Every field has a default, so a YAML file states only what differs.
* Unknown keys are errors (a typo must not silently fall back to a default).
* Fields with a closed set of values declare it with ``choice(...)``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration or input: the message names the key (or file) and what is allowed.

    The base class of every expected error: ``megafire`` prints one ``error:`` line and exits
    2 (megafire.cli); any other exception is a bug and keeps its traceback.
    """


class MissingFileError(ConfigError, FileNotFoundError):
    """A file or directory named in the config or on the command line does not exist."""


def choice(default, *allowed, doc: str = ""):
    return field(default=default, metadata={"choices": tuple(allowed), "doc": doc})


@dataclass
class RunConfig:
    """Where a run lives and what it is called."""
    dir: str = "runs/default"
    name: str = ""


@dataclass
class PositionConfig:
    """Which position encoding and its options (passed to megafire.positional.build_encoding)."""
    name: str = "rope"
    options: dict = field(default_factory=dict)
    # rotary encodings: rotate q, k with the Triton kernel (auto: on CUDA) or the torch code
    fused_rotary: str = choice("auto", "auto", "true", "false")


@dataclass
class ModelConfig:
    """Decoder-only GPT: pre-norm RMSNorm, SwiGLU, no linear biases, GQA."""
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None      # None: = num_heads (MHA); fewer: grouped-query
    ffn_hidden_size: Optional[int] = None   # None: SwiGLU 8/3 * hidden rounded up to 64
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    linear_bias: bool = False
    max_positions: int = 1 << 20            # only learned absolute embeddings allocate this many
    position: PositionConfig = field(default_factory=PositionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return int(math.ceil(8 * self.hidden_size / 3 / 64) * 64)


@dataclass
class AttentionConfig:
    """How attention scores are computed (independent of which encoding makes the bias)."""
    backend: str = choice("auto", "auto", "reference", "sdpa", "fused", "flex")
    document_mask: bool = True              # mask attention across packed documents (segment ids)
    # the fused kernels' launch options per head dim over the committed ones, e.g. {64: {t5_diag: false}}:
    # each kernel optimization's off switch (megafire.attention.kernel_options; MEGAFIRE_FUSED_CONFIGS wins)
    fused_kernels: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """Corpus -> tokenizer -> shards -> loader."""
    corpus: str = "default"                 # "default" (embedded) or a JSONL(.gz) path
    tokenizer_dir: str = ""                 # "" -> {run.dir}/../data/tokenizer built on demand
    shards_dir: str = ""                    # "" -> built next to the tokenizer on demand
    tokenizer_type: str = choice("bpe", "bpe", "unigram")
    seq_len: int = 256                      # used when the curriculum has no stages
    reset_positions: bool = True            # positions restart at 0 at each packed document
    num_workers: int = 0


@dataclass
class StageConfig:
    """One curriculum stage: train at seq_len for this many tokens."""
    seq_len: int = 256
    tokens: int = 0


@dataclass
class CurriculumConfig:
    """Progressive-length training: stages in order; tokens per step constant throughout."""
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Optimization; every schedule is counted in tokens."""
    max_steps: int = 100
    tokens_per_step: int = 8192             # global: micro_batch * seq_len * grad_accum * dp
    micro_batch_tokens: int = 0             # 0: = tokens_per_step / dp (no accumulation)
    lr: float = 3e-4
    encoding_lr_scale: float = 1.0          # the position encodings' own parameters train at lr * this
    # bf16 with ZeRO-1: the position encodings' own parameters (FIRE's MLP, c, L; Kerple's r1, r2;
    # T5's table) and their gradients stay fp32 while the rest is cast to bf16 (megafire.train.engine)
    encoding_fp32: bool = False
    min_lr_ratio: float = 0.1
    warmup_tokens: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    seed: int = 1234
    checkpoint_every_steps: int = 0         # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    # resume when `latest` names a damaged checkpoint: false refuses; true moves it aside
    # (step_X.damaged-<time>) and resumes from the newest sound one (megafire.train.checkpoint)
    resume_fallback: bool = False
    # a step with a NaN/inf loss or gradient norm: its update is skipped (and counted), or training
    # stops; skip mode stops too after max_skipped_consecutive such steps in a row or more than
    # max(max_skipped_consecutive, max_skipped_fraction * steps done) in all (megafire.train.faults)
    nonfinite: str = choice("skip", "skip", "stop")
    max_skipped_consecutive: int = 5        # skip mode: stop after this many non-finite steps in a row
    max_skipped_fraction: float = 0.05      # skip mode: stop past max(max_skipped_consecutive, this * steps)
    log_every_steps: int = 1
    progress: bool = True


@dataclass
class ParallelConfig:
    """Tensor x pipeline x data parallel layout; data parallel = world / (tp * pp)."""
    tp: int = 1
    pp: int = 1
    zero_stage: int = choice(0, 0, 1, 2, 3)
    activation_checkpointing: bool = False
    sequence_parallel: bool = False


@dataclass
class PerfConfig:
    """Speed of the training step; every switch changes how, never what, is computed.

    ``auto`` turns an optimization on where it is known to help and to be safe: a CUDA
    device, tp = 1 without sequence parallelism, ZeRO 0-2 (the compiled regions trace
    through module hooks, which ZeRO-3 uses to gather parameters).
    """
    # torch.compile of each block (regional): with SDPA or the fused kernels one graph per block,
    # forward and backward; with the eager backends the two halves around the attention call
    compile: str = choice("auto", "auto", "true", "false")
    # cross entropy from bf16 logits in one compiled reduction (no fp32 [tokens, vocab] copies)
    fused_loss: str = choice("auto", "auto", "true", "false")
    # tp = 1: call the projections as plain F.linear instead of megatron's autograd Functions
    direct_linear: bool = True
    # the fused attention kernels launched by inductor's generated code inside a compiled block
    # (torch.library.triton_op); false: an opaque custom op whose Python body launches them
    inline_kernels: bool = True
    # ZeRO 1-2: the optimizer step's inf/NaN test and gradient norm as one multi-tensor norm each
    # instead of DeepSpeed's loops of small kernels per gradient (megafire.parallel.ds_compat)
    foreach_grad_checks: bool = True
    # each compiled block replays CUDA graphs (inductor's cudagraph trees, torch.compile mode
    # "reduce-overhead") instead of launching its kernels from Python; auto: on with compile on
    # CUDA, tp = 1, pp = 1, ZeRO 0-1, no activation checkpointing (megafire.model.perf)
    cuda_graphs: str = choice("auto", "auto", "true", "false")


@dataclass
class TrackingConfig:
    """MLflow: a sqlite store in the run directory unless uri points at a server."""
    enabled: bool = True
    uri: str = ""
    experiment: str = "megafire"


@dataclass
class EvalConfig:
    """Length generalization: perplexity at multiples of the training length."""
    length_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    max_windows: int = 16
    batch_size: int = 1


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # --- derived -------------------------------------------------------------------
    def stages(self) -> list[StageConfig]:
        """The curriculum stages, or one stage at data.seq_len covering max_steps."""
        if self.curriculum.stages:
            return list(self.curriculum.stages)
        return [StageConfig(seq_len=self.data.seq_len, tokens=self.train.max_steps * self.train.tokens_per_step)]

    @property
    def train_length(self) -> int:
        """The longest sequence length trained on (the '1x' of length-generalization eval)."""
        return max(s.seq_len for s in self.stages())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalar values (MLflow params)."""
        return flatten(self.to_dict())

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping -> {"model.position.options.init_L": 16, ...} (empty mappings and
    non-mappings are leaves)."""
    if not (isinstance(value, dict) and value):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# --- construction and validation ------------------------------------------------------
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads bare yes/no/on/off as booleans
            raise ConfigError(f"config key {key!r} must be a string, got {value!r} (YAML reads a bare "
                              f"yes/no/on/off/true/false as a boolean: quote the value)")
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(f"unknown config key(s) {', '.join(repr(f'{prefix}.{u}'.lstrip('.')) for u in unknown)} "
                          f"in {where}; allowed: {', '.join(fields)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}".lstrip(".")
        allowed = fields[name].metadata.get("choices")
        if allowed and isinstance(value, bool) and str(value).lower() in allowed:
            value = str(value).lower()   # YAML reads true/false as booleans; such choices spell them
        value = _coerce(value, hints[name], key)
        if allowed and value not in allowed:
            raise ConfigError(f"config key {key!r} = {value!r} is not allowed; allowed: "
                              f"{', '.join(map(str, allowed))}")
        kwargs[name] = value
    return cls(**kwargs)


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    if "name" in override and "options" in out and override.get("name") != out.get("name"):
        # a different position encoding does not inherit the options of the base's encoding
        out["options"] = {}
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_overrides(args: list[str]) -> dict:
    """``["--train.lr=3e-4", "--model.position.name", "fire"]`` -> nested dict (YAML-typed values)."""
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override like --section.key=value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 1
        i += 1
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str] | dict] = None) -> Config:
    """YAML file (optional) + overrides -> validated Config."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = " ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) or str(e)
            raise ConfigError(f"config file {where}: invalid YAML: {what}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        base = data.pop("base", None)
        if base is not None:   # an experiment arm names its base file and states only what differs
            parent = load_config(path.parent / base).to_dict()
            data = _deep_merge(parent, data)
    if overrides:
        data = _deep_merge(data, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


#: (key, lowest allowed, whether the lowest is excluded); None values (= automatic) are skipped
_RANGES = (
    ("model.vocab_size", 1, False), ("model.hidden_size", 1, False), ("model.num_layers", 1, False),
    ("model.num_heads", 1, False), ("model.num_kv_heads", 1, False), ("model.ffn_hidden_size", 0, False),
    ("model.norm_eps", 0, True), ("model.init_std", 0, False), ("model.max_positions", 1, False),
    ("data.seq_len", 1, False), ("data.num_workers", 0, False),
    ("train.max_steps", 1, False), ("train.tokens_per_step", 1, False), ("train.micro_batch_tokens", 0, False),
    ("train.lr", 0, True), ("train.min_lr_ratio", 0, False), ("train.warmup_tokens", 0, False),
    ("train.weight_decay", 0, False), ("train.beta1", 0, False), ("train.beta2", 0, False),
    ("train.grad_clip", 0, False), ("train.checkpoint_every_steps", 0, False),
    ("train.keep_checkpoints", 0, False), ("train.log_every_steps", 0, False),
    ("eval.max_windows", 1, False), ("eval.batch_size", 1, False),
)
#: keys with an upper bound too: (key, highest allowed, whether it is excluded)
_UPPER = (("train.min_lr_ratio", 1, False), ("train.beta1", 1, True), ("train.beta2", 1, True))


def _check_ranges(cfg: Config) -> None:
    def get(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)
    for key, low, open_ in _RANGES:
        value = get(key)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (open_ and value == low):
            need = f"> {low}" if open_ else (">= 1" if low == 1 else f">= {low}")
            raise ConfigError(f"{key} must be {need}, got {value}")
    for key, high, open_ in _UPPER:
        value = get(key)
        if value > high or (open_ and value == high):
            raise ConfigError(f"{key} must be {'<' if open_ else '<='} {high}, got {value}")
    for i, multiple in enumerate(cfg.eval.length_multiples):
        if multiple <= 0:
            raise ConfigError(f"eval.length_multiples[{i}] must be >= 1, got {multiple}")


def _check_position(position: PositionConfig) -> None:
    """The encoding name and its option names against the registry (megafire.positional)."""
    import inspect

    from megafire.positional.registry import encoding_class   # imports torch: only when validating
    try:
        cls = encoding_class(position.name)
    except ValueError as e:
        raise ConfigError(f"model.position.name: {e}") from None
    params = inspect.signature(cls.__init__).parameters   # what build_encoding accepts
    accepted = sorted(n for n, p in params.items() if n not in ("self", "num_heads", "head_dim")
                      and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    unknown = sorted(set(position.options) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(f'model.position.options.{u}' for u in unknown)} for "
                          f"position encoding {position.name!r}; allowed: {', '.join(accepted) or '(none)'}")


def validate(cfg: Config) -> None:
    """Cross-field checks; each error names the keys involved."""
    _check_ranges(cfg)
    _check_position(cfg.model.position)
    if cfg.attention.fused_kernels:
        from megafire.attention.kernel_options import check_overrides
        try:
            checked = check_overrides(cfg.attention.fused_kernels, "attention.fused_kernels")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # string head dims, checked values; launch tuples as lists (the saved config.yaml is safe YAML)
        cfg.attention.fused_kernels = {d: {k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()}
                                       for d, entry in checked.items()}
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={kv}")
    p = cfg.parallel
    for key in ("tp", "pp"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    if m.num_heads % p.tp or kv % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide model.num_heads={m.num_heads} and model.num_kv_heads={kv}")
    if p.pp > 1 and m.num_layers < p.pp:
        raise ConfigError(f"parallel.pp={p.pp} exceeds model.num_layers={m.num_layers}")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.pp={p.pp} works with parallel.zero_stage 0 or 1 only "
                          f"(DeepSpeed pipelines do not support ZeRO-2/3), got {p.zero_stage}")
    t = cfg.train
    if t.max_skipped_consecutive < 1:
        raise ConfigError(f"train.max_skipped_consecutive must be >= 1, got {t.max_skipped_consecutive} "
                          f"(to stop at the first non-finite step set train.nonfinite=stop)")
    if not 0.0 <= t.max_skipped_fraction <= 1.0:
        raise ConfigError(f"train.max_skipped_fraction must be in [0, 1], got {t.max_skipped_fraction}")
    for i, s in enumerate(cfg.curriculum.stages):
        if s.seq_len <= 0 or s.tokens <= 0:
            raise ConfigError(f"curriculum.stages[{i}] needs seq_len > 0 and tokens > 0, got {s}")
        if cfg.train.tokens_per_step % s.seq_len:
            raise ConfigError(f"train.tokens_per_step={cfg.train.tokens_per_step} must be a multiple of "
                              f"curriculum.stages[{i}].seq_len={s.seq_len} (tokens per step are held constant)")
    if not cfg.curriculum.stages and cfg.train.tokens_per_step % cfg.data.seq_len:
        raise ConfigError(f"train.tokens_per_step={cfg.train.tokens_per_step} must be a multiple of "
                          f"data.seq_len={cfg.data.seq_len}")
    if cfg.train.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be positive, got {cfg.train.max_steps}")
    if not cfg.train.encoding_lr_scale > 0:
        raise ConfigError(f"train.encoding_lr_scale must be positive, got {cfg.train.encoding_lr_scale}")
    if t.encoding_fp32 and (t.precision != "bf16" or p.zero_stage != 1 or p.pp > 1):
        raise ConfigError("train.encoding_fp32=true needs train.precision=bf16, parallel.zero_stage=1 and "
                          f"parallel.pp=1 (the one layout where DeepSpeed was checked to keep them fp32); got "
                          f"precision={t.precision}, zero_stage={p.zero_stage}, pp={p.pp}")
