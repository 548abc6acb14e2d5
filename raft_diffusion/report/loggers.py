"""TensorBoard and wandb: every metrics record, and the grids of its stage."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from raft_diffusion.core.run_dir import RunDir, stage_name
from raft_diffusion.report.grids import EVAL_GRID_FILE, GRID_FILE


def _tag(key: str) -> str:
    for prefix in ("reward", "eval", "train", "time"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"stage/{key}"


class MetricsLogger:
    """Sends each metrics record (and the grids of its stage) to TensorBoard and/or wandb.

    TensorBoard writes to ``tb/`` when ``log.tensorboard`` is set and tensorboard is installed;
    wandb is used when ``log.wandb`` is set and wandb is installed. Neither is ever required.
    Create it on the main process only; ``start_after`` (a resumed run's last complete stage)
    drops TensorBoard events of later stages left by the interrupted attempt.
    """

    def __init__(self, config, run_dir, start_after: int = 0, log=print):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.tb = None
        self.wandb = None
        if config.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log("log.tensorboard: tensorboard is not installed (pip install tensorboard); not writing tb/")
            else:
                self.tb = SummaryWriter(log_dir=str(self.run_dir.tb), purge_step=start_after + 1 if start_after else None)
                if not start_after and self.run_dir.config.exists():
                    config_text = self.run_dir.config.read_text(encoding="utf-8")
                    self.tb.add_text("config", "    " + config_text.replace("\n", "\n    "), 0)
        if config.log.wandb:
            try:
                import wandb
            except ImportError:
                log("log.wandb: wandb is not installed (pip install wandb); not logging to wandb")
            else:
                self.wandb = wandb.init(project=config.run.name, dir=str(self.run_dir.root), config=config.to_dict())

    def log(self, record: dict) -> None:
        """Scalars of one record, at step = stage, and the grids its stage folder holds."""
        stage = record["stage"]
        scalars = {key: float(v) for key, v in record.items() if key != "stage" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(_tag(key), value, stage)
        if self.wandb is not None:
            self.wandb.log({_tag(key): value for key, value in scalars.items()}, step=stage)
        folder = self.run_dir.stages / stage_name(stage)
        for name, file in (("stage", GRID_FILE), ("eval", EVAL_GRID_FILE)):
            if (folder / file).is_file():
                self.log_images(stage, name, folder / file)
        if self.tb is not None:
            self.tb.flush()

    def log_images(self, stage: int, name: str, path: str | Path) -> None:
        """One grid image under ``grids/<name>`` at step = stage."""
        if self.tb is not None:
            import numpy as np

            with Image.open(path) as image:
                self.tb.add_image(f"grids/{name}", np.asarray(image.convert("RGB")), stage, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"grids/{name}": wandb.Image(str(path))}, step=stage)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
