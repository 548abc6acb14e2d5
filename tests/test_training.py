"""The fine-tuning scaffold both adapters share (adapters/training.py), on a module with no model library."""

import math

import pytest
import torch
from accelerate import Accelerator

from raft_diffusion.adapters.training import Finetuner, lr_factor
from raft_diffusion.core.config import from_dict
from raft_diffusion.core.protocols import TRAIN_STATS


def config(**train):
    return from_dict({"run": {"stages": 4}, "train": {"steps_per_stage": 5, "batch_size": 3, "lr": 0.05, **train}})


def make(cfg):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    module[0].requires_grad_(False)  # a frozen part, like the base model under a LoRA
    acc = Accelerator(cpu=True, gradient_accumulation_steps=cfg.train.grad_accum)
    return Finetuner(acc, {"net": module}, cfg, seed=7), module


DATA = torch.randn(11, 4, generator=torch.Generator().manual_seed(1))
TARGET = DATA.sum(1, keepdim=True)


def stage(finetuner, module):
    def loss(idx, mine):
        x = DATA[idx[mine]]
        return torch.nn.functional.mse_loss(module(x), TARGET[idx[mine]])

    return finetuner.fit(len(DATA), loss)


def test_schedules():
    assert lr_factor("constant", 7, 10, 0.1) == 1.0
    assert lr_factor("cosine", 0, 10, 0.1) == 1.0 and lr_factor("cosine", 10, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 5, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor("linear", 5, 10, 0.0) == pytest.approx(0.5)


def test_stats_keys_order_and_schedule():
    finetuner, module = make(config(lr_schedule="cosine", lr_min_ratio=0.2, grad_accum=2))
    first = stage(finetuner, module)
    assert set(first) == set(TRAIN_STATS)
    assert first["steps"] == 5 and first["samples"] == 5 * 2 * 3
    lrs = [first["lr"]] + [stage(finetuner, module)["lr"] for _ in range(3)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # decays across stages
    assert lrs[-1] == pytest.approx(0.05 * 0.2)  # and ends at lr_min_ratio after the run's 20 steps
    assert math.isfinite(first["grad_norm"]) and first["loss_last"] < first["loss_first"]
    assert not any(p.grad is not None for p in module[0].parameters())  # the frozen part never trains


def test_save_load_is_bit_exact(tmp_path):
    cfg = config(lr_schedule="linear", grad_accum=2)
    straight, module = make(cfg)
    torch.manual_seed(5)
    stage(straight, module)
    stage(straight, module)
    expected = straight.trainable_state()

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    first, module1 = make(cfg)
    torch.manual_seed(5)
    stage(first, module1)
    first.save(tmp_path / "ckpt")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.manual_seed(123)  # dropout draws from the global RNG: the restored one must drive stage 2
    resumed, module2 = make(cfg)
    with torch.no_grad():
        module2[2].weight.add_(1.0)  # the checkpoint, not the initial weights, must count
    resumed.load(tmp_path / "ckpt")
    stage(resumed, module2)
    got = resumed.trainable_state()
    assert got.keys() == expected.keys() == {"net.2.weight", "net.2.bias"}
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_moving_average_is_what_averaged_shows_and_the_trained_weights_come_back():
    cfg = config(steps_per_stage=1, ema_decay=0.6)
    finetuner, module = make(cfg)
    trained = [p for p in module.parameters() if p.requires_grad]
    average = [p.detach().clone() for p in trained]
    frozen = module[0].weight.detach().clone()
    for step in range(6):
        torch.manual_seed(step)
        stage(finetuner, module)
        decay = min(0.6, (1 + step) / (10 + step))  # EMAModel's warm-up: the average starts short
        average = [decay * a + (1 - decay) * p.detach() for a, p in zip(average, trained)]
    now = [p.detach().clone() for p in trained]
    with finetuner.averaged():
        for p, a, n in zip(trained, average, now):
            torch.testing.assert_close(p.detach(), a)
            assert not torch.equal(p.detach(), n)
        assert torch.equal(module[0].weight, frozen)
    assert all(torch.equal(p.detach(), n) for p, n in zip(trained, now))  # exactly the trained weights again


def test_save_load_keeps_the_moving_average(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    cfg = config(ema_decay=0.8)
    straight, module = make(cfg)
    torch.manual_seed(5)
    stage(straight, module)
    stage(straight, module)
    with straight.averaged():
        expected = straight.trainable_state()
    reset()
    first, module1 = make(cfg)
    torch.manual_seed(5)
    stage(first, module1)
    first.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "ema.safetensors").is_file()
    reset()
    resumed, module2 = make(cfg)
    resumed.load(tmp_path / "ckpt")
    stage(resumed, module2)
    with resumed.averaged():
        got = resumed.trainable_state()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    reset()
    plain, _ = make(config())
    plain.save(tmp_path / "plain")
    reset()
    with pytest.raises(ValueError, match="no moving average"):
        make(cfg)[0].load(tmp_path / "plain")
