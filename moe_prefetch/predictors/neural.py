"""The training loop every neural predictor shares: AdamW with a cosine schedule, early stopping on validation
loss (the test split is never seen here), non-finite checks, seeded batch order, per-epoch logging; the train
split in memory or streamed from disk (`WindowStream`), one process or DDP under `accelerate launch`.

A subclass provides `build_module()` (an nn.Module mapping a batch dict to (expert_logits (B, E),
confidence_logit (B,), *extra outputs)) and inherits fit/score/state. The loss is soft-target cross-entropy
against the target layer's gate weights renormalised over the routed set (so the whole top-k set is a target, the
highest-weight expert most), plus BCE of the confidence head on "top-ranked expert == highest-weight target
expert". Hooks for architectures that need more: `batch()` (extra inputs: extend it, call super, and name the
window columns it reads in `requires`), `data_geometry()` (sizes only the data knows, e.g. the hidden-state
width), `target_loss()` and `auxiliary_loss()` (other objectives, extra heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_prefetch.errors import PipelineError
from moe_prefetch.predictors.base import Predictor
from moe_prefetch.progress import Progress
from moe_prefetch.windows.data import WindowSet, WindowStream


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: 'cuda' requested but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def on_cpu(device_name: str) -> bool:
    """Whether train.device resolves to the CPU (accelerate then runs DDP over gloo, not NCCL)."""
    return resolve_device(device_name).type == "cpu"


def target_distribution(windows: WindowSet, num_experts: int, top1_weight: float = 0.0) -> np.ndarray:
    """(N, E) float32: each window's gate weights over its routed experts, summing to 1; with `top1_weight` w, that
    distribution times (1 - w) plus w on the highest-weight expert (train.top1_target_weight)."""
    distribution = gate_distribution(windows.target_experts, windows.target_weights, num_experts)
    if top1_weight:
        top1 = gate_distribution(windows.target_experts[:, :1], np.ones((len(windows), 1), np.float32), num_experts)
        distribution = ((1.0 - top1_weight) * distribution + top1_weight * top1).astype(np.float32)
    return distribution


def gate_distribution(routed: np.ndarray, gate_weights: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, k) routed experts (-1 = none) and their gate weights -> (N, E) float32 summing to 1 (0 if none)."""
    dist = np.zeros((len(routed), num_experts), dtype=np.float32)
    rows = np.repeat(np.arange(len(routed)), routed.shape[1])
    experts = routed.reshape(-1).astype(np.int64)
    weights = np.clip(gate_weights.reshape(-1), 1e-6, None)  # a zero-weight routed expert still counts
    keep = experts >= 0
    np.add.at(dist, (rows[keep], experts[keep]), weights[keep])
    total = dist.sum(axis=1, keepdims=True)
    return np.divide(dist, total, out=np.zeros_like(dist), where=total > 0)


def epoch_batches(train: WindowSet | WindowStream, batch_size: int, generator: np.random.Generator) -> Iterator[WindowSet]:
    """One epoch of shuffled batches: a permutation of the in-memory split, or the stream's shuffle buffers."""
    if isinstance(train, WindowStream):
        yield from train.shuffled_batches(batch_size, generator)
        return
    order = generator.permutation(len(train))
    for start in range(0, len(train), batch_size):
        yield train.subset(order[start : start + batch_size])


def expert_ids(experts: np.ndarray, num_experts: int, device: torch.device) -> torch.Tensor:
    """Expert ids of any shape as int64, -1 (no expert) mapped to E: the padding row of every expert embedding."""
    ids = experts.astype(np.int64)
    ids[ids < 0] = num_experts
    return torch.from_numpy(ids).to(device)


class NeuralPredictor(Predictor):
    """Base of torch predictors. `self.section` is this architecture's params sub-section."""

    streams = True
    requires = ("context_experts",)  # batch() reads it

    def __init__(self, geometry: dict, params: dict):
        super().__init__(geometry, params)
        self.section = params.get(self.arch, {})
        self.module = self._build()

    def _build(self) -> nn.Module | None:
        torch.manual_seed(self.params["seed"])  # the same initial weights for a seed, however often it is built
        return self.build_module()

    network: type[nn.Module] | None = None  # the default build_module() makes network(geometry, **train.<arch>)

    def build_module(self) -> nn.Module | None:
        """The model for self.geometry; None while it needs a size only the data tells (see data_geometry). By
        default `network(geometry, **section)`: a network whose arguments are its config's fields."""
        return self.network(self.geometry, **self.network_args)

    OPTIMISER_FIELDS = ("transitions_lr_scale",)  # section fields the optimiser reads, not the network

    @property
    def network_args(self) -> dict:
        """The section's fields the network is built from (all but OPTIMISER_FIELDS)."""
        return {name: value for name, value in self.section.items() if name not in self.OPTIMISER_FIELDS}

    def batch(self, windows: WindowSet, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Model inputs for `rows`; -1 (no expert) becomes index E, an embedding reserved for padding. The context's
        gate weights are included when the architecture reads them (`context_weights` in requires)."""
        inputs = {
            "context_experts": expert_ids(windows.context_experts[rows], self.num_experts, device),  # (B, c, k)
            "target_layer": torch.from_numpy(windows.target_layer[rows].astype(np.int64)).to(device),  # (B,)
        }
        if "context_weights" in self.requires:
            if windows.context_weights is None:
                raise PipelineError(f"context_weights: {self.arch} with context_encoding "
                                    f"{self.section.get('context_encoding')} reads the context layers' gate weights; "
                                    "windows need windows.context_weights: true, predict_experts needs routed_weights=")
            inputs["context_weights"] = torch.from_numpy(windows.context_weights[rows].astype(np.float32)).to(device)  # (B, c, k)
        return inputs

    def parameter_groups(self, lr: float) -> list[dict]:
        """The optimiser's parameter groups at base learning rate `lr`: a `transitions` table (the mlp family's
        ExpertTransitions) at lr * train.<arch>.transitions_lr_scale, everything else at lr. The schedule scales
        every group alike."""
        table = getattr(self.module, "transitions", None)
        if table is None:
            return [{"params": list(self.module.parameters()), "lr": lr}]
        own = {id(parameter) for parameter in table.parameters()}
        rest = [parameter for parameter in self.module.parameters() if id(parameter) not in own]
        return [{"params": rest, "lr": lr}, {"params": list(table.parameters()), "lr": lr * self.section["transitions_lr_scale"]}]

    @property
    def top1_weight(self) -> float:
        """train.top1_target_weight (0 in checkpoints written before it existed)."""
        return float(self.params.get("top1_target_weight", 0.0))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters()) if self.module is not None else 0

    def target_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Soft cross-entropy of expert logits (B, E) against the gate-weight distribution (B, E)."""
        return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()

    def auxiliary_loss(self, outputs: tuple, inputs: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """Loss of extra heads (outputs[2:]), added to the target loss; 0 for single-head models."""
        return 0.0

    def _loss(self, model: nn.Module, inputs, target, top1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = model(inputs)
        logits, confidence_logit = outputs[0], outputs[1]
        loss = self.target_loss(logits.float(), target)
        correct = (logits.argmax(dim=-1) == top1).float()
        loss = loss + 0.1 * F.binary_cross_entropy_with_logits(confidence_logit.float(), correct)
        return loss + self.auxiliary_loss(outputs, inputs), logits, correct

    def fit(self, train: WindowSet | WindowStream, val: WindowSet, log: Callable[[dict], None]) -> None:
        """Train on `train` (in memory, or streamed from disk), early-stopping on `val`. Started by `accelerate
        launch` with N processes, this is DDP: every global batch of train.batch_size windows is split across the
        processes, gradients are averaged, and every process sees the same validation loss, so all stop together."""
        from accelerate import Accelerator

        p = self.params
        extra = self.data_geometry(train.head() if isinstance(train, WindowStream) else train)
        if self.module is None or any(self.geometry.get(name) != value for name, value in extra.items()):
            self.geometry = {**self.geometry, **extra}
            self.module = self._build()
        accelerator = Accelerator(cpu=on_cpu(p["device"]))  # 1 process unless launched
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        if rank:
            torch.manual_seed(p["seed"] + rank)  # own dropout masks; the initial weights are rank 0's (DDP broadcasts them)
        self.module.to(device)
        generator = np.random.default_rng(p["seed"])  # the same batch order in every process
        if p["max_train_windows"] and len(train) > p["max_train_windows"]:
            train = train.subset(np.sort(generator.choice(len(train), p["max_train_windows"], replace=False)))
        steps_per_epoch = math.ceil(len(train) / p["batch_size"])
        optimizer = torch.optim.AdamW(self.parameter_groups(p["lr"]), lr=p["lr"], weight_decay=p["weight_decay"])
        model, optimizer = accelerator.prepare(self.module, optimizer)
        total = steps_per_epoch * p["epochs"]
        warmup = max(1, min(200, total // 20))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
        use_amp = device.type == "cuda"
        best_loss, best_state, stale_epochs, kept_epoch = math.inf, None, 0, 0
        for epoch in range(p["epochs"]):
            model.train()
            running, seen = 0.0, 0
            progress = Progress(steps_per_epoch, f"train {self.arch} epoch {epoch + 1}/{p['epochs']}", unit="step", enabled=rank == 0)
            for step, batch in enumerate(epoch_batches(train, p["batch_size"], generator)):
                if len(batch) < world:  # a last batch too small to give every process a window (DDP only)
                    continue
                local = batch.subset(np.array_split(np.arange(len(batch)), world)[rank])  # this process's share
                inputs = self.batch(local, np.arange(len(local)), device)
                target = torch.from_numpy(target_distribution(local, self.num_experts, self.top1_weight)).to(device)
                top1 = torch.from_numpy(local.target_experts[:, 0].astype(np.int64)).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, _, _ = self._loss(model, inputs, target, top1)
                if world > 1:  # DDP averages gradients over processes: weigh each by its share of the global batch
                    loss = loss * (len(local) * world / len(batch))
                batch_loss = accelerator.reduce(loss.detach(), "mean")  # the global batch's mean loss, on every process
                if not torch.isfinite(batch_loss):
                    raise PipelineError(f"train: non-finite loss ({batch_loss.item()}) at epoch {epoch + 1}, step {step + 1}; lower train.lr")
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)  # gradients already averaged
                if not torch.isfinite(grad_norm):
                    raise PipelineError(f"train: non-finite gradient at epoch {epoch + 1}, step {step + 1}; lower train.lr")
                optimizer.step()
                schedule.step()
                running += batch_loss.item() * len(batch)
                seen += len(batch)
                progress.update(1, loss=f"{running / seen:.4f}")
            progress.close()
            val_loss, val_top1 = self.evaluate_loss(val, device)
            log({"epoch": epoch + 1, "train_loss": running / seen, "val_loss": val_loss, "val_top1": val_top1,
                 "lr": schedule.get_last_lr()[0]})
            if val_loss < best_loss - 1e-4:
                best_loss, stale_epochs, kept_epoch = val_loss, 0, epoch + 1
                best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            else:
                stale_epochs += 1
                if stale_epochs >= p["patience"]:
                    break
        self.module.load_state_dict(best_state)  # keep the epoch with the best validation loss
        self.module.to("cpu")
        log({"kept_epoch": kept_epoch})

    @torch.no_grad()
    def evaluate_loss(self, windows: WindowSet, device: torch.device, batch_size: int = 8192) -> tuple[float, float]:
        """Mean loss and top-1 accuracy of the highest-weight target expert on `windows`."""
        self.module.eval()
        total_loss, total_correct = 0.0, 0.0
        target_all = target_distribution(windows, self.num_experts, self.top1_weight)
        for start in range(0, len(windows), batch_size):
            rows = np.arange(start, min(start + batch_size, len(windows)))
            top1 = torch.from_numpy(windows.target_experts[rows, 0].astype(np.int64)).to(device)
            loss, logits, _ = self._loss(self.module, self.batch(windows, rows, device), torch.from_numpy(target_all[rows]).to(device), top1)
            total_loss += loss.item() * len(rows)
            total_correct += (logits.argmax(dim=-1) == top1).sum().item()
        return total_loss / len(windows), total_correct / len(windows)

    @torch.no_grad()
    def score(self, windows: WindowSet) -> tuple[np.ndarray, np.ndarray]:
        self.module.eval()
        logits, confidence_logit = self.module(self.batch(windows, np.arange(len(windows)), torch.device("cpu")))[:2]
        return torch.softmax(logits.float(), dim=-1).numpy(), torch.sigmoid(confidence_logit.float()).numpy()

    def state(self) -> dict[str, np.ndarray]:
        return {name: tensor.detach().cpu().numpy() for name, tensor in self.module.state_dict().items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if self.module is None:
            raise PipelineError(f"{self.arch}: checkpoint geometry lacks the sizes its module needs; re-run the train stage")
        self.module.load_state_dict({name: torch.from_numpy(array) for name, array in arrays.items()})
