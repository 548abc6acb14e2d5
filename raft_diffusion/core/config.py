"""The run configuration: dataclasses loaded from YAML and overridden by dotted ``key=value`` pairs.

Every key is declared and documented here; an unknown key, a wrong type or an impossible value is
refused with a one-line :class:`ConfigError` before any model loads.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from raft_diffusion.core import plugins
from raft_diffusion.core.errors import UserError


class ConfigError(UserError):
    """A config problem, reported in one line that names the key."""


@dataclass
class RunConfig:
    name: str = "demo"  # run folder name under output_dir
    output_dir: str = "runs"  # parent folder of run folders
    seed: int = 0  # every random draw of the run derives from it (prompts, candidates, training)
    stages: int = 4  # number of generate -> score -> select -> fine-tune stages
    keep_checkpoints: int = 0  # keep only the newest N stage checkpoints (0: keep all)
    save_images: bool = True  # write stages/NNNNNN/grid.png and eval_grid.png (image runs; text runs always keep eval_samples.jsonl)
    grid_prompts: int = 4  # prompts shown in each stage grid
    cpu_threads: int = 0  # torch threads when running on the CPU (0: torch's default); tiny models run best on 1


@dataclass
class LoraConfig:
    rank: int = 4  # LoRA rank r; 0 trains the full model (LLM adapter only)
    alpha: float = 4.0  # LoRA scaling numerator (scale = alpha / rank)
    targets: list[str] = field(default_factory=list)  # module names; empty: the adapter's default
    dropout: float = 0.0


@dataclass
class ModelConfig:
    kind: str = "diffusion"  # diffusion | llm | an installed adapter | package.module:Class
    pretrained: str = "demo:sd"  # hub id or local folder; demo:NAME is a packaged demo model
    revision: Optional[str] = None  # hub revision
    variant: Optional[str] = None  # weights variant, e.g. fp16
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16: weights of the frozen model
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    lora: LoraConfig = field(default_factory=LoraConfig)
    init_lora: Optional[str] = None  # start from an exported LoRA folder instead of a fresh one
    args: dict = field(default_factory=dict)  # settings of a plug-in adapter without a section of its own


@dataclass
class SamplingConfig:
    k: int = 4  # candidates per prompt
    prompts_per_stage: int = 8  # prompts drawn per stage
    batch_size: int = 16  # samples per model call (diffusion: images per denoiser call, before CFG doubling)
    seed_offset: int = 0  # added to candidate seeds (draw other candidates from the same run seed)


@dataclass
class SelectionConfig:
    strategy: str = "local"  # local | global | local_then_global
    keep: float = 0.25  # fraction kept: per prompt (local), of the batch (global), of the per-prompt best (local_then_global)
    beta: float = 0.0  # KL-shaped ranking r - beta * log(p/p0); needs an adapter with log_ratio


@dataclass
class TrainConfig:
    lr: float = 1e-4
    steps_per_stage: int = 20  # optimizer steps per stage
    batch_size: int = 4  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0: no clipping
    weight_decay: float = 0.0  # AdamW's decoupled decay; on a LoRA it pulls the model toward the base one
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    mixed_precision: str = "no"  # no | fp16 | bf16 (through accelerate)
    gradient_checkpointing: bool = False
    lr_schedule: str = "constant"  # constant | cosine | linear: the learning rate over the run's optimizer steps
    lr_min_ratio: float = 0.1  # cosine/linear: the last step's learning rate as a fraction of train.lr
    # Sample, evaluate, checkpoint and export an exponential moving average of the trainable weights,
    # updated after every optimizer step (diffusers' EMAModel, with its warm-up); 0: off.
    ema_decay: float = 0.0


@dataclass
class ReplayConfig:
    """What each stage fine-tunes on besides its own chosen candidates (cached payloads, no regeneration)."""

    stages: int = 0  # also the chosen candidates of the previous N stages (0: this stage's only)
    max_samples: int = 0  # at most this many in all, the highest-reward ones (0: no cap)
    anchor_share: float = 0.0  # share of the training samples that are the starting model's own samples
    # (prior preservation: unselected stage-1 candidates, trained toward themselves; 0: none)
    anchor_samples: int = 64  # how many stage-1 candidates are kept as anchors


@dataclass
class GuardConfig:
    """Against over-optimisation: which stage is exported, and when a run stops early."""

    metric: str = ""  # export the stage whose held-out `metric` was highest, e.g. eval_reward or
    # eval_<name> of eval.metrics ("": export the last stage)
    patience: int = 0  # stop when `metric` has not improved for this many evaluations (0: never)
    watch: list[str] = field(default_factory=list)  # held-out metrics that must not fall (eval_<name>)
    max_drop_se: float = 0.0  # stop when a watched metric lies this many paired SE below its best (0: never)


@dataclass
class PromptsConfig:
    items: list[str] = field(default_factory=list)  # inline prompts
    file: Optional[str] = None  # .txt (one per line, # comments) or .jsonl with a "prompt" field
    builtin: Optional[str] = None  # cifar10 | simple_animals | demo_train | demo_eval | llm_demo_train | llm_demo_eval
    eval_items: list[str] = field(default_factory=list)  # held-out prompts for eval_reward
    eval_file: Optional[str] = None
    eval_builtin: Optional[str] = None
    shuffle: bool = True  # draw each stage's prompts from a shuffled order (seeded) instead of cycling in order


@dataclass
class EvalConfig:
    every: int = 1  # evaluate on held-out prompts every N stages, and before the first (0: never)
    k: int = 2  # samples per eval prompt (fixed seeds, the same at every evaluation)
    max_prompts: int = 0  # 0: all eval prompts
    # Eval-only scorers, logged as eval_<name> but never used for selection
    # (e.g. the demo world's gold scorers, or a held-out reward to watch over-optimisation).
    metrics: list[dict] = field(default_factory=list)


@dataclass
class LogConfig:
    tensorboard: bool = True  # write tb/ when tensorboard is installed
    wandb: bool = False  # log to Weights & Biases when installed (project = run.name)
    report: bool = True  # write report.html at the end


@dataclass
class Config:
    # Modules imported before any name is looked up: they register plug-ins (``@register_reward``),
    # e.g. [mypkg.rewards]; a module beside the config file is found from any working folder.
    imports: list[str] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    # Each entry: {name: registered reward, weight: float, args: {...}}
    # or {target: "package.module:function", weight: float, args: {...}};
    # normalize: none | stage | prompt z-scores that part over the stage's candidates or each prompt's K first.
    rewards: list[dict] = field(default_factory=lambda: [{"name": "aesthetic", "weight": 1.0, "args": {"clip": "demo"}}])
    train: TrainConfig = field(default_factory=TrainConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # The settings of the adapter model.kind names, written in the section it declares (`diffusion:`,
    # `llm:`) and built from its own dataclass (see `adapter_section`); None for an adapter without one.
    adapter: Any = None

    def to_dict(self) -> dict:
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "adapter":
                if value is not None:
                    data[adapter_section(self.model.kind)[0]] = dataclasses.asdict(value)
            else:
                data[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
        return data


def adapter_section(kind: str) -> tuple[str, type] | None:
    """(section name, settings dataclass) that the adapter ``kind`` declares as its class attributes
    ``config_section`` and ``Settings``; None for an adapter without a section (it reads ``model.args``)."""
    try:
        cls = plugins.find("adapters", kind, "adapter")
    except plugins.PluginError as err:
        raise ConfigError(f"model.kind: {err}") from None
    section, settings = getattr(cls, "config_section", None), getattr(cls, "Settings", None)
    return (section, settings) if section and dataclasses.is_dataclass(settings) else None


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating


def _hint(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# Lists of names that cannot hold a comma, which may also be written comma-separated.
COMMA_LISTS = {"model.lora.targets", "guard.watch"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            # A string where a list is expected is one item (prompts are full of commas), except for
            # lists whose items never hold a comma: `model.lora.targets=to_q,to_v`.
            if key in COMMA_LISTS:
                value = [v.strip() for v in value.split(",") if v.strip()]
            else:
                value = [value] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            return _word_for_bool(value, key)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


# The words YAML 1.1 (PyYAML) reads as booleans.
_YAML_BOOL_WORDS = {True: ("yes", "true", "on"), False: ("no", "false", "off")}


def _word_for_bool(value: bool, key: str) -> str:
    """The word a user typed where YAML read a boolean: ``train.mixed_precision: no`` means "no".

    Only a choice field with exactly one of YAML's words for that boolean among its choices can be
    read back; anywhere else the word is unknown (``on`` or ``yes``?) and must be quoted."""
    words = [c for c in _CHOICES.get(key, ()) if c in _YAML_BOOL_WORDS[value]]
    if len(words) == 1:
        return words[0]
    read, example = str(value).lower(), _YAML_BOOL_WORDS[value][0]
    raise ConfigError(
        f"{key}: expected a string, got {read} (YAML reads {'/'.join(_YAML_BOOL_WORDS[value])} as {read}); "
        f"quote the word, e.g. {key}: '{example}' in YAML or \"{key}='{example}'\" on a command line"
    )


def _build(cls, data: dict, prefix: str):
    """An instance of the dataclass ``cls`` from ``data``; a field typed ``Optional[SomeDataclass]``
    is a section that stays None unless given."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    types_ = {k: v for k, v in _field_types(cls).items() if not (cls is Config and k == "adapter")}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"unknown config key {full!r}{_hint(str(key), types_)}")
        tp = types_[key]
        optional = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(optional) == 1 and dataclasses.is_dataclass(optional[0]):
            kwargs[key] = None if value is None else _build(optional[0], value, f"{full}.")
        elif dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{full}.")
        elif key == "rewards" or key == "metrics":
            kwargs[key] = _reward_specs(value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


_REWARD_KEYS = {"name", "target", "weight", "args", "normalize"}
# rewards[].normalize: a part z-scored over the stage's candidates, or within each prompt's K, before weighting
NORMALIZE_MODES = ("none", "stage", "prompt")


def _reward_specs(value: Any, key: str) -> list[dict]:
    if isinstance(value, (dict, str)):  # one reward: `rewards=aesthetic` or `rewards=pkg.mod:fn`
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of {{name: ..., weight: ..., args: {{...}}}}")
    specs = []
    for i, spec in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(spec, str):  # shorthand: a reward name or a module:function target
            spec = {"target": spec} if ":" in spec else {"name": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping with 'name' or 'target'")
        for k in spec:
            if k not in _REWARD_KEYS:
                raise ConfigError(f"unknown config key '{where}.{k}'{_hint(str(k), _REWARD_KEYS)}")
        if not spec.get("name") and not spec.get("target"):
            raise ConfigError(f"{where}: needs 'name' (a registered reward) or 'target' ('module:function')")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{where}.weight: expected a finite number, got {weight!r}")
        if spec.get("args") is not None and not isinstance(spec["args"], dict):
            raise ConfigError(f"{where}.args: expected a mapping")
        spec = {**spec, "weight": float(weight), "args": dict(spec.get("args") or {})}
        if "normalize" in spec:
            spec["normalize"] = _normalize_mode(spec["normalize"], where, key)
        specs.append(spec)
    return specs


def _normalize_mode(value: Any, where: str, key: str) -> str:
    mode = "none" if value is False or value is None else value  # YAML reads `normalize: off` as false
    if mode not in NORMALIZE_MODES:
        raise ConfigError(f"{where}.normalize: {value!r} is not one of {', '.join(NORMALIZE_MODES)}")
    if mode != "none" and key.endswith("metrics"):
        raise ConfigError(f"{where}.normalize: eval-only metrics are reported as they are; normalize is for rewards")
    return mode


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so numbers, booleans and lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value (e.g. run.stages=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


# Keys that name one of several alternative sources: overriding one clears the others, so that
# `prompts.file=my.txt` on top of a config with `prompts.builtin` just works.
_ALTERNATIVES = [("items", "file", "builtin"), ("eval_items", "eval_file", "eval_builtin")]


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``key=value`` in ``data``; a number in the key indexes a list (``rewards.0.args.clip=demo``).

    A list the YAML does not set starts from its default, so that ``rewards.0.args.pretrained=...``
    reaches the default reward."""
    defaults = Config().to_dict()
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 2 and path[0] == "prompts" and isinstance(data.get("prompts"), dict):
            for group in _ALTERNATIVES:
                if path[1] in group:
                    for other in group:
                        if other != path[1]:
                            data["prompts"].pop(other, None)
        node, default = data, defaults
        for depth, part in enumerate(path):
            where = ".".join(path[: depth + 1])
            last = depth == len(path) - 1
            if isinstance(node, list):
                index = _list_index(node, part, where, ".".join(path[:depth]), text)
                if last:
                    node[index] = value
                    break
                child = node[index]
                if isinstance(child, str) and ".".join(path[:depth]) in _REWARD_LISTS:  # shorthand `- aesthetic`
                    child = node[index] = {"target": child} if ":" in child else {"name": child}
                default = default[index] if isinstance(default, list) and index < len(default) else None
            elif last:
                node[part] = value
                break
            else:
                child = node.get(part)
                has_default = isinstance(default, dict) and part in default
                default = default.get(part) if isinstance(default, dict) else None
                if child is None:
                    if has_default and not isinstance(default, (dict, list)):
                        child = default  # a value: refused below
                    else:
                        child = node[part] = copy.deepcopy(default) if isinstance(default, list) else {}
                if where in _REWARD_LISTS and isinstance(child, (dict, str)):  # one reward, not in a list
                    child = node[part] = [child]
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override {text!r}: {where} is a value, not a section or a list")
            node = child
    return data


_REWARD_LISTS = ("rewards", "eval.metrics")  # lists of reward specs, which may be written as one spec or a name


def _list_index(items: list, part: str, where: str, list_key: str, text: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"override {text!r}: {list_key} is a list; name an entry by its index, e.g. {list_key}.0")
    index = int(part)
    if index >= len(items):
        n = len(items)
        has = {0: "no entries", 1: "1 entry (index 0)"}.get(n, f"{n} entries (indexes 0-{n - 1})")
        raise ConfigError(f"override {text!r}: {where} is out of range, {list_key} has {has}")
    return index


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def from_dict(data: dict) -> Config:
    """A checked ``Config`` from a mapping (missing keys take the dataclass defaults): its ``imports``
    imported, the core sections, and the section of the adapter that ``model.kind`` names, built from
    that adapter's own dataclass."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    core = {k: v for k, v in data.items() if k in _field_types(Config) and k != "adapter"}
    config = _build(Config, core, "")
    for i, module in enumerate(config.imports):
        try:
            plugins.import_module(module)
        except plugins.PluginError as err:
            raise ConfigError(f"imports[{i}]: {err}") from None
    _check_kind(config.model.kind)
    section = adapter_section(config.model.kind)
    for key in data:
        if key not in core and (section is None or key != section[0]):
            own = f"; model.kind {config.model.kind!r} reads its settings from '{section[0]}:'" if section else ""
            raise ConfigError(f"unknown config key {key!r}{_hint(str(key), [*core, *(section[:1] if section else [])])}{own}")
    if section is not None:
        name, settings = section
        config.adapter = _build(settings, data.get(name) or {}, f"{name}.")
    validate(config)
    return config


PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def default_config_path(overrides: list[str] = ()) -> Path:
    """The packaged offline default of the adapter the overrides name: ``configs/llm_demo.yaml`` for
    ``model.kind=llm`` (the image demo's LoRA targets name no layer of a language model), else
    ``configs/default.yaml`` (the demo world with a recipe for any reward)."""
    kinds = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "model.kind"]
    return PACKAGED_CONFIGS / ("llm_demo.yaml" if kinds and kinds[-1] == "llm" else "default.yaml")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, imports: list[str] = ()) -> Config:
    """Load a YAML config, apply ``key=value`` overrides, import the modules its ``imports`` key and
    ``imports`` name (``raft-diffusion train --import``), validate.

    Without a path: the command line's default, the packaged demo config (:func:`default_config_path`);
    ``from_dict({})`` gives the bare dataclass defaults. Modules beside the config file can be named
    by ``imports`` and reward or adapter targets from any working folder."""
    overrides = list(overrides or [])
    path = Path(path) if path else default_config_path(overrides)
    data = load_yaml(path)
    plugins.add_search_folder(path.parent)
    data = apply_overrides(data, overrides)
    if imports:
        data["imports"] = _coerce(data.get("imports") or [], list[str], "imports") + list(imports)
    return from_dict(data)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


_CHOICES = {
    "model.dtype": ("auto", "float32", "float16", "bfloat16"),
    "selection.strategy": ("local", "global", "local_then_global"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_kind(kind: str) -> None:
    kinds = plugins.names("adapters")
    _check(kind in kinds or plugins.is_target(kind),
           f"model.kind: {kind!r} is not one of {', '.join(kinds)} (or a 'package.module:Class' adapter)"
           f"{_hint(str(kind), kinds)}")


def validate(c: Config) -> None:
    """Refuse impossible values, naming the key."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(c, section), name)
        _check(value in choices, f"{key}: {value!r} is not one of {', '.join(choices)}{_hint(str(value), choices)}")
    _check_kind(c.model.kind)
    name = c.run.name
    _check(bool(name.strip()) and name not in (".", "..") and not any(ch in name for ch in "/\\\0"),
           f"run.name: {name!r} must be one plain folder name (no '.', '..', path separators or empty)")
    _check(c.run.stages >= 1, f"run.stages must be >= 1, got {c.run.stages}")
    _check(c.run.keep_checkpoints >= 0, f"run.keep_checkpoints must be >= 0, got {c.run.keep_checkpoints}")
    _check(c.run.cpu_threads >= 0, f"run.cpu_threads must be >= 0, got {c.run.cpu_threads}")
    _check(c.run.seed >= 0, f"run.seed must be >= 0, got {c.run.seed}")
    _check(c.model.lora.rank >= 0, f"model.lora.rank must be >= 0, got {c.model.lora.rank}")
    _check(0.0 <= c.model.lora.dropout < 1.0, f"model.lora.dropout must be in [0, 1), got {c.model.lora.dropout}")
    s = c.sampling
    _check(s.k >= 1, f"sampling.k must be >= 1, got {s.k}")
    _check(s.prompts_per_stage >= 1, f"sampling.prompts_per_stage must be >= 1, got {s.prompts_per_stage}")
    _check(s.batch_size >= 1, f"sampling.batch_size must be >= 1, got {s.batch_size}")
    sel = c.selection
    _check(0.0 < sel.keep <= 1.0, f"selection.keep must be in (0, 1], got {sel.keep}")
    _check(sel.beta >= 0 and math.isfinite(sel.beta), f"selection.beta must be >= 0, got {sel.beta}")
    t = c.train
    _check(t.lr > 0 and math.isfinite(t.lr), f"train.lr must be > 0, got {t.lr}")
    _check(t.steps_per_stage >= 0, f"train.steps_per_stage must be >= 0, got {t.steps_per_stage}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _check(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {t.max_grad_norm}")
    _check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "train.adam_betas must be two numbers in [0, 1)")
    _check(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    _check(0.0 <= t.lr_min_ratio <= 1.0, f"train.lr_min_ratio must be in [0, 1], got {t.lr_min_ratio}")
    r = c.replay
    _check(r.stages >= 0, f"replay.stages must be >= 0, got {r.stages}")
    _check(r.max_samples >= 0, f"replay.max_samples must be >= 0, got {r.max_samples}")
    _check(0.0 <= r.anchor_share < 1.0, f"replay.anchor_share must be in [0, 1), got {r.anchor_share}")
    _check(r.anchor_samples >= 1, f"replay.anchor_samples must be >= 1, got {r.anchor_samples}")
    g = c.guard
    for key in [g.metric, *g.watch]:
        _check(not key or key.startswith("eval_"), f"guard: {key!r} is not a held-out metric (eval_reward or eval_<name>)")
    _check(g.patience >= 0, f"guard.patience must be >= 0, got {g.patience}")
    _check(g.max_drop_se >= 0, f"guard.max_drop_se must be >= 0, got {g.max_drop_se}")
    _check(not (g.metric or g.watch) or c.eval.every > 0, "guard: needs held-out evaluations (eval.every > 0)")
    _check(not g.patience or g.metric, "guard.patience needs guard.metric")
    _check(not g.max_drop_se or g.watch, "guard.max_drop_se needs guard.watch")
    _check(not g.watch or g.max_drop_se > 0,
           "guard.watch needs guard.max_drop_se > 0 (how many paired standard errors a watched metric may fall)")
    _check(c.eval.every >= 0, f"eval.every must be >= 0, got {c.eval.every}")
    _check(c.eval.k >= 1, f"eval.k must be >= 1, got {c.eval.k}")
    _check(c.eval.max_prompts >= 0, f"eval.max_prompts must be >= 0, got {c.eval.max_prompts}")
    _check(bool(c.rewards), "rewards: at least one reward is needed")
    p = c.prompts
    sources = [bool(p.items), p.file is not None, p.builtin is not None]
    _check(sum(sources) <= 1, "prompts: give only one of items, file, builtin")
    eval_sources = [bool(p.eval_items), p.eval_file is not None, p.eval_builtin is not None]
    _check(sum(eval_sources) <= 1, "prompts: give only one of eval_items, eval_file, eval_builtin")
