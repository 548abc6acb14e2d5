"""The ``raft-diffusion`` command.

    raft-diffusion train [--config FILE] [--import MODULE ...] [key=value ...] [--resume | --overwrite] [--quiet]
    raft-diffusion sample --model PATH_OR_ID --prompt TEXT --out DIR [--lora DIR] [--n 4] [--seed 0]
    raft-diffusion score IMAGES... [--reward aesthetic] [--prompt TEXT] [--out scores.csv]
    raft-diffusion report RUN_DIR

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input and become one line + exit 2: :class:`UserError`, and the base of
    the ``aesthetic`` package's (which imports nothing of this one), when it was imported."""
    from raft_diffusion.core.errors import UserError

    aesthetic = sys.modules.get("aesthetic.loading")
    return (UserError, *([aesthetic.AestheticError] if aesthetic is not None else []))


def silence_known_warnings() -> None:
    """Hide library warnings known to be harmless here, by exact message: peft reads transformers'
    deprecated ``is_gradient_checkpointing`` when it wraps a model (on every LLM run)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def cmd_train(args: argparse.Namespace) -> int:
    from raft_diffusion.core.config import load_config
    from raft_diffusion.core.loop import RunInterrupted

    config = load_config(args.config, args.overrides, imports=args.imports)
    from raft_diffusion.recipe import train

    try:
        run_dir = train(config, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    except RunInterrupted as err:
        run_root = Path(config.run.output_dir) / config.run.name
        command = ["raft-diffusion", "train", *(["--config", str(args.config)] if args.config else []),
                   *(part for module in args.imports for part in ("--import", module)), *args.overrides, "--resume"]
        print(f"interrupted ({err}); the run in {run_root} is resumable: {shlex.join(command)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    from raft_diffusion.core import dist

    if dist.is_main():
        print(f"done: {run_dir.root}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from raft_diffusion import report
    from raft_diffusion.core.run_dir import RunDir, RunDirError, os_errors_name

    run_dir = RunDir(args.run_dir)
    if not run_dir.metrics.exists() and not run_dir.config.exists():
        raise RunDirError(f"{args.run_dir} is not a run folder (no metrics.jsonl or config.yaml)")
    with os_errors_name(run_dir.root, "cannot write the report in"):
        path = report.write_report(run_dir)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raft-diffusion", description="Reward rAnked FineTuning for diffusion and language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="run RAFT stages (default config: the offline demo)")
    train.add_argument("--config", "-c", help="YAML config (default: the packaged configs/default.yaml, or configs/llm_demo.yaml with model.kind=llm)")
    train.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import a module that registers rewards or adapters before the config is read (repeatable)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. run.stages=3 sampling.k=8")
    train.add_argument("--resume", action="store_true", help="continue after the last complete stage")
    train.add_argument("--overwrite", action="store_true", help="move an existing run aside and start over")
    train.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="write images from a model (and optionally an exported LoRA)")
    from raft_diffusion import sampling

    sampling.build_parser(sample)
    sample.set_defaults(func=sampling.run)

    score = sub.add_parser("score", help="score image files with a reward")
    from raft_diffusion import scoring

    scoring.build_parser(score)
    score.set_defaults(func=scoring.run)

    report = sub.add_parser("report", help="write report.html for a run folder (finished or not)")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `raft-diffusion` alone, or with only overrides, trains the default config.
    if not argv or (argv[0] not in {"train", "sample", "score", "report", "-h", "--help"} and ("=" in argv[0] or argv[0].startswith("--"))):
        argv = ["train", *argv]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after flags (`train --quiet run.stages=2`), which argparse leaves over.
    if getattr(args, "func", None) is cmd_train and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    silence_known_warnings()
    from raft_diffusion import deps

    if os.environ.get("RAFT_DEBUG"):
        deps.check()
        return args.func(args)
    try:
        deps.check()  # before any heavy import: an old diffusers or transformers fails obscurely, or silently
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - classify, then re-raise what is not the user's doing
        if isinstance(err, _user_errors()):
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
