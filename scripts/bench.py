"""Side-by-side benchmark of the RAFT stage, in one process, alternating the compared runs.

    python scripts/bench.py --device cpu --quick           # tiny models, under 2 minutes on 2 cores
    python scripts/bench.py --device cuda --sd15-size      # SD-1.5-sized random weights, 256 and 512 px
    python scripts/bench.py --device cpu --quick --parts flow   # the flow families, tiny

(a) sampling: the stock ``StableDiffusionPipeline.__call__`` vs the adapter's ``generate`` at equal
    settings and image count (both decode to PIL images), eager and, with --compile, compiled;
(b) fine-tuning: a minimal hand-written LoRA denoising loop vs the adapter's ``finetune``;
(c) one full RAFT stage split into phases (generate, score, select, fine-tune, checkpoint);
(d) the flow-matching families (``--parts flow``; tiny SD3 and FLUX.1 with --quick, SD3.5-Medium- and
    FLUX.1-dev-sized otherwise): the stock ``StableDiffusion3Pipeline`` / ``FluxPipeline`` vs ``generate``,
    and a minimal hand-written flow-matching LoRA step (diffusers' SD3/FLUX LoRA scripts) vs ``finetune``.
The last line printed is one JSON object with every figure, including
``sampling_ratio_vs_pipeline``, ``train_ratio_vs_reference``, ``stage_overhead_fraction`` and, for the
flow families, ``flow_sampling_ratio_vs_pipeline`` and ``flow_train_ratio_vs_reference``.
Random weights time exactly like real ones; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raft_diffusion.core.config import from_dict  # noqa: E402
from scripts.demo.random_sd import build_random_sd  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(fns: dict, device: str, reps: int) -> dict[str, float]:
    """Median seconds of each function, run A B A B ... after one warm-up of each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return float("nan")


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def matmul_peak_tflops(device: str) -> float:
    """Measured bf16 (CUDA) / fp32 (CPU) matrix-product throughput: the MFU denominator."""
    n = 8192 if device.startswith("cuda") else 1024
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = min(alternate({"mm": lambda: a @ b}, device, reps=5).values(), default=1.0)
    return 2 * n**3 / seconds / 1e12


def unet_gflop(unet, latent_side: int, device: str, dtype) -> float:
    """GFLOP of one UNet forward for one image (counted by torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 4, latent_side, latent_side, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=ctx)
    return counter.get_total_flops() / 1e9


def make_config(args, pipe_dir: str, resolution: int, **over) -> "object":
    data = {
        "run": {"name": "bench", "output_dir": over.pop("output_dir", "/tmp"), "stages": 1, "save_images": False},
        "model": {"kind": "diffusion", "pretrained": pipe_dir, "dtype": args.dtype, "device": args.device},
        "diffusion": {
            "scheduler": over.pop("scheduler", "ddim"),
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "height": resolution,
            "width": resolution,
            "compile": over.pop("compile", False),
        },
        "sampling": {
            "k": args.k,
            "prompts_per_stage": args.prompts,
            "batch_size": over.pop("batch_size", args.batch),
        },
        "selection": {"strategy": "local_then_global", "keep": 0.8},
        "train": {
            "lr": 1e-4,
            "steps_per_stage": args.train_steps,
            "batch_size": over.pop("train_batch", args.train_batch),
            "mixed_precision": "bf16" if args.device.startswith("cuda") else "no",
            "gradient_checkpointing": over.pop("gradient_checkpointing", False),
        },
        "prompts": {"builtin": "cifar10"},
        "eval": {"every": 0},
        "log": {"report": False, "tensorboard": False},
        "rewards": [{"name": "brightness"}],
    }
    assert not over, over
    return from_dict(data)


def make_adapter(config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from raft_diffusion.adapters.diffusion import DiffusionAdapter

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum,
        cpu=config.model.device == "cpu",
    )
    return DiffusionAdapter(config, accelerator)


# -- (a) sampling ---------------------------------------------------------------------------------


def bench_sampling(args, pipe_dir: str, resolution: int, compile_: bool, reps: int) -> dict:
    from diffusers import StableDiffusionPipeline

    from raft_diffusion.adapters.diffusion.loading import dtype_keyword
    from raft_diffusion.core.loop import candidate_seeds

    config = make_config(args, pipe_dir, resolution, compile=compile_)
    adapter = make_adapter(config)
    prompts = [f"a photo of a {c}" for c in ["cat", "dog", "ship", "truck", "bird", "frog", "deer", "horse", "plane", "car"]]
    prompts = (prompts * args.prompts)[: args.prompts]
    seeds = candidate_seeds(0, 1, range(len(prompts)), args.k)
    n_images = len(seeds)

    stock = StableDiffusionPipeline.from_pretrained(pipe_dir, **{dtype_keyword(): adapter.dtype}, safety_checker=None, requires_safety_checker=False)
    stock.scheduler = type(adapter.pipe.scheduler).from_config(adapter.pipe.scheduler.config)
    stock = stock.to(args.device)
    stock.set_progress_bar_config(disable=True)
    if compile_:
        stock.unet = torch.compile(stock.unet, dynamic=False)
    flat_prompts = [p for p in prompts for _ in range(args.k)]

    def run_stock():
        for start in range(0, n_images, args.batch):
            chunk = slice(start, start + args.batch)
            stock(
                flat_prompts[chunk],
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=resolution,
                width=resolution,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]],
                output_type="pil",
            )

    def run_ours():
        adapter.generate(prompts, args.k, seeds)

    reset_peak(args.device)
    t = alternate({"stock": run_stock, "ours": run_ours}, args.device, reps)
    result = {
        "resolution": resolution,
        "compiled": compile_,
        "images": n_images,
        "stock_img_s": n_images / t["stock"],
        "ours_img_s": n_images / t["ours"],
        "ratio": t["stock"] / t["ours"],
        "peak_gib": peak_gib(args.device),
    }
    latent_side = resolution // adapter.pipe.vae_scale_factor
    gflop = unet_gflop(adapter.denoiser, latent_side, args.device, adapter.dtype)
    passes = args.steps * (2 if args.guidance > 1 else 1)
    result["unet_gflop_per_image"] = gflop
    result["ours_tflop_s"] = gflop * passes * result["ours_img_s"] / 1e3
    del stock, adapter
    return result


# -- (b) fine-tuning ------------------------------------------------------------------------------


def bench_training(args, pipe_dir: str, resolution: int, reps: int, train_batch: int, checkpointing: bool = False) -> dict:
    from peft import LoraConfig

    config = make_config(args, pipe_dir, resolution, train_batch=train_batch, gradient_checkpointing=checkpointing)
    adapter = make_adapter(config)
    latent_side = resolution // adapter.pipe.vae_scale_factor
    n_chosen = max(8, train_batch)
    prompts = [f"a photo of a {i}" for i in range(n_chosen)]
    chosen = adapter.generate(prompts[:1], 1, [0]) * n_chosen  # payload layout of this adapter
    latents = torch.randn(n_chosen, 4, latent_side, latent_side)
    for i, cand in enumerate(chosen):
        chosen[i] = type(cand)(cand.prompt, i, None, {**cand.payload, "latents": latents[i]})

    # The reference: the few lines everyone writes by hand (diffusers' train_text_to_image_lora recipe).
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from raft_diffusion.adapters.diffusion.loading import dtype_keyword

    ref = StableDiffusionPipeline.from_pretrained(pipe_dir, **{dtype_keyword(): adapter.dtype}, safety_checker=None, requires_safety_checker=False).to(args.device)
    unet = ref.unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.model.lora.rank, lora_alpha=config.model.lora.alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    noise_scheduler = DDPMScheduler.from_config(ref.scheduler.config)
    cond = chosen[0].payload["prompt_embeds"].to(args.device, adapter.dtype)
    ref_latents = latents.to(args.device, adapter.dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else torch.autocast("cpu", enabled=False)

    def run_reference():
        for step in range(args.train_steps):
            idx = torch.randint(0, n_chosen, (train_batch,))
            x0 = ref_latents[idx]
            noise = torch.randn_like(x0)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (train_batch,), device=args.device)
            with autocast:
                pred = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond.expand(train_batch, -1, -1)).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def run_ours():
        adapter.finetune(chosen)

    reset_peak(args.device)
    t = alternate({"reference": run_reference, "ours": run_ours}, args.device, reps)
    samples = args.train_steps * train_batch
    result = {
        "resolution": resolution,
        "batch": train_batch,
        "gradient_checkpointing": checkpointing,
        "reference_samples_s": samples / t["reference"],
        "ours_samples_s": samples / t["ours"],
        "ours_s_per_step": t["ours"] / args.train_steps,
        "ratio": t["reference"] / t["ours"],
        "peak_gib": peak_gib(args.device),
    }
    del ref, unet, optimizer, adapter
    return result


# -- (d) the flow-matching families ---------------------------------------------------------------


def flow_config(args, family: str, pipe_dir: str, resolution: int, train_batch: int) -> "object":
    return from_dict({
        "run": {"name": "bench", "output_dir": "/tmp", "stages": 1, "save_images": False},
        "model": {"kind": "diffusion", "pretrained": pipe_dir, "dtype": args.dtype, "device": args.device},
        "diffusion": {"steps": args.flow_steps, "guidance_scale": 3.5 if family == "flux" else 4.5, "height": resolution,
                      "width": resolution, "max_sequence_length": args.flow_tokens,
                      "flow": {"weighting_scheme": "logit_normal"}},
        "sampling": {"k": args.k, "prompts_per_stage": args.prompts, "batch_size": args.flow_batch},
        "train": {"lr": 1e-4, "steps_per_stage": args.train_steps, "batch_size": train_batch,
                  "mixed_precision": "bf16" if args.device.startswith("cuda") else "no",
                  "gradient_checkpointing": not args.quick},
        "eval": {"every": 0},
    })


def bench_flow(args, family: str, pipe_dir: str, resolution: int, reps: int) -> dict:
    """(sampling, fine-tuning) of one flow family against the stock pipeline and a hand-written LoRA step."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig

    from raft_diffusion.adapters.diffusion.loading import dtype_keyword
    from raft_diffusion.core.loop import candidate_seeds

    train_batch = args.train_batch if args.quick else 2
    config = flow_config(args, family, pipe_dir, resolution, train_batch)
    adapter = make_adapter(config)
    s = adapter.settings
    prompts = [f"a photo of a {c}" for c in ["cat", "dog", "ship", "truck", "bird", "frog", "deer", "horse", "plane", "car"]]
    prompts = (prompts * args.prompts)[: args.prompts]
    seeds = candidate_seeds(0, 1, range(len(prompts)), args.k)
    flat_prompts = [p for p in prompts for _ in range(args.k)]
    pipe_cls = getattr(diffusers, "FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline")
    stock = pipe_cls.from_pretrained(pipe_dir, **{dtype_keyword(): adapter.dtype}).to(args.device)
    stock.set_progress_bar_config(disable=True)

    def run_stock():
        for start in range(0, len(seeds), args.flow_batch):
            chunk = slice(start, start + args.flow_batch)
            stock(flat_prompts[chunk], num_inference_steps=s.steps, guidance_scale=s.guidance_scale, height=resolution,
                  width=resolution, max_sequence_length=s.max_sequence_length, output_type="pil",
                  generator=[torch.Generator("cpu").manual_seed(x) for x in seeds[chunk]])

    sampling = alternate({"stock": run_stock, "ours": lambda: adapter.generate(prompts, args.k, seeds)}, args.device, reps)

    # The reference fine-tuning step: diffusers' SD3/FLUX DreamBooth-LoRA scripts, minus their data loading.
    chosen = adapter.generate(prompts[:1], 1, [0]) * max(8, train_batch)
    x0 = torch.stack([c.payload["latents"] for c in chosen]).to(args.device, adapter.dtype)
    embeds = chosen[0].payload["prompt_embeds"].to(args.device, adapter.dtype)
    pooled = chosen[0].payload["pooled_prompt_embeds"].to(args.device, adapter.dtype)
    transformer = stock.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=config.model.lora.rank, lora_alpha=config.model.lora.alpha,
                                       target_modules=adapter.family.lora_targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if not args.quick:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(stock.scheduler.config)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else torch.autocast("cpu", enabled=False)

    def run_reference():
        for _ in range(args.train_steps):
            lat = x0[torch.randint(0, len(x0), (train_batch,))]
            noise = torch.randn_like(lat)
            u = compute_density_for_timestep_sampling("logit_normal", train_batch, 0.0, 1.0)
            index = (u * scheduler.config.num_train_timesteps).long()
            t = scheduler.timesteps[index].to(args.device)
            sigma = scheduler.sigmas[index].to(args.device, lat.dtype).view(-1, 1, 1, 1)
            noisy = (1 - sigma) * lat + sigma * noise
            b, c, h, w = lat.shape
            with autocast:
                if family == "flux":
                    pred = transformer(hidden_states=stock._pack_latents(noisy, b, c, h, w), timestep=t / 1000,
                                       guidance=torch.full([b], 3.5, device=args.device), pooled_projections=pooled.expand(b, -1),
                                       encoder_hidden_states=embeds.expand(b, -1, -1), img_ids=stock._prepare_latent_image_ids(b, h // 2, w // 2, args.device, lat.dtype),
                                       txt_ids=torch.zeros(embeds.shape[0], 3, device=args.device), return_dict=False)[0]
                    pred = stock._unpack_latents(pred, h * stock.vae_scale_factor, w * stock.vae_scale_factor, stock.vae_scale_factor)
                else:
                    pred = transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=embeds.expand(b, -1, -1),
                                       pooled_projections=pooled.expand(b, -1), return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred.float(), (noise - lat).float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    reset_peak(args.device)
    training = alternate({"reference": run_reference, "ours": lambda: adapter.finetune(chosen)}, args.device, reps)
    n_images, samples = len(seeds), args.train_steps * train_batch
    result = {
        "family": family, "resolution": resolution, "images": n_images, "steps": s.steps,
        "stock_img_s": n_images / sampling["stock"], "ours_img_s": n_images / sampling["ours"],
        "sampling_ratio": sampling["stock"] / sampling["ours"],
        "train_batch": train_batch, "reference_samples_s": samples / training["reference"],
        "ours_samples_s": samples / training["ours"], "train_ratio": training["reference"] / training["ours"],
        "peak_gib": peak_gib(args.device),
    }
    del stock, transformer, optimizer, adapter
    return result


# -- (c) one full stage ---------------------------------------------------------------------------


def make_reward(args):
    """The LAION predictor on an open_clip model with random weights (ViT-L-14 on GPU, a tiny CLIP on CPU)."""
    import open_clip

    from aesthetic.predictor import AestheticPredictor
    from raft_diffusion.core.scores import FunctionReward, WeightedReward

    if args.quick:
        cfg = {
            "embed_dim": 768,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }
        path = Path(tempfile.mkdtemp()) / "bench-clip.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
        name = "bench-clip"
    else:
        name = "ViT-L-14-quickgelu"
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    predictor = AestheticPredictor(model, preprocess, head=_default_head(), device=args.device)
    return WeightedReward([("aesthetic", 1.0, FunctionReward(lambda images, _p: predictor.score(images), "aesthetic"))])


def _default_head() -> str:
    from aesthetic.predictor import DEFAULT_HEAD

    return str(DEFAULT_HEAD)


def bench_stage(args, pipe_dir: str, resolution: int, scheduler: str) -> dict:
    from raft_diffusion.core.loop import RaftLoop
    from raft_diffusion.core.run_dir import RunDir

    out = tempfile.mkdtemp()
    config = make_config(args, pipe_dir, resolution, output_dir=out, scheduler=scheduler, compile=args.compile)
    adapter = make_adapter(config)
    reward = make_reward(args)
    run_dir = RunDir(Path(out) / "bench")
    run_dir.prepare(resume=False, overwrite=False)
    loop = RaftLoop(config, adapter, reward, run_dir, log=lambda _m: None)
    loop.run_stage(1)  # warm-up (allocations, compilation)
    reset_peak(args.device)
    record = loop.run_stage(2)
    phases = {k[5:-2]: v for k, v in record.items() if k.startswith("time_") and k != "time_stage_s"}
    stage = record["time_stage_s"]
    overhead = stage - phases.get("generate", 0) - phases.get("finetune", 0)
    return {
        "resolution": resolution,
        "scheduler": scheduler,
        "images": record["n_candidates"],
        "train_steps": args.train_steps,
        "train_batch": args.train_batch,
        "phases_s": phases,
        "stage_s": stage,
        "overhead_s": overhead,
        "overhead_fraction": overhead / stage,
        "projected_10_stages_min": 10 * stage / 60,
        "peak_gib": peak_gib(args.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models (CPU smoke scale)")
    parser.add_argument("--sd15-size", action="store_true", help="SD-1.5-sized random-weight models")
    parser.add_argument("--resolutions", type=int, nargs="+", default=None)
    parser.add_argument("--compile", action="store_true", help="also time diffusion.compile: true")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--parts", default="sampling,training,stage", help="comma-separated subset to run")
    parser.add_argument("--train-steps", dest="train_steps_override", type=int, default=None, help="LoRA steps per timing (default: the paper's 80)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny models run fastest on one)")
    parser.add_argument("--flow-families", default="sd3,flux", help="--parts flow: which of sd3, flux")
    args = parser.parse_args()
    if args.quick == args.sd15_size:
        parser.error("choose one of --quick and --sd15-size")

    # The paper's stage (10 prompts x K=10 at 256 px, 50 steps, CFG 7.5; 80 LoRA steps of batch 8),
    # scaled down for --quick.
    if args.quick:
        args.resolutions = args.resolutions or [32]
        args.prompts, args.k, args.batch, args.steps, args.guidance = 4, 4, 16, 10, 7.5
        args.train_steps, args.train_batch = 10, 8
    else:
        args.resolutions = args.resolutions or [256, 512]
        args.prompts, args.k, args.batch, args.steps, args.guidance = 10, 10, 50, 50, 7.5
        args.train_steps, args.train_batch = 80, 8
    args.train_steps = args.train_steps_override or args.train_steps
    # Flow families: flow_grpo's sampling at 512 px (10 steps) scaled down to 16-px tiny models for --quick.
    args.flow_steps, args.flow_tokens, args.flow_batch = (10, 16, 16) if args.quick else (10, 256, 8)
    args.flow_resolution = 16 if args.quick else 512
    parts = set(args.parts.split(","))
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp())
    preset = "tiny" if args.quick else "sd15"
    if parts - {"flow"}:
        pipe_dir = str(build_random_sd(work / preset, preset=preset, sample_size=16 if args.quick else 64, device=args.device))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    results: dict = {"device": device_name, "torch": torch.__version__, "preset": preset, "sampling": [], "training": [], "stage": []}
    results["matmul_peak_tflops"] = matmul_peak_tflops(args.device)

    rows = []
    for res in args.resolutions if "sampling" in parts else []:
        for compile_ in [False] + ([True] if args.compile else []):
            r = bench_sampling(args, pipe_dir, res, compile_, args.reps)
            r["mfu"] = r["ours_tflop_s"] / results["matmul_peak_tflops"]
            results["sampling"].append(r)
            rows.append(f"sampling {res}px {'compiled' if compile_ else 'eager'}: stock {r['stock_img_s']:.2f} img/s, ours {r['ours_img_s']:.2f} img/s, ratio {r['ratio']:.2f}, MFU {r['mfu']:.1%}, peak {r['peak_gib']:.1f} GiB")
            print(rows[-1], flush=True)
    for res in args.resolutions if "training" in parts else []:
        batch = args.train_batch if res <= 256 or args.quick else 16
        r = bench_training(args, pipe_dir, res, args.reps, batch, checkpointing=res > 256 and not args.quick)
        results["training"].append(r)
        rows.append(f"fine-tune {res}px batch {batch}{' +ckpt' if r['gradient_checkpointing'] else ''}: reference {r['reference_samples_s']:.1f} samples/s, ours {r['ours_samples_s']:.1f} samples/s ({r['ours_s_per_step'] * 1e3:.0f} ms/step), ratio {r['ratio']:.2f}, peak {r['peak_gib']:.1f} GiB")
        print(rows[-1], flush=True)
    if "stage" in parts:
        res0 = args.resolutions[0]
        r = bench_stage(args, pipe_dir, res0, scheduler="ddim" if args.quick else "dpm++")
        results["stage"].append(r)
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in r["phases_s"].items())
        rows.append(f"stage {res0}px ({r['images']} images, {r['train_steps']} steps of batch {r['train_batch']}): {r['stage_s']:.2f}s = {phases}; overhead {r['overhead_fraction']:.1%}; 10 stages {r['projected_10_stages_min']:.2f} min")
        print(rows[-1], flush=True)

    results["flow"] = []
    for family in args.flow_families.split(",") if "flow" in parts else []:
        from scripts.demo.random_flow import build_flux, build_sd3

        size = "tiny" if args.quick else ("sd35_medium" if family == "sd3" else "flux_dev")
        folder = str((build_sd3 if family == "sd3" else build_flux)(work / family, preset=size))
        r = bench_flow(args, family, folder, args.flow_resolution, args.reps)
        results["flow"].append(r)
        rows.append(f"{family} {r['resolution']}px ({size}): sampling stock {r['stock_img_s']:.2f} img/s, ours {r['ours_img_s']:.2f} img/s, "
                    f"ratio {r['sampling_ratio']:.2f}; fine-tune batch {r['train_batch']} reference {r['reference_samples_s']:.1f} "
                    f"samples/s, ours {r['ours_samples_s']:.1f} samples/s, ratio {r['train_ratio']:.2f}"
                    + (f"; peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] == r["peak_gib"] else ""))
        print(rows[-1], flush=True)
    if results["flow"]:
        results["flow_sampling_ratio_vs_pipeline"] = min(r["sampling_ratio"] for r in results["flow"])
        results["flow_train_ratio_vs_reference"] = min(r["train_ratio"] for r in results["flow"])

    eager = [s["ratio"] for s in results["sampling"] if not s["compiled"]]
    compiled = [s["ratio"] for s in results["sampling"] if s["compiled"]]
    results["sampling_ratio_vs_pipeline"] = min(eager) if eager else None
    if compiled:
        results["compiled_sampling_ratio_vs_pipeline"] = max(compiled)
    results["train_ratio_vs_reference"] = min(t["ratio"] for t in results["training"]) if results["training"] else None
    results["stage_overhead_fraction"] = results["stage"][0]["overhead_fraction"] if results["stage"] else None
    results["paper_scale_10_stages_min"] = results["stage"][0]["projected_10_stages_min"] if results["stage"] else None
    results["bench_seconds"] = time.perf_counter() - started
    print(f"\n| {device_name} | figure |\n| --- | --- |")
    for row in rows:
        name, _, figure = row.partition(": ")
        print(f"| {name} | {figure} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
