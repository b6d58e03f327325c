"""What a training run is made of: its settings (`TrainConfig`) and its data (`DataSpec`).

Both are frozen dataclasses that validate every value when built, so a bad value fails
before any work starts, with one line naming the option. `load_config` reads them from a
TOML (or JSON) file: top-level keys are `TrainConfig` fields, the `[data]` table holds
`DataSpec` fields, `[method_options]` and `[teacher_options]` are passed to the recipe and
the stage-1 teacher.

    method = "sotalign"
    steps = 500
    alpha = 1e-4
    [data]
    images = "platonic/images.npy"
    texts = "platonic/texts.npy"
    n_pairs = 1000
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import get_method


#: "random": PyTorch's default; "teacher": heads start as the stage-1 teacher's maps;
#: "auto": "teacher" when the recipe has a teacher a linear head can start from, else "random".
HEAD_INITS = ("auto", "random", "teacher")


class ConfigError(ValueError):
    """A bad option value, an unknown option or an unreadable configuration file."""


def _check_type(owner: str, name: str, value: Any, kind: str) -> None:
    """`kind` is the annotation text of the field: int, float, str, bool, dict, optional forms."""
    if value is None:
        if "None" in kind:
            return
        raise ConfigError(f"{owner}.{name} must be set (got None)")
    base = kind.replace(" | None", "")
    valid = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "dict[str, Any]": isinstance(value, dict),
    }[base]
    if not valid:
        raise ConfigError(f"{owner}.{name} must be {base} (got {value!r})")


def _check_fields(instance) -> None:
    owner = type(instance).__name__
    for f in dataclasses.fields(instance):
        _check_type(owner, f.name, getattr(instance, f.name), str(f.type))


def _positive(owner: str, **values) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{owner}.{name} must be > 0 (got {value})")


def _non_negative(owner: str, **values) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise ConfigError(f"{owner}.{name} must be >= 0 (got {value})")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run; the defaults are the paper's (SOTAlign, Sec. 4 and App. A).

    Batches: the paper fills a batch of at most 32k with up to 10k pairs and completes it
    with unpaired samples; the split between images and texts is not stated, so the
    default takes 11,000 unpaired images and 11,000 unpaired texts (10k + 2 × 11k ≈ 32k).
    A batch size larger than its pool takes the whole pool each step.

    Departures from the paper, measured on real encoders (README, "SOTAlign on real encoders"):
    `alpha` is in the units of `sotalign.klot`, whose plans have mass 1; the paper's rows sum
    to 1 (mass n), so KLOT_paper = n · KLOT_ours and the paper's α = 1e-4 at its ~10k-row
    batches is α ≈ 1 here (the default). `head_init="auto"` starts the heads of a recipe with a
    stage-1 teacher as the teacher's maps (`AlignmentHeads.init_from_teacher`) and makes that
    starting point a candidate of the validation model selection; the paper initialises them
    at random (`head_init="random"`).
    """

    method: str = "sotalign"
    method_options: dict[str, Any] = field(default_factory=dict)
    teacher_options: dict[str, Any] = field(default_factory=dict)
    head_kind: str = "linear"
    head_hidden_dim: int | None = None
    head_init: str = "auto"
    out_dim: int = 1024
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    steps: int = 2000
    paired_batch_size: int = 10_000
    unpaired_batch_size: int = 11_000
    alpha: float = 1.0
    eps: float = 0.05
    eps_teacher: float = 0.01
    n_iters: int = 100
    backend: str = "auto"
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 100
    device: str = "auto"

    def __post_init__(self):
        _check_fields(self)
        owner = "TrainConfig"
        _positive(owner, out_dim=self.out_dim, lr=self.lr, steps=self.steps,
                  paired_batch_size=self.paired_batch_size, unpaired_batch_size=self.unpaired_batch_size,
                  eps=self.eps, eps_teacher=self.eps_teacher, n_iters=self.n_iters,
                  eval_every=self.eval_every, checkpoint_every=self.checkpoint_every,
                  head_hidden_dim=self.head_hidden_dim)
        _non_negative(owner, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                      alpha=self.alpha, seed=self.seed)
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"{owner}.warmup_steps must be < steps ({self.warmup_steps} >= {self.steps})")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"{owner}.head_init must be one of {', '.join(HEAD_INITS)} (got {self.head_init!r})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"{owner}.device must be 'auto', 'cpu' or 'cuda[:N]' (got {self.device!r})")
        try:
            get_method(self.method, **self.method_options)
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(str(error).strip("'\"")) from None

    def recipe(self):
        """The training recipe named by `method`, with `method_options` applied."""
        return get_method(self.method, **self.method_options)


@dataclass(frozen=True)
class DataSpec:
    """Where the embeddings come from: one aligned dataset split into roles, or explicit stores.

    Aligned dataset: `images`/`texts` hold the same items row by row; `make_split` draws
    `n_pairs` pairs, `n_val + n_test` held-out pairs (the first `n_val` validate, the rest
    test) and unpaired images and texts from disjoint rows (`n_unpaired` each, or all that
    remain; `disjoint_unpaired`: images and texts from two disjoint halves of the rows left, so
    no unpaired image has its caption among the unpaired texts). Explicit: `paired_*`
    (required), `unpaired_*`, `val_*`, `test_*` stores; with `n_pairs`, the paired stores are a
    pool from which `n_pairs` pairs are drawn by `split_seed`.
    Paths are embedding stores (.npy, .safetensors, .h5, a directory or shards); `key`
    names the array inside .safetensors/.h5 files.
    """

    images: str | None = None
    texts: str | None = None
    n_pairs: int | None = None
    n_val: int = 1000
    n_test: int = 0
    n_unpaired: int | None = None
    disjoint_unpaired: bool = False
    split_seed: int = 0
    paired_images: str | None = None
    paired_texts: str | None = None
    unpaired_images: str | None = None
    unpaired_texts: str | None = None
    val_images: str | None = None
    val_texts: str | None = None
    test_images: str | None = None
    test_texts: str | None = None
    key: str | None = None

    def __post_init__(self):
        _check_fields(self)
        owner = "DataSpec"
        _positive(owner, n_pairs=self.n_pairs, n_unpaired=self.n_unpaired)
        _non_negative(owner, n_val=self.n_val, n_test=self.n_test, split_seed=self.split_seed)
        explicit = [name for name in ("paired_images", "paired_texts", "unpaired_images", "unpaired_texts",
                                      "val_images", "val_texts", "test_images", "test_texts")
                    if getattr(self, name) is not None]
        if self.aligned:
            if self.images is None or self.texts is None:
                raise ConfigError("data: give both images and texts for an aligned dataset")
            if explicit:
                raise ConfigError(f"data: give either images/texts or explicit stores, not both ({explicit[0]})")
            if self.n_pairs is None:
                raise ConfigError("data: n_pairs is required with images/texts (how many pairs to keep)")
        else:
            if self.paired_images is None or self.paired_texts is None:
                raise ConfigError("data: give images and texts, or paired_images and paired_texts")
            for role in ("unpaired", "val", "test"):
                if (getattr(self, f"{role}_images") is None) != (getattr(self, f"{role}_texts") is None):
                    present = f"{role}_images" if getattr(self, f"{role}_images") else f"{role}_texts"
                    raise ConfigError(f"data: {present} is given without its other modality")

    @property
    def aligned(self) -> bool:
        return self.images is not None or self.texts is not None


def _build(cls, values: dict, source: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def build_configs(values: dict, source: str = "config") -> tuple[TrainConfig, DataSpec | None]:
    """`TrainConfig` and `DataSpec` from a parsed mapping (top level + optional `data` table)."""
    values = dict(values)
    data = values.pop("data", None)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{source}: [data] must be a table")
    config = _build(TrainConfig, values, source)
    return config, (None if data is None else _build(DataSpec, data, f"{source} [data]"))


def load_config(path: str | Path) -> tuple[TrainConfig, DataSpec | None]:
    """Read a run configuration from TOML (or JSON, as written into run directories)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({error})") from None
    return build_configs(values, str(path))


def config_dict(config: TrainConfig, data: DataSpec | None) -> dict:
    """The JSON-able form that `build_configs` reads back (None values left out)."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    if data is not None:
        values["data"] = {k: v for k, v in dataclasses.asdict(data).items() if v is not None}
    return values
