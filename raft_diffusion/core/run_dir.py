"""The run folder: layout, atomic writes, checkpoints, resume bookkeeping.

    runs/<name>/config.yaml  metrics.jsonl  tb/  stages/000004/{chosen.jsonl,grid.png}
                checkpoints/000004/ (complete, atomically renamed)  final/  report.html

A stage is done only when its checkpoint folder was renamed into place. A run folder is only
ever added to: nothing finished is deleted, except old checkpoints beyond ``keep_checkpoints``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from raft_diffusion.core.errors import UserError

TMP_PREFIX = ".tmp-"
STATE_FILE = "state.json"
DIVERGED_FILE = "diverged.json"  # in stages/NNNNNN/: that stage's fine-tuning diverged (not checkpointed)
LOCK_FILE = "run.lock"  # held (flock) by the run using the folder; holds its process id
CONFIG_CHANGES_FILE = "config_changes.jsonl"  # what each resume changed of the config (config.yaml is the first)

# What a resumed run may change: its length (only up), its location, and what only affects logging and
# the output. Everything else defines the results and is refused, sections added later included.
RESUME_MAY_CHANGE = ("run.stages", "run.keep_checkpoints", "run.save_images", "run.grid_prompts", "run.cpu_threads",
                     "run.output_dir", "run.name", "log.")
# After a stage's fine-tuning diverged, the resume that fixes it may also change the rate and the precision.
FIXES_DIVERGENCE = ("train.lr", "train.lr_schedule", "train.lr_min_ratio", "train.max_grad_norm", "train.mixed_precision",
                    "train.adam_betas", "train.adam_eps", "train.weight_decay", "model.dtype")


class RunDirError(UserError):
    """The run folder cannot be used as asked (one-line message)."""


# errno values that mean the file system refuses writes, whichever file was being written.
_WRITE_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def is_run_folder_error(err: OSError, root: Path) -> bool:
    """Whether ``err`` came from a file in (or on the way to) the run folder ``root``, or from a full or
    read-only file system, rather than from reading a model or data file elsewhere."""
    if err.errno in _WRITE_REFUSED:
        return True
    root = Path(os.path.abspath(root))
    for name in (err.filename, err.filename2):
        if name is not None:
            path = Path(os.path.abspath(os.fsdecode(name)))
            if path == root or root in path.parents or path in root.parents:
                return True
    return False


@contextmanager
def os_errors_name(root: Path, what: str, advice: str = "") -> Iterator[None]:
    """Turn an OSError of the run folder into a one-line :class:`RunDirError` naming the path."""
    try:
        yield
    except OSError as err:
        if not is_run_folder_error(err, root):
            raise
        path = os.fsdecode(err.filename) if err.filename is not None else str(root)
        advice = f"; {advice}" if advice else ""
        raise RunDirError(f"{what} {root}: {path}: {err.strerror or type(err).__name__}{advice}") from None


def stage_name(stage: int) -> str:
    return f"{stage:06d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``path`` only if the block completes."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():  # only a re-export of final/ replaces an existing folder
        old = path.with_name(f"{TMP_PREFIX}old-{path.name}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are values."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_fd: int | None = None

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    stages = property(lambda self: self.root / "stages")
    final = property(lambda self: self.root / "final")
    tb = property(lambda self: self.root / "tb")
    report = property(lambda self: self.root / "report.html")
    config_changes = property(lambda self: self.root / CONFIG_CHANGES_FILE)

    def stage_dir(self, stage: int) -> Path:
        path = self.stages / stage_name(stage)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def checkpoint_dir(self, stage: int) -> Path:
        return self.checkpoints / stage_name(stage)

    # -- state ------------------------------------------------------------------------------

    def completed_stages(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        done = []
        for child in self.checkpoints.iterdir():
            if child.name.isdigit() and (child / STATE_FILE).is_file():
                done.append(int(child.name))
        return sorted(done)

    def last_stage(self) -> int:
        """The last stage whose checkpoint is complete (0: none)."""
        done = self.completed_stages()
        return done[-1] if done else 0

    def is_finished(self) -> bool:
        return self.final.is_dir()

    def has_progress(self) -> bool:
        return self.is_finished() or bool(self.completed_stages()) or self.metrics.exists()

    def clean_partial(self) -> list[Path]:
        """Remove half-written checkpoint folders and temporary files left by a crash."""
        removed = []
        for folder in (self.checkpoints, self.root):
            if not folder.is_dir():
                continue
            for child in folder.iterdir():
                if child.name.startswith(TMP_PREFIX):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
                    removed.append(child)
        return removed

    # -- one run per folder -----------------------------------------------------------------

    def lock(self, create: bool = True) -> None:
        """Hold the folder for this process until :meth:`unlock` or its end, however it ends (the
        OS drops a dead process's lock, which the next run takes over). A folder held by another
        process is refused in one line naming it. ``create=False``: only a folder that exists."""
        if self._lock_fd is not None or (not create and not self.root.is_dir()):
            return
        import fcntl  # POSIX, where the runs' libraries run

        with os_errors_name(self.root, "cannot create run folder"):
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirError(f"{self.root} is in use by another run (process {holder or 'unknown'}); "
                              f"wait for it to end, or give this run another run.name") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the flock
            self._lock_fd = None

    # -- a resumed run is still one run -----------------------------------------------------

    def _run_config(self) -> dict:
        """The run's config as it stands: config.yaml with the changes resumes recorded since."""
        import yaml

        config = flatten(yaml.safe_load(self.config.read_text(encoding="utf-8")) or {})
        if self.config_changes.exists():
            for line in self.config_changes.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: that resume did not start
                config.update({key: new for key, (_, new) in record.get("changes", {}).items()})
        return config

    def resume_changes(self, config: dict) -> dict[str, list]:
        """``{key: [run's value, new value]}`` for what a resume with ``config`` (a ``Config.to_dict()``)
        changes; refuses, in one line naming the keys, changes to what defines the results."""
        import yaml

        if not self.config.is_file() or not self.has_progress():
            return {}
        old = self._run_config()
        new = flatten(yaml.safe_load(yaml.safe_dump(config)))  # the types config.yaml holds
        changes = {key: [old.get(key), new.get(key)] for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)}
        allowed = RESUME_MAY_CHANGE
        if (self.stages / stage_name(self.last_stage() + 1) / DIVERGED_FILE).is_file():
            allowed += FIXES_DIVERGENCE
        refused = [key for key in changes if not any(key == a or a.endswith(".") and key.startswith(a) for a in allowed)]
        stages = changes.get("run.stages")
        if stages and isinstance(stages[0], int) and isinstance(stages[1], int) and stages[1] < stages[0]:
            refused.append("run.stages")
        if refused:
            listed = ", ".join(f"{key} ({_short(changes[key][0])} -> {_short(changes[key][1])})" for key in refused)
            raise RunDirError(f"--resume: {self.root} was run with other settings that define its results: {listed}; "
                              f"restore them, or start a new run (another run.name, or --overwrite); a resume may "
                              f"raise run.stages and change run.keep_checkpoints, save_images, grid_prompts, cpu_threads, log.*")
        return changes

    def record_config_changes(self, changes: dict, after_stage: int) -> None:
        """Append what this resume changed to config_changes.jsonl (config.yaml stays the run's first config)."""
        if changes:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "after_stage": after_stage, "changes": changes}
            with open(self.config_changes, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())

    # -- preparing a run --------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail early (before any model loads) when the run folder cannot be written."""
        parent = self.root
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise RunDirError(f"cannot create run folder {self.root}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunDirError(f"run folder {self.root} is not writable (no write permission on {parent})")

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse, touching nothing, what :meth:`prepare` would refuse."""
        if resume and overwrite:
            raise RunDirError("give either --resume or --overwrite, not both")
        with os_errors_name(self.root, "cannot use run folder"):
            self.check_writable()
            if self.root.exists() and not self.root.is_dir():
                raise RunDirError(f"run folder {self.root} exists and is not a folder")
            if self.root.is_dir() and self.has_progress() and not resume and not overwrite:
                what = "a finished run" if self.is_finished() else f"a run at stage {self.last_stage()}"
                raise RunDirError(f"{self.root} already holds {what}; pass --resume to continue it or --overwrite to start over")

    def prepare(self, resume: bool, overwrite: bool) -> int:
        """Make the folder ready; return the stage to continue after (0 for a fresh run)."""
        self.check(resume, overwrite)
        with os_errors_name(self.root, "cannot create run folder"):
            if self.root.is_dir() and self.has_progress() and not resume:
                # Nothing finished is destroyed: the old run is moved aside, not deleted.
                aside = self.root.with_name(f"{self.root.name}.{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.root, aside)
                self.unlock()  # the lock went with it (the caller locks the new folder)
                print(f"moved the previous run to {aside}")
            self.root.mkdir(parents=True, exist_ok=True)
            if not resume:
                return 0
            self.clean_partial()
            last = self.last_stage()
            self.repair_metrics(last)
            return last

    # -- metrics ----------------------------------------------------------------------------

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and isinstance(record.get("stage"), int):
                records.append(record)
        return records

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def repair_metrics(self, last_stage: int) -> None:
        """One line per stage up to ``last_stage``: drop lines of unfinished stages and duplicates,
        restore the line of a stage whose checkpoint landed just before a crash."""
        by_stage: dict[int, dict] = {}
        for record in self.read_metrics():
            if record["stage"] <= last_stage:
                by_stage[record["stage"]] = record
        for stage in self.completed_stages():
            if stage not in by_stage:
                state = self.read_state(stage)
                if state.get("metrics"):
                    by_stage[stage] = state["metrics"]
        text = "".join(json.dumps(by_stage[s]) + "\n" for s in sorted(by_stage))
        if text or self.metrics.exists():
            atomic_write_text(self.metrics, text)

    # -- checkpoints ------------------------------------------------------------------------

    def read_state(self, stage: int) -> dict:
        return json.loads((self.checkpoint_dir(stage) / STATE_FILE).read_text(encoding="utf-8"))

    def prune_checkpoints(self, keep: int, protect: set = frozenset()) -> None:
        """Keep the newest ``keep`` checkpoints (all when 0) and those of the stages in ``protect``."""
        if keep <= 0:
            return
        for stage in self.completed_stages()[:-keep]:
            if stage not in protect:
                shutil.rmtree(self.checkpoint_dir(stage), ignore_errors=True)
