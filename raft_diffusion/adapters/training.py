"""The fine-tuning scaffold both adapters share.

One :class:`Finetuner` owns what supervised fine-tuning on the chosen candidates needs besides the
loss itself: AdamW on the trainable parameters, prepared by accelerate (DDP, autocast, gradient
accumulation); the learning-rate schedule across the run; one seeded generator for the batch order
and every other training draw; the loop over micro-batches with clipping and the same statistics
for every adapter (:data:`raft_diffusion.core.protocols.TRAIN_STATS`); and checkpoints.

Several processes: every process holds all chosen candidates and the same generator, draws the
global micro-batch (``train.batch_size`` per process) and trains on its own slice of it, so N
processes compute what one process computes with an N times larger batch.

With ``train.ema_decay`` the finetuner also keeps diffusers' ``EMAModel`` of the trainable weights;
the adapters sample, evaluate and export inside :meth:`Finetuner.averaged`, so the model RAFT draws
candidates from, the one it reports and the one it exports are the same average.

Checkpoints go through ``accelerator.save_state``/``load_state`` (optimizer, grad scaler, the
global RNGs of every process, the accumulation step), with hooks that write only the trainable
tensors, as diffusers' LoRA training examples do. Three things are kept apart from accelerate, and
written safely (safetensors / JSON): the training generator and the moving average, because
accelerate reads registered objects back with ``weights_only=False``; and the learning-rate
schedule, because a scheduler prepared by accelerate steps once per process and would run N times
faster on N processes.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from raft_diffusion.core import progress
from raft_diffusion.core.errors import DivergedError, UserError

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "finetuner.json"
GENERATOR_FILE = "train_generator.safetensors"
EMA_FILE = "ema.safetensors"


class CheckpointMismatchError(UserError):
    """A checkpoint written with another trainable configuration (one-line message)."""


def check_lora_targets(model: torch.nn.Module, targets: list[str], what: str) -> None:
    """Refuse ``model.lora.targets`` names that match no module of ``model`` in one line (peft
    would raise deep in its injection); a name matches a module path equal to it or ending in it."""
    from raft_diffusion.core.config import ConfigError

    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"model.lora.targets: {', '.join(missing)} match no module of {what} "
                          f"(name its layers, or [] for the adapter's default)")


def check_lora_rank(modules: dict[str, torch.nn.Module]) -> None:
    """Refuse a LoRA rank that a layer it adapts cannot reach (above min(inputs, outputs)): it only
    costs memory and export size, in one line naming the widest rank that works."""
    limits = []
    for prefix, module in modules.items():
        for name, layer in module.named_modules():
            lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
                continue
            for adapter in lora_a.keys() & lora_b.keys():
                down, up = lora_a[adapter].weight, lora_b[adapter].weight  # [r, in, *kernel], [out, r, ...]
                inputs, outputs = math.prod(down.shape[1:]), up.shape[0]
                limits.append((min(inputs, outputs), down.shape[0], f"{prefix}.{name}", inputs, outputs))
    over = [limit for limit in limits if limit[1] > limit[0]]
    if over:
        _, rank, where, inputs, outputs = min(over)
        from raft_diffusion.core.config import ConfigError

        raise ConfigError(f"model.lora.rank {rank} is above what {where} can use ({inputs} inputs, {outputs} outputs): "
                          f"use model.lora.rank <= {min(limit[0] for limit in limits)}")


def lr_factor(schedule: str, step: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier after ``step`` of ``total`` optimizer steps of the run."""
    if schedule == "constant" or total <= 0:
        return 1.0
    progress = min(step / total, 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


class Finetuner:
    """AdamW, the batch order and the fine-tuning loop over ``modules`` (name -> module); only
    parameters with ``requires_grad`` train. ``modules`` are prepared by ``accelerator`` (wrapped in
    DDP when distributed): use :attr:`models` for training forward passes."""

    def __init__(self, accelerator, modules: dict[str, torch.nn.Module], config, seed: int, device_placement: bool = False):
        self.accelerator, self.config = accelerator, config
        t = config.train
        self.modules = dict(modules)
        check_lora_rank(self.modules)
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
        objects = [*self.modules.values(), optimizer]
        prepared = accelerator.prepare(*objects, device_placement=[device_placement] * len(objects))
        self.models, self.optimizer = list(prepared[:-1]), prepared[-1]
        total = config.run.stages * t.steps_per_stage
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lambda step: lr_factor(t.lr_schedule, step, total, t.lr_min_ratio))
        self.generator = torch.Generator().manual_seed(seed)
        self.ema = None
        if t.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=t.ema_decay)
        accelerator.register_save_state_pre_hook(self._save_trainable)
        accelerator.register_load_state_pre_hook(self._load_trainable)

    # -- fine-tuning -------------------------------------------------------------------------

    def global_order(self, n: int, micro_batches: int) -> torch.Tensor:
        """Sample indices for ``micro_batches`` global micro-batches: shuffled passes over ``range(n)``."""
        needed = micro_batches * self.config.train.batch_size * self.accelerator.num_processes
        passes = [torch.randperm(n, generator=self.generator) for _ in range(math.ceil(needed / n))]
        return torch.cat(passes)[:needed]

    def fit(self, n: int, micro_batch_loss: Callable[[torch.Tensor, slice], torch.Tensor]) -> dict[str, float]:
        """``train.steps_per_stage`` optimizer steps of ``train.grad_accum`` micro-batches over ``n`` samples.

        ``micro_batch_loss(indices, mine)`` gets the global micro-batch (sample indices, the same on
        every process) and this process's slice of it, and returns this process's loss, scaled so
        that DDP's mean over processes is the loss of the whole global micro-batch.
        """
        t, acc = self.config.train, self.accelerator
        start = time.perf_counter()
        micro_batches = t.steps_per_stage * t.grad_accum
        order = self.global_order(n, micro_batches)
        global_batch = t.batch_size * acc.num_processes
        rank = acc.process_index
        mine = slice(rank * t.batch_size, (rank + 1) * t.batch_size)
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        acc.step = 0  # each stage starts a fresh accumulation cycle
        for module in self.modules.values():
            module.train()
        step_losses, grad_norms, loss_sum = [], [], 0.0
        for m in range(micro_batches):
            with acc.accumulate(*self.models):
                loss = micro_batch_loss(order[m * global_batch:(m + 1) * global_batch], mine)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norms.append(acc.clip_grad_norm_(self.params, max_norm))
                    self._check_finite(loss_sum + loss.detach(), grad_norms[-1], len(grad_norms))
                self.optimizer.step()
                if acc.sync_gradients:
                    self.scheduler.step()
                    if self.ema is not None:
                        self.ema.step(self.params)
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum = loss_sum + loss.detach()
            if (m + 1) % t.grad_accum == 0:
                step_losses.append(loss_sum / t.grad_accum)
                loss_sum = 0.0
                progress.advance()
        for module in self.modules.values():
            module.eval()
        self.check_weights_finite()
        losses = torch.stack(step_losses).float() if step_losses else torch.zeros(0, device=acc.device)
        losses = acc.reduce(losses, "mean").cpu()  # each process saw its slice: the global mean
        norms = torch.stack([torch.as_tensor(v).float().cpu() for v in grad_norms]) if grad_norms else torch.zeros(0)
        seconds = time.perf_counter() - start
        nan = float("nan")
        return {
            "loss": float(losses.mean()) if len(losses) else nan,
            "loss_first": float(losses[0]) if len(losses) else nan,
            "loss_last": float(losses[-1]) if len(losses) else nan,
            "grad_norm": float(norms.mean()) if len(norms) else nan,
            "steps": float(t.steps_per_stage),
            "samples": float(micro_batches * global_batch),
            "seconds": seconds,
            "seconds_per_step": seconds / t.steps_per_stage if t.steps_per_stage else 0.0,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }

    def _check_finite(self, loss: torch.Tensor, grad_norm, step: int) -> None:
        """Stop before the optimizer applies a non-finite loss or gradient (on every process alike).

        Under fp16 mixed precision an infinite gradient is the grad scaler's business (it skips the
        step and lowers the scale); a non-finite loss is not."""
        acc, t = self.accelerator, self.config.train
        scaled = acc.scaler is not None and acc.scaler.is_enabled()
        bad = not torch.isfinite(loss).all() or (not scaled and not torch.isfinite(torch.as_tensor(grad_norm)).all())
        flag = torch.tensor([float(bad)], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, "sum")
        if flag.item() > 0:
            what = "loss" if not torch.isfinite(loss).all() else "gradient"
            precision = f"train.mixed_precision {t.mixed_precision}, model.dtype {self.config.model.dtype}"
            raise DivergedError(
                f"fine-tuning diverged: a non-finite {what} at optimizer step {step} of {t.steps_per_stage}, "
                f"not applied; likely train.lr ({t.lr:g}) is too high: lower it, or change the precision ({precision})"
            )

    def check_weights_finite(self) -> None:
        """Refuse trainable weights that are not all finite (never checkpointed or exported)."""
        if not all(torch.isfinite(p).all() for p in self.params):
            raise DivergedError(f"fine-tuning diverged: non-finite weights; likely train.lr ({self.config.train.lr:g}) "
                                f"is too high: lower it, or change the precision (train.mixed_precision "
                                f"{self.config.train.mixed_precision})")

    @contextmanager
    def averaged(self):
        """Inside the block the trainable weights are their moving average (``train.ema_decay``);
        the trained weights are put back exactly afterwards. Without an average: the weights as they are."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    # -- checkpoints -------------------------------------------------------------------------

    def _named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters keyed ``<module name>.<parameter name>``, in the order of :attr:`params`."""
        return {f"{prefix}.{name}": p for prefix, module in self.modules.items()
                for name, p in module.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, keyed ``<module name>.<parameter name>`` (float32 copies on the CPU)."""
        return {key: p.detach().float().cpu().contiguous() for key, p in self._named_trainable().items()}

    def _save_trainable(self, models, weights, output_dir) -> None:
        from safetensors.torch import save_file

        weights.clear()  # nothing of accelerate's full state dicts: the frozen weights are the pretrained ones
        if self.accelerator.is_main_process:
            save_file(self.trainable_state(), str(Path(output_dir) / TRAINABLE_FILE))

    def _load_trainable(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        models.clear()  # loaded here, not by accelerate
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no adapter checkpoint at {input_dir} ({TRAINABLE_FILE} missing)")
        state = load_file(str(path))
        own = self._named_trainable()
        if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
            raise CheckpointMismatchError(
                f"checkpoint {input_dir} was saved with another trainable configuration (model.lora / init_lora)")
        with torch.no_grad():
            for key, p in own.items():
                p.copy_(state[key])

    def save(self, path: str | Path) -> None:
        """Trainable tensors, optimizer, grad scaler, RNGs, schedule and batch-order generator.
        Call on every process (each writes its own RNG state)."""
        from safetensors.torch import save_file

        path = Path(path)
        self.accelerator.save_state(str(path))
        if self.accelerator.is_main_process:
            save_file({"state": self.generator.get_state()}, str(path / GENERATOR_FILE))
            state = {"scheduler": _jsonable(self.scheduler.state_dict())}
            if self.ema is not None:
                save_file({name: p.detach().cpu().contiguous() for name, p in zip(self._named_trainable(), self.ema.shadow_params)},
                          str(path / EMA_FILE))
                state["ema_step"] = self.ema.optimization_step
            (path / STATE_FILE).write_text(json.dumps(state))
        self.accelerator.wait_for_everyone()

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        self.accelerator.load_state(str(path))
        self.generator.set_state(load_file(str(path / GENERATOR_FILE))["state"])
        state = json.loads((path / STATE_FILE).read_text())
        self.scheduler.load_state_dict(state["scheduler"])
        # The optimizer settings are the config's, not the checkpoint's: a run resumed after a
        # divergence continues with the lower train.lr it was given.
        t = self.config.train
        self.scheduler.base_lrs = [t.lr] * len(self.scheduler.base_lrs)
        for group in self.optimizer.optimizer.param_groups:
            group.update(initial_lr=t.lr, lr=t.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch),
                         betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        if self.ema is not None:
            if not (path / EMA_FILE).is_file():
                raise CheckpointMismatchError(f"checkpoint {path} has no moving average (it was saved with train.ema_decay 0)")
            shadow = load_file(str(path / EMA_FILE))
            with torch.no_grad():
                for name, s_param in zip(self._named_trainable(), self.ema.shadow_params):
                    s_param.copy_(shadow[name])
            self.ema.optimization_step = state["ema_step"]


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
