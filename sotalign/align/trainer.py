r"""The two-stage SOTAlign trainer (paper Algorithm 1) for every recipe in `methods`.

Stage 1 fits the recipe's linear teacher on all pairs (A, B) once. Stage 2 trains the heads:
each step draws, independently, a batch of pairs, a batch of unpaired images X_b and a batch of
unpaired texts Y_b (stateless samplers: batch = function of (seed, stream, step)), computes the
teacher features X_b W_xᵀ, Y_b W_yᵀ on the fly, and takes one Lion step on

    L = Σ_terms weight · term        (e.g. SigLIP(pairs) + α · KLOT(unpaired ‖ teacher))

with a cosine learning-rate schedule. Every `eval_every` steps the heads are scored on the
validation pairs (mean of image→text and text→image R@1) and the best are kept (the paper's
model selection). Checkpoints (heads, loss parameters, optimizer, scheduler, RNG, best-so-far)
are written atomically, so `resume=True` continues a killed run to bitwise the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lion_pytorch import Lion
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.optim.lr_scheduler import LambdaLR

from ..data import BatchSampler, EmbeddingStore, check_aligned, make_split, open_store
from ..eval import retrieval_metrics
from ..model import AlignedModel, atomic_write_bytes, read_json, write_json
from .config import ConfigError, DataSpec, TrainConfig, config_dict
from .heads import AlignmentHeads
from .losses import nnclr_positives, sample_neighbors
from .methods import Batch, Recipe, loss_terms
from .teachers import Teacher, make_teacher

CHECKPOINT = Path("checkpoints") / "last.pt"
READ_ROWS = 65536  # rows read at once when a whole pool is needed (NNCLR neighbours, stage 1)


# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Rows:
    """Some rows of an embedding store: row p of this view is `store` row `indices[p]`."""

    store: EmbeddingStore
    indices: np.ndarray

    @classmethod
    def whole(cls, store: EmbeddingStore) -> "Rows":
        return cls(store, np.arange(len(store), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def dim(self) -> int:
        return self.store.dim

    def get(self, positions) -> torch.Tensor:
        return self.store.rows(self.indices[np.asarray(positions)])

    def all(self) -> torch.Tensor:
        return torch.cat([self.get(np.arange(s, min(s + READ_ROWS, len(self))))
                          for s in range(0, len(self), READ_ROWS)])


@dataclass(frozen=True)
class AlignmentData:
    """Paired, unpaired, validation and test rows of a run, and the spec they came from."""

    paired_images: Rows
    paired_texts: Rows
    unpaired_images: Rows | None = None
    unpaired_texts: Rows | None = None
    val_images: Rows | None = None
    val_texts: Rows | None = None
    test_images: Rows | None = None
    test_texts: Rows | None = None
    spec: DataSpec | None = None

    def __post_init__(self):
        for modality, dim in (("images", self.paired_images.dim), ("texts", self.paired_texts.dim)):
            for role in ("unpaired", "val", "test"):
                rows = getattr(self, f"{role}_{modality}")
                if rows is not None and rows.dim != dim:
                    raise ValueError(f"{rows.store.path}: {role} {modality} have dimension {rows.dim}, "
                                     f"but the paired {modality} ({getattr(self, f'paired_{modality}').store.path}) "
                                     f"have {dim}")
        for role in ("paired", "val", "test"):
            images, texts = getattr(self, f"{role}_images"), getattr(self, f"{role}_texts")
            if images is not None and len(images) != len(texts):
                raise ValueError(f"{role} stores are not aligned: {images.store.path} gives {len(images)} rows, "
                                 f"{texts.store.path} gives {len(texts)}")
        if len(self.paired_images) < 2:
            raise ValueError(f"{self.paired_images.store.path}: need at least 2 pairs, got {len(self.paired_images)}")

    @property
    def image_dim(self) -> int:
        return self.paired_images.dim

    @property
    def text_dim(self) -> int:
        return self.paired_texts.dim

    def sizes(self) -> dict[str, int]:
        return {f"{role}_{m}": len(getattr(self, f"{role}_{m}")) for role in ("paired", "unpaired", "val", "test")
                for m in ("images", "texts") if getattr(self, f"{role}_{m}") is not None}

    @classmethod
    def from_spec(cls, spec: DataSpec) -> "AlignmentData":
        """Open the stores of `spec` (lazily) and split an aligned dataset into its roles."""
        if not spec.aligned:
            def pair(role):
                images, texts = getattr(spec, f"{role}_images"), getattr(spec, f"{role}_texts")
                if images is None:
                    return None, None
                return Rows.whole(open_store(images, key=spec.key)), Rows.whole(open_store(texts, key=spec.key))

            (pi, pt), (ui, ut), (vi, vt), (ti, tt) = (pair(r) for r in ("paired", "unpaired", "val", "test"))
            if spec.n_pairs is not None:  # the paired stores are a pool: draw n_pairs of them
                check_aligned(pi.store, pt.store)
                if spec.n_pairs > len(pi):
                    raise ValueError(f"{spec.paired_images}: {spec.n_pairs} pairs requested from a pool of {len(pi)}")
                drawn = np.sort(np.random.default_rng([spec.split_seed, 2]).permutation(len(pi))[:spec.n_pairs])
                pi, pt = Rows(pi.store, drawn), Rows(pt.store, drawn)
            return cls(pi, pt, ui, ut, vi, vt, ti, tt, spec=spec)
        images, texts = open_store(spec.images, key=spec.key), open_store(spec.texts, key=spec.key)
        check_aligned(images, texts)
        held_out = spec.n_val + spec.n_test
        split = make_split(len(images), spec.n_pairs, held_out, n_unpaired=spec.n_unpaired, seed=spec.split_seed,
                           disjoint_unpaired=spec.disjoint_unpaired)
        # make_split returns sorted rows; shuffle before cutting validation from test so that
        # neither is biased towards one end of the store.
        order = np.random.default_rng([spec.split_seed, 4]).permutation(split.val)
        val, test = np.sort(order[:spec.n_val]), np.sort(order[spec.n_val:])

        def rows(store, indices):
            return Rows(store, indices) if len(indices) else None

        return cls(Rows(images, split.paired), Rows(texts, split.paired),
                   rows(images, split.unpaired_images), rows(texts, split.unpaired_texts),
                   rows(images, val), rows(texts, val), rows(images, test), rows(texts, test), spec=spec)


# ----------------------------------------------------------------------------- batches

class BatchSource:
    """The inputs of step t: pairs, unpaired images and unpaired texts drawn independently."""

    def __init__(self, recipe: Recipe, config: TrainConfig, data: AlignmentData, teacher: Teacher | None,
                 device: torch.device):
        self.recipe, self.data, self.teacher, self.device, self.seed = recipe, data, teacher, device, config.seed

        def sampler(rows: Rows, batch_size: int, stream: str) -> BatchSampler:
            return BatchSampler(np.arange(len(rows)), min(batch_size, len(rows)), seed=config.seed, stream=stream)

        self.paired = sampler(data.paired_images, config.paired_batch_size, "paired")
        if "unpaired" in recipe.needs:
            self.images = sampler(data.unpaired_images, config.unpaired_batch_size, "unpaired_images")
            self.texts = sampler(data.unpaired_texts, config.unpaired_batch_size, "unpaired_texts")
        if "neighbours" in recipe.needs:
            # NNCLR: nearest paired image of each unpaired image, nearest paired caption of each
            # unpaired text, found once in the frozen unimodal spaces (k candidates each).
            self.image_neighbours = self._neighbours(data.unpaired_images, data.paired_images)
            self.text_neighbours = self._neighbours(data.unpaired_texts, data.paired_texts)

    def _neighbours(self, queries: Rows, pool: Rows) -> torch.Tensor:
        pool_features = pool.all()
        return torch.cat([nnclr_positives(queries.get(np.arange(s, min(s + READ_ROWS, len(queries)))),
                                          pool_features, k=self.recipe.k)
                          for s in range(0, len(queries), READ_ROWS)])

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def batch(self, step: int) -> Batch:
        data, parts = self.data, {}
        pairs = self.paired.batch(step)
        parts["paired_images"], parts["paired_texts"] = data.paired_images.get(pairs), data.paired_texts.get(pairs)
        if "unpaired" in self.recipe.needs:
            images, texts = self.images.batch(step), self.texts.batch(step)
            parts["unpaired_images"], parts["unpaired_texts"] = data.unpaired_images.get(images), data.unpaired_texts.get(texts)
        if "teacher" in self.recipe.needs:
            parts["teacher_images"] = self.teacher.transform_images(parts["unpaired_images"])
            parts["teacher_texts"] = self.teacher.transform_texts(parts["unpaired_texts"])
        if "neighbours" in self.recipe.needs:
            # One of the k neighbours, drawn from a generator seeded by (seed, step): stateless.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            near_images = sample_neighbors(self.image_neighbours[torch.from_numpy(images)], generator)
            near_texts = sample_neighbors(self.text_neighbours[torch.from_numpy(texts)], generator)
            parts["neighbour_texts"] = data.paired_texts.get(near_images.numpy())
            parts["neighbour_images"] = data.paired_images.get(near_texts.numpy())
        return Batch(**{name: self._to(value) for name, value in parts.items()})


# ----------------------------------------------------------------------------- helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def cosine_schedule(warmup_steps: int, steps: int):
    """LR factor of step t: linear warm-up over `warmup_steps`, then ½(1 + cos(π·progress))."""
    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (t - warmup_steps) / (steps - warmup_steps)))
    return factor


def evaluate(model: AlignedModel, images: Rows | None, texts: Rows | None) -> dict | None:
    """Retrieval metrics (percent) of the aligned model on held-out pairs, or None."""
    if images is None:
        return None
    return retrieval_metrics(model.embed_images(images.all()), model.embed_texts(texts.all()))


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt file; all mean the same
        raise ValueError(f"{path}: cannot read the checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None


def _prepare_run_dir(run_dir: Path, config: TrainConfig, data: AlignmentData, resume: bool) -> None:
    """Create the run directory and record its configuration; on resume, insist it is the same."""
    stored = config_dict(config, data.spec)
    config_path = run_dir / "config.json"
    if resume:
        if not config_path.exists():
            raise ValueError(f"{config_path}: no such file; nothing to resume in {run_dir}")
        previous = read_json(config_path)
        changed = sorted(k for k in set(previous) | set(stored) if previous.get(k) != stored.get(k))
        if changed:
            raise ConfigError(f"{config_path}: --resume needs the same configuration; changed: {', '.join(changed)}")
        return
    if (run_dir / CHECKPOINT).exists() or config_path.exists():
        raise ValueError(f"{run_dir} already holds a run ({config_path.name}); pass resume=True / --resume "
                         "to continue it, or choose a new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(config_path, stored)


def _stage1(recipe: Recipe, config: TrainConfig, data: AlignmentData, run_dir: Path) -> Teacher | None:
    """Fit the recipe's teacher on all pairs (or reuse the saved one), saved and read back so a
    fresh and a resumed run use bit-identical teacher maps."""
    if recipe.teacher is None:
        return None
    teacher_dir = run_dir / "teacher"
    if not (teacher_dir / "teacher.json").exists():
        teacher = make_teacher(recipe.teacher, **config.teacher_options)
        teacher.fit(data.paired_images.all(), data.paired_texts.all())
        teacher.save(teacher_dir)
    return Teacher.load(teacher_dir)


def _check_data(recipe: Recipe, data: AlignmentData) -> None:
    if "unpaired" in recipe.needs and (data.unpaired_images is None or data.unpaired_texts is None):
        raise ValueError(f"method {recipe.name!r} needs unpaired images and texts "
                         "(give --unpaired-images/--unpaired-texts, or an aligned dataset with rows to spare)")


def _finish(run_dir: Path, model: AlignedModel, data: AlignmentData, best_step: int | None, seconds: float):
    model.save_heads(run_dir)
    metrics = {"method": model.method, "best_step": best_step, "seconds": round(seconds, 3),
               "val": evaluate(model, data.val_images, data.val_texts),
               "test": evaluate(model, data.test_images, data.test_texts)}
    write_json(run_dir / "metrics.json", metrics)


def _restart_log(path: Path, step: int) -> None:
    """Keep the log lines up to the checkpointed step (later ones will be written again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


# ----------------------------------------------------------------------------- fit

def fit(config: TrainConfig, data: AlignmentData, run_dir, *, resume: bool = False, progress: bool = True,
        on_step=None) -> AlignedModel:
    """Train `config.method` on `data`, writing the run directory; returns the selected model.

    `resume=True` continues the run recorded in `run_dir/config.json` (the configuration must
    be the same) from `checkpoints/last.pt`, or from step 0 if it was stopped before the first
    checkpoint, and ends with the same weights as an uninterrupted run. `on_step(step)` is called after
    every finished step (and its checkpoint), e.g. to stop a run.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    recipe = config.recipe()
    _check_data(recipe, data)
    device = resolve_device(config.device)
    _prepare_run_dir(run_dir, config, data, resume)

    teacher = _stage1(recipe, config, data, run_dir)
    if not recipe.trains_heads:
        model = AlignedModel(teacher=teacher, method=recipe.name)
        _finish(run_dir, model, data, None, time.perf_counter() - started)
        return model

    torch.manual_seed(config.seed)  # the heads' initialisation; everything else is seeded statelessly
    heads = AlignmentHeads(data.image_dim, data.text_dim, config.out_dim, config.head_kind,
                           config.head_hidden_dim).to(device)
    if config.head_init == "teacher" and teacher is None:
        raise ConfigError(f"head_init='teacher' needs a method with a stage-1 teacher, not {recipe.name!r}")
    from_teacher = config.head_init == "teacher" or (
        config.head_init == "auto" and teacher is not None and config.head_kind == "linear"
        and not teacher.normalize_inputs)
    if from_teacher:
        heads.init_from_teacher(teacher)
    losses = recipe.loss_modules().to(device)
    weights = recipe.weights(config.alpha)
    optimizer = Lion([*heads.parameters(), *losses.parameters()], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = LambdaLR(optimizer, cosine_schedule(config.warmup_steps, config.steps))
    batches = BatchSource(recipe, config, data, teacher, device)
    model = AlignedModel(heads=heads, teacher=teacher, method=recipe.name)
    divergence_options = dict(eps=config.eps, eps_teacher=config.eps_teacher, n_iters=config.n_iters,
                              backend=config.backend)

    start, best = 0, {"step": None, "metric": -math.inf, "heads": None, "losses": None}
    checkpoint_path, log_path = run_dir / CHECKPOINT, run_dir / "log.jsonl"
    if resume and checkpoint_path.exists():
        state = _load_checkpoint(checkpoint_path, device)
        heads.load_state_dict(state["heads"])
        losses.load_state_dict(state["losses"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        start, best = state["step"], state["best"]
    elif from_teacher and data.val_images is not None:
        # The starting point (the teacher itself) is a candidate of the model selection, so a
        # run never ends worse on validation than its teacher.
        metric = evaluate(model, data.val_images, data.val_texts)["mean_R@1"]
        best = {"step": 0, "metric": metric, "heads": _clone(heads.state_dict()), "losses": _clone(losses.state_dict())}
    _restart_log(log_path, start)

    bar = Progress(TextColumn(f"[bold]{recipe.name}[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                   disable=not progress, transient=False)
    with bar, log_path.open("a") as log:
        task = bar.add_task("", total=config.steps, completed=start)
        for step in range(start, config.steps):
            terms = loss_terms(recipe, batches.batch(step), heads, losses, **divergence_options)
            loss = sum(weights[name] * value for name, value in terms.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

            done = step + 1
            record = {"step": done, "lr": scheduler.get_last_lr()[0], "loss": float(loss.detach()),
                      **{name: float(value.detach()) for name, value in terms.items()}}
            if data.val_images is not None and (done % config.eval_every == 0 or done == config.steps):
                record["val"] = evaluate(model, data.val_images, data.val_texts)
                if record["val"]["mean_R@1"] > best["metric"]:
                    best = {"step": done, "metric": record["val"]["mean_R@1"],
                            "heads": _clone(heads.state_dict()), "losses": _clone(losses.state_dict())}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if done % config.checkpoint_every == 0 or done == config.steps:
                _save_checkpoint(checkpoint_path, {
                    "step": done, "heads": heads.state_dict(), "losses": losses.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0),
                    "best": best})
            bar.update(task, completed=done, description=" ".join(
                f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "val")))
            if on_step is not None:
                on_step(done)

    if best["heads"] is not None:  # model selection on the validation split
        heads.load_state_dict(best["heads"])
        losses.load_state_dict(best["losses"])
    _finish(run_dir, model, data, best["step"] if best["heads"] is not None else config.steps,
            time.perf_counter() - started)
    return model


# ----------------------------------------------------------------------------- compare

def compare(config: TrainConfig, spec: DataSpec, methods: list[str], seeds: list[int], out_dir, *,
            progress: bool = True, fixed_split: bool = False) -> dict:
    """Train each method for each seed on the same data; summarise held-out mean R@1.

    Seed s sets both the training seed and, for an aligned dataset or a pool of explicit pairs
    (`spec.n_pairs`), the split (which pairs are kept), so every method sees the same rows for
    a given seed; `fixed_split=True` keeps `spec.split_seed` for every seed instead. The score is the test
    split's mean R@1 when there is one, else the validation split's. Finished runs under
    `out_dir/<method>/seed<s>` are reused (their checkpoints resume), so a killed comparison
    can be restarted. Writes `out_dir/compare.json` and `out_dir/compare.md`.
    """
    out_dir = Path(out_dir)
    runs = []
    for seed in seeds:
        redraw = (spec.aligned or spec.n_pairs is not None) and not fixed_split
        seed_spec = dataclasses.replace(spec, split_seed=seed) if redraw else spec
        data = AlignmentData.from_spec(seed_spec)
        for method in methods:
            run_config = dataclasses.replace(config, method=method, seed=seed,
                                             method_options=config.method_options if method == config.method else {})
            run_dir = out_dir / method / f"seed{seed}"
            fit(run_config, data, run_dir, resume=(run_dir / "config.json").exists(), progress=progress)
            metrics = read_json(run_dir / "metrics.json")
            split = "test" if metrics["test"] is not None else "val"
            runs.append({"method": method, "seed": seed, "split": split, "best_step": metrics["best_step"],
                         "seconds": metrics["seconds"], **(metrics[split] or {})})
    summary = {}
    for method in methods:
        scores = [r["mean_R@1"] for r in runs if r["method"] == method and "mean_R@1" in r]
        summary[method] = {"mean_R@1": float(np.mean(scores)) if scores else None,
                           "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                           "n": len(scores)}
    result = {"config": config_dict(config, spec), "methods": methods, "seeds": seeds,
              "runs": runs, "summary": summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "compare.json", result)
    atomic_write_bytes(out_dir / "compare.md", comparison_markdown(result).encode())
    return result


def comparison_markdown(result: dict) -> str:
    """A Markdown table of mean R@1 ± std (over seeds) per method."""
    split = result["runs"][0]["split"] if result["runs"] else "val"
    lines = [f"| method | {split} mean R@1 (%) | seeds |", "|---|---:|---:|"]
    for method, s in result["summary"].items():
        lines.append(f"| {method} | {s['mean_R@1']:.2f} ± {s['std']:.2f} | {s['n']} |")
    return "\n".join(lines) + "\n"
