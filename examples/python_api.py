"""RAFT from Python: the packaged demo model, a reward function of your own, two small stages.

    python examples/python_api.py

``train`` takes a config (a YAML path, a mapping or a Config; none: the command line's default,
the packaged demo model), rewards (functions, registered names or specs) and command-line style
overrides; it returns the run: its folder, its metrics records, the exported stage and ``final/``,
the LoRA that stock diffusers loads with ``pipe.load_lora_weights(run.final)``. Your own model:
``"model.pretrained=/path/or/hub-id"`` among the overrides, or a config of your own.
"""

import numpy as np

from raft_diffusion import train

# The default recipe, made small enough to finish in seconds on a CPU.
SMALL = ["run.stages=2", "sampling.prompts_per_stage=4", "sampling.k=4", "diffusion.steps=4",
         "train.steps_per_stage=4", "replay.stages=0", "eval.every=1", "eval.max_prompts=4", "eval.k=2",
         "log.tensorboard=false", "log.report=false"]


def redness(images, prompts):
    """How much redder than green and blue an image is on average, in [-1, 1]."""
    rgb = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images])
    return (rgb[..., 0] - rgb[..., 1:].mean(axis=-1)).mean(axis=(1, 2)).tolist()


def main(output_dir: str = "runs"):
    run = train(rewards=[redness], overrides=[f"run.output_dir={output_dir}", "run.name=python_api", *SMALL],
                overwrite=True, quiet=True)
    for record in run.metrics:
        print(f"stage {record['stage']}: held-out redness {record['eval_reward']:+.4f}")
    print(f"stage {run.exported_stage} exported to {run.final}")
    return run


if __name__ == "__main__":
    main()
