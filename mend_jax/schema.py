"""The run configuration as one typed schema: frozen dataclasses, one per section.

`RunConfig.from_dict(d)` turns a composed YAML mapping (see `mend_jax.config.load_config`) into
the typed config, checking every key against its field: unknown keys fail with the closest
ones, values by their annotated type (`int | None`, `tuple[str, ...]`, `Literal[...]`, a nested
section) and by the ranges below, and each dataclass's own `__post_init__` checks run. Keys a
mapping leaves out take the field defaults, so defaults live here and nowhere else.
`RunConfig.to_dict()` gives back the plain mapping that `config.yaml` stores.

The `alg` sections are the dataclasses of the code they configure: `alg.editor` is the trained
editor's config (MENDConfig, KEConfig or ENNConfig, as `alg.method` says), `alg.train` the
TrainConfig, `alg.loop` the LoopConfig, and each `alg.baselines.<method>` that method's config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from mend_jax.editors import ENNConfig, KEConfig, MENDConfig, editor_config
from mend_jax.errors import ConfigError
from mend_jax.loop import LoopConfig
from mend_jax.training import TrainConfig

DTYPES = ("float32", "bfloat16", "float16")
# The meta-trained editors: a run trains the one its `alg.method` names (default mend).
TRAINED = ("mend", "ke", "enn")
METHODS = ("mend", "ke", "enn", "untrained", "ultraedit", "ft", "ft_l", "ft_kl")

# Lower bounds by dotted key ("*" matches any baseline method).
AT_LEAST = {
    "eval.n_edits": 1, "eval.max_examples": 1, "model.max_length": 2,
    "model.pretrain.steps": 1, "model.pretrain.batch_size": 1, "model.pretrain.lr": 0,
    "model.tokenizer.vocab_size": 259, "data.n_train": 1, "data.n_val": 1, "data.n_test": 1,
    "data.prefix_tokens": 1, "data.target_tokens": 1, "mesh.data": -1, "mesh.model": -1,
    "alg.loop.max_steps": 1, "alg.loop.val_every": 1, "alg.loop.n_edits": 1,
    "alg.loop.batch_size": 1, "alg.loop.val_batches": 1, "alg.loop.save_every": 1,
    "alg.loop.log_every": 1, "alg.loop.early_stop_patience": 0, "alg.train.accumulate": 1,
    "alg.train.lr": 0, "alg.train.lr_lr": 0, "alg.editor.rank": 1, "alg.editor.n_hidden": 0,
    "alg.train.c_base": 0, "alg.editor.n_edit_steps": 1, "alg.editor.hidden_dim": 1,
    "alg.editor.condition_dim": 1, "alg.baselines.*.steps": 1,
}


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class EvalSection:
    split: Literal["train", "val", "test"] = "test"
    n_edits: int = 1                      # simultaneous edits per edit call
    methods: tuple[str, ...] = ("mend", "untrained", "ft", "ft_l")
    max_examples: int | None = None       # evaluate at most this many held-out requests


@dataclass(frozen=True)
class PretrainSection:
    """How a base model built from `model.build` is taught its benchmark (model.name null)."""
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenizerSection:
    """The tokenizer trained for a built base model: byte-level BPE or the benchmark's words."""
    kind: Literal["bpe", "word"] = "bpe"
    vocab_size: int | None = 2048         # bpe only

    def __post_init__(self):
        if self.kind == "word" and self.vocab_size is not None:
            raise ValueError("the word tokenizer takes no vocab_size (set it to null)")

    def options(self) -> dict:
        return {} if self.kind == "word" else {"vocab_size": self.vocab_size}


@dataclass(frozen=True)
class ModelSection:
    # A checkpoint folder or hub name; null builds a small model from `build` and teaches it
    # the benchmark (the offline default).
    name: str | None = None
    max_length: int = 32
    inner_params: tuple[str, ...] | None = None   # the edited weights (null: the model's default)
    build: dict[str, Any] = field(default_factory=dict)   # transformers config fields
    pretrain: PretrainSection = PretrainSection()
    tokenizer: TokenizerSection = TokenizerSection()
    preset: str | None = None             # the configs/model/*.yaml file it came from


@dataclass(frozen=True)
class DataSection:
    format: str | None = None             # null: detected from the files' fields
    train_path: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    loc_path: str | None = None
    n_train: int | None = None            # generated benchmarks: split sizes (null: the rest)
    n_val: int | None = None
    n_test: int | None = None
    edit_forms: tuple[str, ...] = ("statement",)   # geonames: the surface forms edited
    n_cities: int = 400                   # geonames: city -> country facts (most populous first)
    max_cities_per_country: int = 10      # geonames: at most this many cities of one country
    # the relations (as the requests name them: geonames', or a file's relation field) whose
    # edits the editor trains and validates on (null: all); the test split keeps every
    # relation, reported as seen / held-out relations
    train_relations: tuple[str, ...] | None = None
    prefix_tokens: int = 48               # wikitext: prompt length
    target_tokens: int = 10               # wikitext: greedy target length
    preset: str | None = None

    def __post_init__(self):
        from mend_jax.offline.geonames import FORMS, RELATIONS

        if not self.edit_forms or any(f not in FORMS for f in self.edit_forms):
            raise ValueError(f"edit_forms must be a non-empty list of {list(FORMS)}, got "
                             f"{list(self.edit_forms)}")
        if self.train_relations is not None:
            known = RELATIONS if self.format == "geonames" else None
            if not self.train_relations or (known and any(r not in known
                                                          for r in self.train_relations)):
                raise ValueError(f"data.train_relations must be a non-empty list of "
                                 f"{list(known or ['relation names'])} (or null: all), got "
                                 f"{list(self.train_relations)}")
        for name in ("n_cities", "max_cities_per_country"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be a positive integer, got "
                                 f"{getattr(self, name)}")


@dataclass(frozen=True)
class MeshSection:
    """Devices of the meta-training step: data-parallel x model (FSDP) axes; -1 takes the rest."""
    data: int = -1
    model: int = 1


@dataclass(frozen=True)
class AlgSection:
    method: Literal["mend", "ke", "enn"] = "mend"
    editor: MENDConfig | KEConfig | ENNConfig = MENDConfig()   # the `method`'s config
    train: TrainConfig = TrainConfig()
    loop: LoopConfig = LoopConfig()
    baselines: dict[str, Any] = field(default_factory=dict)   # method -> FTConfig, ...
    preset: str | None = None


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    cache_dir: str = ".cache/mend-jax"
    progress: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat: bool = False
    eval: EvalSection = EvalSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    alg: AlgSection = AlgSection()
    mesh: MeshSection = MeshSection()

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The typed config of a composed mapping; a `ConfigError` names any bad key."""
        return _parse(d)

    def to_dict(self) -> dict:
        """The plain mapping (lists, None) that config.yaml stores; `from_dict` reads it back."""
        return _plain(self)

    def replace(self, **dotted: Any) -> RunConfig:
        """A copy with dotted keys set (`cfg.replace(**{"eval.split": "val"})`), re-checked."""
        d = self.to_dict()
        for key, value in dotted.items():
            set_dotted(d, key, list(value) if isinstance(value, tuple) else value)
        return _parse(d)


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested mapping; whether the key exists is the schema's to say."""
    keys = dotted.split(".")
    node = d
    for i, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted!r}: {'.'.join(keys[:i + 1])} is not a mapping")
    node[keys[-1]] = value


# ----------------------------------------------------------------------------- parsing
_PRESET_KEY = "_name"    # how config.yaml marks the group file a section came from


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _describe(tp) -> str:
    if tp is type(None):
        return "null"
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string",
             list: "a list", tuple: "a list", dict: "a mapping"}
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (tuple, list):
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _type_error(key: str, value: Any, options: list) -> ConfigError:
    want = " or ".join(dict.fromkeys(_describe(t) for t in options))
    hint = ""
    if int in options and isinstance(value, float) and value.is_integer():
        hint = f" (write {int(value)})"
    elif any(typing.get_origin(t) in (tuple, list) for t in options) and isinstance(value, str):
        hint = " (YAML list syntax: [a, b])"
    return ConfigError(f"{key}={value!r}: expected {want}{hint}")


def _convert(key: str, value: Any, tp) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    options = list(typing.get_args(tp)) if origin in (typing.Union, types.UnionType) else [tp]
    if value is None:
        if type(None) in options or tp is Any:
            return None
        raise _type_error(key, value, options)
    for option in options:
        got = _try(key, value, option)
        if got is not _NO:
            return got
    raise _type_error(key, value, options)


_NO = object()


def _try(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}={value!r}: expected one of "
                          f"{', '.join(map(str, typing.get_args(tp)))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _NO
        (item, *_) = typing.get_args(tp)
        return tuple(_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        return dict(value) if isinstance(value, dict) else _NO
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    return value if isinstance(tp, type) and isinstance(value, tp) else _NO


def _check_range(key: str, value: Any) -> None:
    parts = key.split(".")
    pattern = f"alg.baselines.*.{parts[3]}" if key.startswith("alg.baselines.") and \
        len(parts) == 4 else key
    low = AT_LEAST.get(pattern)
    if low is not None and isinstance(value, (int, float)) and value < low:
        raise ConfigError(f"{key}={value!r}: must be >= {low}")


def _fields(cls, values: dict, prefix: str, skip: tuple[str, ...] = ()) -> dict:
    """Checked keyword arguments of dataclass `cls` from `values` (keys under `prefix`)."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key == _PRESET_KEY and "preset" in names:
            key = "preset"
        if key in skip:
            continue
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            raise ConfigError(f"{prefix}.{key}: unknown key; closest: {close or sorted(names)}")
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(full, value, hints[key])
        _check_range(full, kwargs[key])
    return kwargs


def _build(cls, values: dict, prefix: str, **extra):
    kwargs = {**_fields(cls, values, prefix), **extra}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix}: {e}") from None


def _parse(d: dict) -> RunConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping, got {type(d).__name__}")
    d = dict(d)
    alg = d.pop("alg", None)
    cfg = _build(RunConfig, d, "", alg=_parse_alg({} if alg is None else alg))
    unknown = [m for m in cfg.eval.methods if m not in METHODS]
    if unknown or not cfg.eval.methods:
        raise ConfigError(f"eval.methods={list(cfg.eval.methods)!r}: each must be one of "
                          f"{list(METHODS)}")
    # "mend" (the default list's entry) stands for whichever editor the run trains.
    trained = cfg.alg.method
    other = [m for m in cfg.eval.methods if m in TRAINED and m not in ("mend", trained)]
    if other:
        raise ConfigError(f"eval.methods={list(cfg.eval.methods)!r}: this run trains {trained} "
                          f"(alg.method), so it has no {other[0]} editor to evaluate")
    if cfg.mesh.data == 0 or cfg.mesh.model == 0 or (cfg.mesh.data == cfg.mesh.model == -1):
        raise ConfigError(f"mesh: data={cfg.mesh.data}, model={cfg.mesh.model}: sizes must be "
                          "positive, at most one of them -1 (all remaining devices)")
    return cfg


def _parse_alg(values: Any) -> AlgSection:
    if not isinstance(values, dict):
        raise ConfigError(f"alg: expected a mapping, got {values!r}")
    method = values.get("method", "mend")
    if method not in TRAINED:
        raise ConfigError(f"alg.method={method!r}: expected one of {list(TRAINED)}")
    editor_cls = {"mend": MENDConfig, "ke": KEConfig, "enn": ENNConfig}[method]
    train = dict(values.get("train") or {})
    if train.get("c_base") and method != "enn":
        raise ConfigError(f"alg.train.c_base={train['c_base']!r}: only ENN (alg.method: enn) "
                          f"meta-learns the model's weights; remove it or set 0 for "
                          f"alg.method={method}")
    loop = _build(LoopConfig, _mapping(values.get("loop"), "alg.loop"), "alg.loop")
    train_kwargs = _fields(TrainConfig, _mapping(train, "alg.train"), "alg.train")
    if train_kwargs.get("lr_schedule") == "cosine" and not train_kwargs.get("decay_steps"):
        # a cosine schedule decays over the loop's optimizer updates
        accumulate = train_kwargs.get("accumulate", TrainConfig.accumulate)
        train_kwargs["decay_steps"] = -(-loop.max_steps // accumulate)
    try:
        train_cfg = TrainConfig(**train_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"alg.train: {e}") from None
    baselines = {}
    for name, options in _mapping(values.get("baselines"), "alg.baselines").items():
        if name not in METHODS or name in TRAINED or name == "untrained":
            raise ConfigError(f"alg.baselines.{name}: unknown method; choose from "
                              f"{[m for m in METHODS if m not in TRAINED + ('untrained',)]}")
        prefix = f"alg.baselines.{name}"
        kwargs = _fields(type(editor_config(name)), _mapping(options, prefix), prefix)
        try:
            baselines[name] = editor_config(name, **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{prefix}: {e}") from None
    rest = {k: v for k, v in values.items() if k not in ("editor", "train", "loop", "baselines")}
    return _build(AlgSection, rest, "alg",
                  editor=_build(editor_cls, _mapping(values.get("editor"), "alg.editor"),
                                "alg.editor"),
                  train=train_cfg, loop=loop, baselines=baselines)


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _plain(value: Any, key: str = "") -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            name = _PRESET_KEY if f.name == "preset" else f.name
            item = getattr(value, f.name)
            if f.name == "preset" and item is None:
                continue
            out[name] = _plain(item, f"{key}.{name}")
        return out
    if isinstance(value, dict):
        return {k: _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    return value
