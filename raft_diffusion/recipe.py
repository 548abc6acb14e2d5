"""The training recipe: one config in, one run folder out.

    config -> run folder -> accelerator -> adapter -> rewards -> RaftLoop.run -> report
"""

from __future__ import annotations

import os
from pathlib import Path

from raft_diffusion.core import dist, progress
from raft_diffusion.core.config import Config, ConfigError, save_config
from raft_diffusion.core.guard import check_guard
from raft_diffusion.core.loop import RaftLoop
from raft_diffusion.core.prompts import load_prompts
from raft_diffusion.core.run_dir import RunDir, os_errors_name
from raft_diffusion.rewards import RewardError, WeightedReward, build_reward, load_models


def resolve_device(name: str) -> str:
    """``model.device``, checked (one line when this machine lacks it); ``auto``: cuda, mps or cpu."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device: {name!r} is not a device (auto, cpu, cuda, cuda:N or mps)") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ConfigError(f"model.device: {name} is not available (this machine has {count} CUDA devices)")
    if device.type == "mps" and not mps:
        raise ConfigError("model.device: mps is not available on this machine")
    return name


def make_accelerator(config: Config):
    """The run's Accelerator, on ``model.device``: the adapter, the rewards and the metrics all use its device."""
    import torch
    from accelerate import Accelerator

    device = resolve_device(config.model.device)
    index = torch.device(device).index
    if index is not None and torch.device(device).type == "cuda":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"model.device: {device} names one GPU, but under accelerate launch each process "
                              f"takes its own: use model.device=auto")
        torch.cuda.set_device(index)  # a single process runs on the current CUDA device, which accelerate calls "cuda"
    return Accelerator(
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum,
        cpu=device == "cpu",
    )


def quiet_model_libraries() -> None:
    """Loading bars of diffusers/transformers would interleave with the run's own progress output."""
    import importlib

    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            importlib.import_module(module).disable_progress_bar()
        except ImportError:
            pass


def load_reward_models(reward: WeightedReward, key: str) -> None:
    """Load the model of each part of ``reward`` that has one (``part.load()``), now.

    Weights that are not on this machine end the run in one line that says which overrides point
    the part at local files: ``rewards.0.args.pretrained=/path/...`` for ``key="rewards"``.
    """
    def missing(i, label, err, fix):
        overrides = " ".join(f"{key}.{i}.args.{name}={value}" for name, value in fix.items())
        return RewardError(f"{key}.{i} ({label}): {err.problem}; pass local files: {overrides}")

    load_models(reward, missing)


def train(config: Config, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> RunDir:
    """Run (or resume) the RAFT run that ``config`` describes; returns its run folder."""
    progress.set_quiet(quiet)
    quiet_model_libraries()
    # 1. Check everything that needs no model (prompts, rewards, guard, the run folder), then load the reward models.
    _, eval_prompts = load_prompts(config.prompts)
    accelerator = make_accelerator(config)  # first: it sets up the process group under accelerate launch
    from accelerate.utils import set_seed

    # Every process's global RNGs (dropout, say) from the run seed and its rank, so runs repeat;
    # a resumed run restores them from its checkpoint instead.
    set_seed(config.run.seed, device_specific=True)
    device = str(accelerator.device)
    if device == "cpu" and config.run.cpu_threads:
        import torch

        torch.set_num_threads(config.run.cpu_threads)
    dtype = None if config.model.dtype == "auto" else config.model.dtype  # auto: fp16 on CUDA, fp32 on the CPU
    reward = build_reward(config.rewards, device=device, dtype=dtype)
    eval_metrics = build_reward(config.eval.metrics, device=device, dtype=dtype) if config.eval.metrics else None
    check_guard(config, eval_metrics, bool(eval_prompts), reward)
    run_dir = RunDir(Path(config.run.output_dir) / config.run.name)
    try:
        return _train(config, run_dir, reward, eval_metrics, accelerator, resume, overwrite, quiet)
    finally:
        run_dir.unlock()


def _train(config: Config, run_dir: RunDir, reward, eval_metrics, accelerator, resume: bool, overwrite: bool, quiet: bool) -> RunDir:
    """The rest of :func:`train`, with the run folder held by this process from the moment it exists."""
    changes, keep_config = {}, False
    if dist.is_main():
        with os_errors_name(run_dir.root, "cannot use run folder"):
            run_dir.check_writable()
            run_dir.lock(create=False)  # a folder in use: refused now (a new one is locked when it is made)
        run_dir.check(resume=resume, overwrite=overwrite)
        if resume:
            changes = run_dir.resume_changes(config.to_dict())
            keep_config = run_dir.config.is_file() and run_dir.has_progress()
    # Reward and metric models load before the diffusion model and the first sample: missing weights end the run now.
    load_reward_models(reward, "rewards")
    if eval_metrics:
        load_reward_models(eval_metrics, "eval.metrics")
    start_after = run_dir.prepare(resume=resume, overwrite=overwrite) if dist.is_main() else 0
    start_after = dist.broadcast_object(start_after)
    if dist.is_main():
        run_dir.lock()  # a folder made (or moved aside and made again) just now
        with os_errors_name(run_dir.root, "cannot write run folder"):
            if not keep_config:
                save_config(config, run_dir.config)  # a resumed run keeps the config it started with ...
            run_dir.record_config_changes(changes, start_after)  # ... and records what it changed

    # 2. Build the model.
    from raft_diffusion.adapters import build_adapter

    with progress.phase(f"loading {config.model.pretrained}"):
        adapter = build_adapter(config, accelerator)

    # 3. Run the stages, then write the report.
    from raft_diffusion import report

    log = (lambda _msg: None) if quiet else progress.write
    images = report.StageImages(config)
    metrics_logger = report.MetricsLogger(config, run_dir, start_after, log=log) if dist.is_main() else None
    loop = RaftLoop(
        config,
        adapter,
        reward,
        run_dir,
        eval_metrics=eval_metrics,
        on_stage=images if config.run.save_images else None,
        log=log,
        # run.save_images: false drops the image grids; a text run's held-out samples are always kept
        on_eval=images.eval_grid if config.run.save_images else images.eval_samples,
        on_record=metrics_logger.log if metrics_logger else None,
    )
    # A full disk or a vanished run folder ends the run in one line; finished stages stay resumable.
    with os_errors_name(run_dir.root, "cannot write run folder", "finished stages are kept: fix it and pass --resume"):
        try:
            loop.run(start_after=start_after)
        finally:
            if metrics_logger:
                metrics_logger.close()
        if dist.is_main() and config.log.report:
            report.write_report(run_dir)
    if dist.is_main() and not quiet:
        print(report.summary_table(run_dir.read_metrics(), report.read_outcome(run_dir)))
    return run_dir
