"""What a training run is made of: its settings (`TrainConfig`) and its data
(:class:`~sotalign.data.spec.DataSpec`, defined with the data layer).

Both are frozen dataclasses that validate every value when built, so a bad value fails
before any work starts, with one line naming the option. `load_config` reads them from a
TOML (or JSON) file: top-level keys are `TrainConfig` fields, the `[data]` table holds
`DataSpec` fields, `[method_options]` and `[teacher_options]` are passed to the method and
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..data.spec import ConfigError, DataSpec, check_fields, non_negative, positive
from ..ot import BACKEND_NAMES
from ..ot.options import DEFAULT_EPS, DEFAULT_EPS_TEACHER
from .ddp import KLOT_SCOPES
from .heads import HEAD_KINDS
from .methods import get_method
from .teachers import make_teacher

#: "random": PyTorch's default; "teacher": heads start as the stage-1 teacher's maps;
#: "auto": "teacher" when the method has a teacher a linear head can start from, else "random".
HEAD_INITS = ("auto", "random", "teacher")


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
    batches is α ≈ 1 here (the default). `head_init="auto"` starts the heads of a method with a
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
    eps: float = DEFAULT_EPS
    eps_teacher: float = DEFAULT_EPS_TEACHER
    n_iters: int = 100
    backend: str = "auto"
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 100
    device: str = "auto"
    #: Under torchrun: the KLOT of the global batch ("global") or of each rank's shard ("local").
    klot_scope: str = "global"

    def __post_init__(self):
        check_fields(self)
        owner = "TrainConfig"
        positive(
            owner,
            out_dim=self.out_dim,
            lr=self.lr,
            steps=self.steps,
            paired_batch_size=self.paired_batch_size,
            unpaired_batch_size=self.unpaired_batch_size,
            eps=self.eps,
            eps_teacher=self.eps_teacher,
            n_iters=self.n_iters,
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
            head_hidden_dim=self.head_hidden_dim,
        )
        non_negative(
            owner,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            alpha=self.alpha,
            seed=self.seed,
        )
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"{owner}.warmup_steps must be < steps ({self.warmup_steps} >= {self.steps})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"{owner}.device must be 'auto', 'cpu' or 'cuda[:N]' (got {self.device!r})")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(
                f"{owner}.head_init must be one of {', '.join(HEAD_INITS)} (got {self.head_init!r})"
            )
        if self.klot_scope not in KLOT_SCOPES:
            raise ConfigError(f"{owner}.klot_scope must be one of {KLOT_SCOPES} (got {self.klot_scope!r})")
        if self.backend != "auto" and self.backend not in BACKEND_NAMES:
            raise ConfigError(
                f"{owner}.backend must be 'auto' or one of {', '.join(BACKEND_NAMES)} (got {self.backend!r})"
            )
        if self.head_kind not in HEAD_KINDS:
            raise ConfigError(
                f"{owner}.head_kind must be one of {', '.join(HEAD_KINDS)} (got {self.head_kind!r})"
            )
        try:
            method = self.training_method()
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(str(error).strip("'\"")) from None
        if self.head_init == "teacher" and method.teacher is None:
            raise ConfigError(
                f"{owner}.head_init='teacher' needs a method with a stage-1 teacher, not {self.method!r}"
            )
        if method.teacher is not None:
            try:  # an unfitted teacher: its options are checked, nothing is computed
                make_teacher(method.teacher, **self.teacher_options)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{owner}.teacher_options: {error}") from None
        elif self.teacher_options:
            raise ConfigError(f"{owner}.teacher_options: method {self.method!r} has no teacher")

    def training_method(self):
        """The training method named by `method`, with `method_options` applied."""
        return get_method(self.method, **self.method_options)


def _build(cls, values: dict, source: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
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
        raise ConfigError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({error})"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path}: expected a table of options at the top level, got a {type(values).__name__}"
        )
    return build_configs(values, str(path))


def config_dict(config: TrainConfig, data: DataSpec | None) -> dict:
    """The JSON-able form that `build_configs` reads back (None values left out)."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    if data is not None:
        values["data"] = {k: v for k, v in dataclasses.asdict(data).items() if v is not None}
    return values
