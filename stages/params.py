"""The schema of params.yaml: one typed dataclass per section, a docstring per field, validated on load.

Every stage calls `load_section(name)` first, so an unknown key, a wrong type or an out-of-range value stops the
run before any work with a one-line error naming the key (e.g. `windows.horizon: must be >= 1, got 0`).
Checks that need data (a context longer than the model has MoE layers) run where the data is first read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stages.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class CaptureParams:
    router_probs: bool = _doc("Store the full router distribution per MoE layer (float16).", False)
    hidden_states: bool = _doc("Store the hidden state entering each MoE layer (float16).", False)
    hidden_dim: int = _doc("Project stored hidden states to this many dims with a fixed random matrix; 0 = keep all.", 0)
    lookahead: int = _doc("Stale-gate look-ahead: for h = 1..H, the top-k that MoE layer l+h's router gives on layer l's input.", 0)


@dataclass
class CollectParams:
    model: str = _doc("Local checkpoint directory or Hugging Face hub id (loaded with Auto*.from_pretrained).", "models/tiny-moe")
    sources: list = _doc("Text sources, one domain each: python-docs, python-stdlib, {name, path} or {name, hf_dataset}.", factory=lambda: ["python-docs", "python-stdlib"])
    num_sequences: int = _doc("Sequences collected per source (domain).", 600)
    seq_len: int = _doc("Tokens per sequence (a chunk of one document; shorter last chunks are padded, not recorded).", 128)
    chunks_per_document: int = _doc("At most this many consecutive seq_len chunks are taken from one document.", 8)
    min_tokens: int = _doc("Chunks with fewer tokens than this are skipped.", 16)
    batch_size: int = _doc("Sequences per forward pass.", 16)
    sequences_per_chunk: int = _doc("Sequences per trace chunk file (the unit of resume after a crash).", 256)
    dtype: Literal["float32", "bfloat16", "float16"] = _doc("Model dtype.", "float32")
    device: str = _doc("cpu, cuda, cuda:N, or auto (device_map='auto' spreads a large model over all GPUs).", "cpu")
    seed: int = _doc("Seed for document order and chunk sampling.", 0)
    capture: CaptureParams = _doc("Optional captures beyond expert ids and gate weights.", factory=CaptureParams)
    mode: Literal["forward", "generate"] = _doc(
        "forward: one pass per sequence; generate: the sequence is a prompt (prefill), then greedy decoding with a KV cache; "
        "the routing of prompt and generated tokens is recorded (generated=True for the latter).", "forward"
    )
    max_new_tokens: int = _doc("generate mode: decode steps per sequence, one generated token each (fewer if EOS comes first).", 32)
    # YAML key `import` (a Python keyword): `_build` maps it through the field's metadata "key".
    import_glob: str | None = field(default=None, metadata={"key": "import", "doc": (
        "Glob of routing records (.jsonl, .csv, .parquet; stages/importer.py) imported instead of running a model; null = run the model.")})
    num_experts: int = _doc("With import: routed experts per MoE layer; 0 = infer as the largest expert id + 1.", 0)

    def validate(self) -> None:
        _positive("collect", self, "num_sequences", "seq_len", "chunks_per_document", "min_tokens", "batch_size", "sequences_per_chunk",
                  "max_new_tokens")
        if self.num_experts < 0:
            raise PipelineError(f"collect.num_experts: must be >= 0 (0 = infer), got {self.num_experts}")
        if self.import_glob is not None and not self.import_glob.strip():
            raise PipelineError("collect.import: empty glob; give a path pattern or null")
        if not self.sources:
            raise PipelineError("collect.sources: must list at least one source")
        if self.sequences_per_chunk % self.batch_size:
            raise PipelineError(
                f"collect.sequences_per_chunk: must be a multiple of collect.batch_size ({self.batch_size}), got {self.sequences_per_chunk}"
            )
        if self.min_tokens > self.seq_len:
            raise PipelineError(f"collect.min_tokens: must be <= collect.seq_len ({self.seq_len}), got {self.min_tokens}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise PipelineError(f"collect.device: {self.device!r} is not one of cpu, cuda, cuda:N, auto")
        for name in ("hidden_dim", "lookahead"):
            if getattr(self.capture, name) < 0:
                raise PipelineError(f"collect.capture.{name}: must be >= 0, got {getattr(self.capture, name)}")


@dataclass
class ShardParams:
    rows_per_shard: int = _doc("Token rows per Parquet shard.", 100_000)

    def validate(self) -> None:
        _positive("shard", self, "rows_per_shard")


@dataclass
class SplitParams:
    by: Literal["sequence", "domain"] = _doc("Split whole documents at random (sequence) or hold out a domain as test.", "sequence")
    test_domain: str | None = _doc("With by: domain, the domain held out as the test split.", None)
    fractions: list = _doc("train/val/test shares of documents (by: sequence) or train/val of the rest (by: domain).", factory=lambda: [0.8, 0.1, 0.1])
    seed: int = _doc("Seed of the split.", 0)

    def validate(self) -> None:
        want = 3 if self.by == "sequence" else 2
        if len(self.fractions) != want or any(not isinstance(f, (int, float)) or f < 0 for f in self.fractions):
            raise PipelineError(f"windows.split.fractions: by {self.by} needs {want} non-negative numbers, got {self.fractions}")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise PipelineError(f"windows.split.fractions: must sum to 1, got {self.fractions} (sum {sum(self.fractions):g})")
        if self.by == "domain" and not self.test_domain:
            raise PipelineError("windows.split.test_domain: required when windows.split.by is domain")


@dataclass
class WindowsParams:
    context_length: int = _doc("MoE layers of routing history in a context, ending at layer l.", 3)
    horizon: int = _doc("The target is MoE layer l + horizon.", 1)
    split: SplitParams = _doc("How documents are split into train/val/test.", factory=SplitParams)
    token_context: int = _doc(
        "Previous tokens i-T..i-1 whose routing at the context layers and at the target layer each window carries "
        "(column token_context_experts, -1 before the sequence start); 0 = none. Diagram: stages/window_data.py.", 0)
    token_horizon: int = _doc(
        "Next tokens i+1..i+H whose target-layer routing each window carries (next_token_experts/weights, -1/0 after "
        "the sequence end) for the hybrid's temporal head; the target stays token i's own. 0 = none.", 0)

    def validate(self) -> None:
        _positive("windows", self, "context_length", "horizon")
        for name in ("token_context", "token_horizon"):
            if getattr(self, name) < 0:
                raise PipelineError(f"windows.{name}: must be >= 0, got {getattr(self, name)}")
        self.split.validate()


@dataclass
class LookupParams:
    max_context: int = _doc("Longest context (in layers, <= windows.context_length) the table keys on; shorter ones are back-offs.", 3)


@dataclass
class SpeculationTransformerParams:
    d_model: int = _doc("Width of expert and position embeddings.", 96)
    heads: int = _doc("Attention heads.", 4)
    ff: int = _doc("Feed-forward width.", 192)
    layers: int = _doc("Transformer encoder layers.", 2)
    dropout: float = _doc("Dropout.", 0.1)

    def validate(self) -> None:
        _positive("train.speculation_transformer", self, "d_model", "heads", "ff", "layers")
        if self.d_model % self.heads:
            raise PipelineError(f"train.speculation_transformer.d_model: {self.d_model} is not divisible by heads ({self.heads})")


def _check_network(prefix: str, section: Any, sizes: tuple[str, ...] = (), lists: tuple[str, ...] = ()) -> None:
    """Positive sizes, non-empty lists of positive integers, dropout in [0, 1)."""
    _positive(prefix, section, *sizes)
    for name in lists:
        value = getattr(section, name)
        if not value or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value):
            raise PipelineError(f"{prefix}.{name}: must be a non-empty list of integers >= 1, got {value}")
    if not 0 <= getattr(section, "dropout", 0) < 1:
        raise PipelineError(f"{prefix}.dropout: must be in [0, 1), got {section.dropout}")


@dataclass
class MLPParams:
    prefix = "train.mlp"  # not a field (no annotation): the key errors name; subclasses reuse the checks
    embedding_dim: int = _doc("Width of each context expert's and the target layer's embedding.", 32)
    hidden: list = _doc(
        "Hidden layer widths (GELU). At E=16, k=2, c=3: tiny ~17K parameters = embedding_dim 16, hidden [128]; "
        "small ~39K = 32, [128, 64]; regularised ~208K = 48, [384, 192] with dropout 0.3.", factory=lambda: [128, 64])
    dropout: float = _doc("Dropout after each hidden layer.", 0.0)

    def validate(self) -> None:
        _check_network(self.prefix, self, ("embedding_dim",), ("hidden",))


@dataclass
class LSTMParams:
    embedding_dim: int = _doc("Width of expert embeddings and of each context layer's input vector.", 32)
    hidden_size: int = _doc("LSTM hidden state width.", 64)
    layers: int = _doc("Stacked LSTM layers.", 1)
    dropout: float = _doc("Dropout between stacked LSTM layers and before the heads.", 0.0)

    def validate(self) -> None:
        _check_network("train.lstm", self, ("embedding_dim", "hidden_size", "layers"))


@dataclass
class LayerSpecificParams(MLPParams):
    prefix = "train.layer_specific"
    hidden: list = _doc("Hidden layer widths of the shared trunk (GELU).", factory=lambda: [128])


@dataclass
class MultiscaleParams:
    embedding_dim: int = _doc("Width of expert embeddings and of each context layer's vector.", 32)
    scales: list = _doc("Context lengths encoded separately (the last s context layers); each <= windows.context_length.",
                        factory=lambda: [1, 2, 3])
    width: int = _doc("Width of each scale's encoding and of the fused vector.", 64)
    dropout: float = _doc("Dropout before the heads.", 0.0)

    def validate(self) -> None:
        _check_network("train.multiscale", self, ("embedding_dim", "width"), ("scales",))


@dataclass
class EnsembleParams:
    members: list = _doc("Architectures combined (each trained in this run with its own train.<arch> section).",
                         factory=lambda: ["lookup", "mlp"])
    holdout_fraction: float = _doc("Share of train sequences kept out of member training to fit the mixing weights.", 0.1)
    mix_steps: int = _doc("Full-batch Adam steps fitting the per-target-layer mixing weights.", 200)

    def validate(self, architectures: dict) -> None:
        if not isinstance(self.members, list) or len(self.members) < 2:
            raise PipelineError(f"train.ensemble.members: must list at least 2 architectures, got {self.members}")
        for name in self.members:
            if name == "ensemble" or name not in architectures:
                accepted = ", ".join(sorted(set(architectures) - {"ensemble"}))
                raise PipelineError(f"train.ensemble.members: {name!r} cannot be a member; accepted: {accepted}")
        if len(set(self.members)) != len(self.members):
            raise PipelineError(f"train.ensemble.members: lists an architecture twice: {self.members}")
        if not 0 < self.holdout_fraction < 1:
            raise PipelineError(f"train.ensemble.holdout_fraction: must be in (0, 1), got {self.holdout_fraction}")
        _positive("train.ensemble", self, "mix_steps")


@dataclass
class HybridParams(MLPParams):
    prefix = "train.hybrid"
    hidden: list = _doc("Hidden layer widths of the shared trunk (GELU).", factory=lambda: [128, 64])
    temporal_tokens: int = _doc(
        "The temporal head predicts the target layer's experts of the next 1..this tokens (needs windows.token_horizon "
        ">= this; the prior research used 4); 0 = no temporal head.", 0)
    token_context: int = _doc("Previous tokens whose routing the model reads (needs windows.token_context >= this).", 0)
    temporal_weight: float = _doc("Weight of the temporal head's loss next to the current token's.", 0.5)

    def validate(self) -> None:
        super().validate()
        for name in ("temporal_tokens", "token_context", "temporal_weight"):
            if getattr(self, name) < 0:
                raise PipelineError(f"train.hybrid.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class HiddenMLPParams:
    layer_dim: int = _doc("Width of the target layer's embedding, concatenated to the normalised hidden state.", 16)
    hidden: list = _doc("Hidden layer widths (GELU).", factory=lambda: [256])
    dropout: float = _doc("Dropout after each hidden layer.", 0.1)
    routing_embedding_dim: int = _doc(
        "0: the hidden state only. N > 0: hidden+routing, also the routing context (the c context layers' experts, "
        "each slot embedded in N dims), joined to the hidden state.", 0)

    def validate(self) -> None:
        _check_network("train.hidden_mlp", self, ("layer_dim",), ("hidden",))
        if self.routing_embedding_dim < 0:
            raise PipelineError(f"train.hidden_mlp.routing_embedding_dim: must be >= 0 (0 = hidden state only), got {self.routing_embedding_dim}")


@dataclass
class TrainParams:
    arch: str = _doc("Predictor architecture (see stages/predictors/__init__.py ARCHITECTURES).", "mlp")
    epochs: int = _doc("Maximum epochs (learned predictors).", 12)
    batch_size: int = _doc("Windows per optimisation step (the global batch: split across processes under DDP).", 1024)
    lr: float = _doc("Peak learning rate (AdamW, cosine decay).", 2e-3)
    weight_decay: float = _doc("AdamW weight decay.", 0.01)
    patience: int = _doc("Stop after this many epochs without a better validation loss.", 3)
    max_train_windows: int = _doc("Subsample train windows to at most this many (0 = all).", 0)
    device: str = _doc("cpu, cuda or auto.", "cpu")
    seed: int = _doc("Seed of initialisation and batch order.", 0)
    stream_buffer: int = _doc(
        "0: read the whole train split into memory. N > 0: stream it from disk instead, reading its row groups in a "
        "random order and shuffling N windows at a time (memory ~ N windows, not the split), for splits larger than "
        "RAM. Neural archs only; not with max_train_windows.", 0)
    launcher: str = _doc(
        "The command dvc.yaml runs the train stage with: python (one process) or a distributed launcher, e.g. "
        "'accelerate launch --multi_gpu --num_processes 8' (DDP over 8 GPUs; on a CPU-only machine, 8 gloo "
        "processes). Read by dvc.yaml only.", "python")
    lookup: LookupParams = _doc("Hyper-parameters of arch lookup.", factory=LookupParams)
    speculation_transformer: SpeculationTransformerParams = _doc(
        "Hyper-parameters of arch speculation_transformer.", factory=SpeculationTransformerParams
    )
    mlp: MLPParams = _doc("Hyper-parameters of arch mlp.", factory=MLPParams)
    lstm: LSTMParams = _doc("Hyper-parameters of arch lstm.", factory=LSTMParams)
    layer_specific: LayerSpecificParams = _doc("Hyper-parameters of arch layer_specific.", factory=LayerSpecificParams)
    multiscale: MultiscaleParams = _doc("Hyper-parameters of arch multiscale.", factory=MultiscaleParams)
    ensemble: EnsembleParams = _doc("Members and mixing of arch ensemble.", factory=EnsembleParams)
    hybrid: HybridParams = _doc("Hyper-parameters of arch hybrid.", factory=HybridParams)
    hidden_mlp: HiddenMLPParams = _doc("Hyper-parameters of arch hidden_mlp.", factory=HiddenMLPParams)

    def validate(self) -> None:
        from stages.predictors import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise PipelineError(f"train.arch: unknown architecture {self.arch!r}; accepted: {', '.join(sorted(ARCHITECTURES))}")
        _positive("train", self, "epochs", "batch_size", "lr", "patience")
        if self.max_train_windows < 0:
            raise PipelineError(f"train.max_train_windows: must be >= 0, got {self.max_train_windows}")
        if self.stream_buffer < 0:
            raise PipelineError(f"train.stream_buffer: must be >= 0 (0 = in memory), got {self.stream_buffer}")
        if self.stream_buffer and self.max_train_windows:
            raise PipelineError(f"train.stream_buffer: {self.stream_buffer} streams the whole split; accepted with "
                                f"max_train_windows 0 only (got {self.max_train_windows})")
        if self.stream_buffer and self.arch in ("frequency", "lookup", "ensemble"):
            raise PipelineError(f"train.stream_buffer: {self.stream_buffer} streams neural archs only; {self.arch} counts "
                                f"its split in memory: set 0")
        if self.device not in ("cpu", "cuda", "auto"):
            raise PipelineError(f"train.device: {self.device!r} is not one of cpu, cuda, auto")
        _positive("train.lookup", self.lookup, "max_context")
        self.speculation_transformer.validate()
        for section in (self.mlp, self.lstm, self.layer_specific, self.multiscale, self.hybrid, self.hidden_mlp):
            section.validate()
        self.ensemble.validate(ARCHITECTURES)


@dataclass
class CacheParams:
    """Expert-cache prefetch simulation. Defaults model Mixtral-8x7B decoding with experts offloaded to CPU memory:
    an expert is 3 x 4096 x 14336 bf16 weights = 352,321,536 bytes (~336 MiB), moved over PCIe 4.0 x16 at a
    practical 25 GB/s (~14 ms each), while one MoE layer of a decode step computes in ~0.4 ms on a GPU
    (about 26 GB of active weights read at 2 TB/s over 32 layers)."""

    capacity: int = _doc("Experts the cache holds (per layer if per_layer, else in total).", 4)
    per_layer: bool = _doc("One cache per MoE layer (true) or one global cache (false).", True)
    policy: Literal["lru", "lfu"] = _doc("Eviction policy.", "lru")
    prefetch_m: int = _doc("Experts prefetched per token: the predictor's top-m for layer l+h, issued when layer l runs.", 2)
    expert_bytes: float = _doc("Bytes of one expert.", 352_321_536.0)
    bandwidth_gbps: float = _doc("Host-to-device link bandwidth in GB/s (1e9 bytes/s).", 25.0)
    layer_compute_ms: float = _doc("Compute time of one MoE layer of one decode step with its experts resident.", 0.4)
    overlap_prefetch: bool = _doc("Prefetch transfers overlap compute (demand loads never do).", True)
    batch_size: int = _doc("Sequences decoded together: a step needs the union of their experts.", 1)
    max_tokens: int = _doc("Replay at most this many test tokens (whole sequences, in order) to bound run time.", 4000)
    capacity_sweep: list = _doc("Capacities of the hit-rate/speedup vs capacity plot.", factory=lambda: [1, 2, 4, 8, 12])
    batch_sweep: list = _doc("Batch sizes of the hit-rate/speedup vs batch size plot.", factory=lambda: [1, 4, 16])

    def validate(self) -> None:
        _positive("evaluate.cache", self, "capacity", "prefetch_m", "expert_bytes", "bandwidth_gbps", "batch_size", "max_tokens")
        if self.layer_compute_ms < 0:
            raise PipelineError(f"evaluate.cache.layer_compute_ms: must be >= 0, got {self.layer_compute_ms}")
        for name in ("capacity_sweep", "batch_sweep"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise PipelineError(f"evaluate.cache.{name}: must be a non-empty list of integers >= 1, got {values}")


@dataclass
class EvaluateParams:
    topk: list = _doc("m values of the top-m accuracy of the highest-weight target expert.", factory=lambda: [1, 3, 5, 10])
    batch_size: int = _doc("Windows scored per batch.", 4096)
    seed: int = _doc("Seed of the random baseline.", 0)
    max_horizon: int = _doc(
        "Also score the baselines (lookup, frequency, previous_token, stale_gate) at horizons 1..max_horizon, each on "
        "windows rebuilt from the shards with the windows split, and the predictor at its own horizon (metrics "
        "per_horizon, plot per_horizon); 0 = off. Needs windows.context_length + max_horizon <= MoE layers.", 4)
    cache: CacheParams = _doc("Expert-cache prefetch simulation.", factory=CacheParams)

    def validate(self) -> None:
        if not self.topk or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in self.topk):
            raise PipelineError(f"evaluate.topk: must be a non-empty list of integers >= 1, got {self.topk}")
        if 1 not in self.topk:
            raise PipelineError(f"evaluate.topk: must include 1 (top-1 is the headline metric), got {self.topk}")
        _positive("evaluate", self, "batch_size")
        if self.max_horizon < 0:
            raise PipelineError(f"evaluate.max_horizon: must be >= 0 (0 = off), got {self.max_horizon}")
        self.cache.validate()


SECTIONS = {
    "collect": CollectParams,
    "shard": ShardParams,
    "windows": WindowsParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
}


def _positive(prefix: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise PipelineError(f"{prefix}.{name}: must be > 0, got {value}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise PipelineError(f"{key}: {value!r} is not one of {_type_name(tp)}")
        return value
    if isinstance(tp, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            if option is not type(None):
                try:
                    return _coerce(value, option, key)
                except PipelineError:
                    pass
        raise PipelineError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise PipelineError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{prefix}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls)}  # YAML key -> field name
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise PipelineError(f"{prefix}.{unknown[0]}: unknown key; accepted: {', '.join(sorted(names))}")
    return cls(**{names[key]: _coerce(value, hints[names[key]], f"{prefix}.{key}") for key, value in raw.items()})


def parse_section(name: str, raw: Any) -> Any:
    """Build and validate one section from its raw YAML mapping."""
    section = _build(SECTIONS[name], raw, name)
    section.validate()
    return section


def load_section(name: str, path: Path = PARAMS_FILE) -> Any:
    """Read params.yaml, reject unknown top-level sections, return the validated section `name`."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run from the project root") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise PipelineError(f"{unknown[0]}: unknown params section; accepted: {', '.join(SECTIONS)}")
    return parse_section(name, raw.get(name))


def as_dict(section: Any) -> dict:
    """The section as plain data (saved inside checkpoints and manifests)."""
    return dataclasses.asdict(section)
