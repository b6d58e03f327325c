r"""The two-stage SOTAlign trainer (paper Algorithm 1) for every method in `methods`.

Stage 1 fits the method's linear teacher on all pairs (A, B) once. Stage 2 trains the heads:
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
import math
import shutil
import signal
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path

import numpy as np
import torch
from lion_pytorch import Lion
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .. import ot
from ..data import AlignmentData, BatchSampler, Rows
from ..data.scan import refuse_known_bad
from ..data.views import READ_ROWS
from ..eval import retrieval_metrics
from ..rundir import (
    CHECKPOINT,
    CONFIG_FILE,
    DATA_FILE,
    LOCK_FILE,
    LOG_FILE,
    METRICS_FILE,
    TEACHER_DIR,
    append_line,
    hold_run_dir,
    load_checkpoint,
    read_json,
    read_log,
    rewrite_log,
    save_checkpoint,
    write_json,
)
from .config import ConfigError, TrainConfig, config_dict
from .ddp import Ranks, data_parallel
from .heads import AlignmentHeads
from .losses import nnclr_positives, sample_neighbors
from .methods import Batch, Method, loss_terms
from .model import AlignedModel
from .run_inputs import record_data, verify_data
from .teachers import JSON_FILE as TEACHER_JSON
from .teachers import Teacher, make_teacher
from .timing import StepClock

#: Read the next batch while a step runs once reading has taken more than this share of the
#: timed steps (checked after each step, from PREFETCH_PROBE_STEPS timed steps on).
PREFETCH_ABOVE_LOAD_SHARE = 0.10
PREFETCH_PROBE_STEPS = 2
#: fit warns when KLOT's plans stay unconverged this many steps in a row.
NOT_CONVERGED_STEPS = 10

# ----------------------------------------------------------------------------- batches


class BatchSource:
    """The inputs of step t: pairs, unpaired images and unpaired texts drawn independently."""

    def __init__(
        self,
        method: Method,
        config: TrainConfig,
        data: AlignmentData,
        teacher: Teacher | None,
        device: torch.device,
        ranks: Ranks | None = None,
    ):
        self.method, self.data, self.teacher, self.device, self.seed = (
            method,
            data,
            teacher,
            device,
            config.seed,
        )
        self.ranks = ranks or Ranks()

        def sampler(rows: Rows, batch_size: int, stream: str) -> BatchSampler:
            return BatchSampler(
                np.arange(len(rows)), min(batch_size, len(rows)), seed=config.seed, stream=stream
            )

        self.paired = sampler(data.paired_images, config.paired_batch_size, "paired")
        if "unpaired" in method.needs:
            self.images = sampler(data.unpaired_images, config.unpaired_batch_size, "unpaired_images")
            self.texts = sampler(data.unpaired_texts, config.unpaired_batch_size, "unpaired_texts")
        if "neighbours" in method.needs:
            # NNCLR: nearest paired image of each unpaired image, nearest paired caption of each
            # unpaired text, found once in the frozen unimodal spaces (k candidates each).
            self.image_neighbours = self._neighbours(data.unpaired_images, data.paired_images)
            self.text_neighbours = self._neighbours(data.unpaired_texts, data.paired_texts)

    def _neighbours(self, queries: Rows, pool: Rows) -> torch.Tensor:
        pool_features = pool.all()
        return torch.cat(
            [
                nnclr_positives(
                    queries.get(np.arange(s, min(s + READ_ROWS, len(queries)))),
                    pool_features,
                    k=self.method.k,
                )
                for s in range(0, len(queries), READ_ROWS)
            ]
        )

    def read(self, step: int) -> dict[str, torch.Tensor]:
        """The rows of step ``step`` from the stores, in host memory (pinned for a CUDA device),
        each checked for NaN and Inf as it is read. A function of the step alone, so it may
        run ahead in another thread (:class:`Prefetcher`)."""
        data, parts = self.data, {}
        ranks = self.ranks  # this rank's slice of the global batch
        pairs = self.paired.shard(step, ranks.rank, ranks.world)
        parts["paired_images"], parts["paired_texts"] = (
            data.paired_images.get(pairs),
            data.paired_texts.get(pairs),
        )
        if "unpaired" in self.method.needs:
            images = self.images.shard(step, ranks.rank, ranks.world)
            texts = self.texts.shard(step, ranks.rank, ranks.world)
            parts["unpaired_images"], parts["unpaired_texts"] = (
                data.unpaired_images.get(images),
                data.unpaired_texts.get(texts),
            )
        if "neighbours" in self.method.needs:
            # One of the k neighbours, drawn from a generator seeded by (seed, step): stateless.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            near_images = sample_neighbors(self.image_neighbours[torch.from_numpy(images)], generator)
            near_texts = sample_neighbors(self.text_neighbours[torch.from_numpy(texts)], generator)
            parts["neighbour_texts"] = data.paired_texts.get(near_images.numpy())
            parts["neighbour_images"] = data.paired_images.get(near_texts.numpy())
        if self.device.type == "cuda":
            parts = {name: value.pin_memory() for name, value in parts.items()}
        return parts

    def to_device(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value.to(self.device, non_blocking=True) for name, value in parts.items()}

    def with_teacher(self, parts: dict[str, torch.Tensor]) -> Batch:
        """The batch, with the teacher's features of the unpaired rows if the method needs them."""
        if "teacher" in self.method.needs:
            parts["teacher_images"] = self.teacher.transform_images(parts["unpaired_images"])
            parts["teacher_texts"] = self.teacher.transform_texts(parts["unpaired_texts"])
        return Batch(**parts)

    def batch(self, step: int) -> Batch:
        """The inputs of step ``step`` on the device."""
        return self.with_teacher(self.to_device(self.read(step)))


class Prefetcher:
    """``take(step)``: the rows of ``step``, read while the previous step ran once
    :meth:`start` was called. Reads stay in step order, one ahead at most; a read's error is
    raised by the ``take`` of its step, as if read then."""

    def __init__(self, read, steps: int):
        self.read, self.steps = read, steps
        self.pool: ThreadPoolExecutor | None = None
        self.ahead: tuple[int, Future] | None = None

    @property
    def active(self) -> bool:
        return self.pool is not None

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sotalign-prefetch")

    def take(self, step: int) -> dict[str, torch.Tensor]:
        ahead, self.ahead = self.ahead, None
        parts = ahead[1].result() if ahead is not None and ahead[0] == step else self.read(step)
        if self.pool is not None and step + 1 < self.steps:
            self.ahead = (step + 1, self.pool.submit(self.read, step + 1))
        return parts

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`fit`, which first checkpointed the run at ``step``."""

    def __init__(self, run_dir: Path, step: int, steps: int):
        super().__init__(f"interrupted at step {step} of {steps}; checkpoint saved in {run_dir / CHECKPOINT}")
        self.run_dir, self.step, self.steps = run_dir, step, steps


def _has_progress(run_dir: Path) -> bool:
    """A finished step, a checkpoint or a result: what a new run must not overwrite."""
    log = run_dir / LOG_FILE
    return (
        (run_dir / CHECKPOINT).exists()
        or (run_dir / METRICS_FILE).exists()
        or (log.exists() and log.stat().st_size > 0)
    )


def _clear_unstarted(run_dir: Path) -> None:
    """Remove what a run that never finished a step wrote (its configuration and teacher)."""
    for name in (CONFIG_FILE, DATA_FILE, LOG_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / TEACHER_DIR, ignore_errors=True)


def _remove_if_empty(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but its lock file (its holder is this process)."""
    if [path.name for path in run_dir.iterdir()] == [LOCK_FILE]:
        (run_dir / LOCK_FILE).unlink()
        run_dir.rmdir()


def _prepare_run_dir(run_dir: Path, config: TrainConfig, data: AlignmentData, resume: bool) -> bool:
    """Create the run directory and record its configuration and data; on resume, insist they
    are the same. Returns True when this call started the run (its files are new)."""
    stored = config_dict(config, data.spec.resolved() if data.spec is not None else None)
    config_path = run_dir / CONFIG_FILE
    if resume:
        if not config_path.exists():
            raise ValueError(f"{config_path}: no such file; nothing to resume in {run_dir}")
        previous = read_json(config_path)
        changed = sorted(k for k in set(previous) | set(stored) if previous.get(k) != stored.get(k))
        if changed:
            raise ConfigError(
                f"{config_path}: --resume needs the same configuration; changed: {', '.join(changed)}"
            )
        verify_data(run_dir, data)
        return False
    if config_path.exists() or (run_dir / CHECKPOINT).exists():
        if _has_progress(run_dir):
            raise ValueError(
                f"{run_dir} already holds a run ({config_path.name}); pass resume=True / --resume "
                "to continue it, or choose a new directory"
            )
        _clear_unstarted(run_dir)  # it stopped before its first step: start again in place
    write_json(config_path, stored)
    record_data(run_dir, data)
    return True


def _refuse_known_bad_stores(data: AlignmentData) -> None:
    """Refuse a store that ``sotalign check-store`` found NaN or Inf in. Nothing is scanned
    here: every batch is checked as it is read, so set-up does not grow with the pools."""
    stores = {rows.store.path: rows.store for rows in data.views().values()}
    for store in stores.values():
        refuse_known_bad(store)


@contextmanager
def _deferred_interrupt():
    """Ctrl-C asks the training loop to stop after the step in progress (a step is never cut
    in half, so the checkpoint it then writes is exact); a second Ctrl-C stops at once. An
    ignored SIGINT (a job started with nohup or in the background) stays ignored, as Python
    itself leaves it."""
    request = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield request
        return

    def handler(signum, frame):
        if request["stop"]:
            raise KeyboardInterrupt
        request["stop"] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


def _stage1(method: Method, config: TrainConfig, data: AlignmentData, run_dir: Path) -> Teacher | None:
    """Fit the method's teacher on all pairs (or reuse the saved one), saved and read back so a
    fresh and a resumed run use bit-identical teacher maps."""
    if method.teacher is None:
        return None
    teacher_dir = run_dir / TEACHER_DIR
    if not (teacher_dir / TEACHER_JSON).exists():
        teacher = make_teacher(method.teacher, **config.teacher_options)
        teacher.fit(data.paired_images.all(), data.paired_texts.all())
        teacher.save(teacher_dir)
    return Teacher.load(teacher_dir)


def _check_data(method: Method, data: AlignmentData) -> None:
    if "unpaired" in method.needs and (data.unpaired_images is None or data.unpaired_texts is None):
        raise ValueError(
            f"method {method.name!r} needs unpaired images and texts "
            "(give --unpaired-images/--unpaired-texts, or an aligned dataset with rows to spare)"
        )


def _finish(
    run_dir: Path,
    model: AlignedModel,
    data: AlignmentData,
    best_step: int | None,
    seconds: float,
    timing: dict | None = None,
):
    model.save_heads(run_dir)
    metrics = {
        "method": model.method,
        "best_step": best_step,
        "seconds": round(seconds, 3),
        "val": evaluate(model, data.val_images, data.val_texts),
        "test": evaluate(model, data.test_images, data.test_texts),
        "timing": timing,
    }
    write_json(run_dir / METRICS_FILE, metrics)


class _KlotConvergence:
    """One warning when the marginal errors of KLOT's plans stay above
    :data:`sotalign.ot.NOT_CONVERGED` for :data:`NOT_CONVERGED_STEPS` steps in a row (or every
    step of a shorter run)."""

    def __init__(self, config: TrainConfig, steps: int, warn: bool):
        self.config, self.patience, self.warn = config, min(NOT_CONVERGED_STEPS, steps), warn
        self.run = 0  # steps in a row above the threshold

    def observe(self, done: int, student: float, teacher: float) -> None:
        self.run = self.run + 1 if max(student, teacher) > ot.NOT_CONVERGED else 0
        if self.warn and self.run == self.patience:
            self.warn = False
            config = self.config
            warnings.warn(
                f"KLOT did not converge in the {self.run} steps up to step {done}: the marginal error "
                f"is {student:.3g} of the student plan's mass and {teacher:.3g} of the teacher plan's "
                f"(above {ot.NOT_CONVERGED:g}); raise --n-iters (now {config.n_iters}), or --eps (now "
                f"{config.eps:g}) for the student plan and --eps-teacher (now {config.eps_teacher:g}) "
                "for the teacher's",
                RuntimeWarning,
                stacklevel=4,
            )


@contextmanager
def _klot_warns_through_fit():
    """KLOT warns after each forward whose plans miss their marginals: in training, at every
    step. fit silences those warnings and warns once itself (:class:`_KlotConvergence`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"klot's (student|teacher) plan did not converge", category=RuntimeWarning
        )
        yield


def _timing(clock: StepClock, unpaired_rows: int, prefetch: bool) -> dict | None:
    """The timed steps of this process (all but its first): what ``metrics.json`` records."""
    if not clock.steps:
        return None
    per_step = clock.seconds["step"] / clock.steps
    return {
        "steps_timed": clock.steps,
        "seconds_per_step": round(per_step, 6),
        "unpaired_rows_per_second": round(unpaired_rows / per_step, 1),
        "shares": {name: round(share, 4) for name, share in clock.shares().items()},
        "prefetch": prefetch,
    }


def _progress_text(record: dict, clock: StepClock, unpaired_rows: int) -> str:
    """The progress bar's description: the logged values, then where the steps' time goes."""
    text = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
    shares = clock.shares()
    if not shares:
        return text
    per_step = clock.seconds["step"] / clock.steps
    return (
        f"{text} | {unpaired_rows / per_step:.3g} unpaired rows/s, load {shares['load']:.0%} "
        f"teacher {shares['teacher']:.0%} klot fwd {shares['klot_forward']:.0%} "
        f"bwd {shares['klot_backward']:.0%} update {shares['update']:.0%}"
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------- fit


def fit(
    config: TrainConfig,
    data: AlignmentData,
    run_dir,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step=None,
) -> AlignedModel:
    """Train `config.method` on `data`, writing the run directory; returns the selected model.

    `resume=True` continues the run recorded in `run_dir/config.json` (the configuration must
    be the same, and so must the data: :mod:`sotalign.align.run_inputs`) from
    `checkpoints/last.pt`, or from step 0 if it was stopped before the first checkpoint, and
    ends with the same weights as an uninterrupted run. `on_step(step)` is called after every
    finished step (and its checkpoint), e.g. to stop a run.

    The run directory is held for the whole call (:func:`sotalign.rundir.hold_run_dir`; under
    torchrun by rank 0): a second writer is refused at once. The configuration is checked
    when it was built and a store that ``sotalign check-store`` found bad is refused here,
    before anything is written; every batch is checked for NaN and Inf as it is read (the
    error names the file and the row). A run that fails before its first step leaves nothing
    behind, and one killed then is started again in place. Ctrl-C stops after the step in
    progress, writes a checkpoint there and raises :class:`TrainingInterrupted`;
    ``resume=True`` continues it.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    method = config.training_method()
    _check_data(method, data)
    device = resolve_device(config.device)
    ranks = Ranks.from_environment(device, config.klot_scope)
    prepared = {"started_here": False}
    with ExitStack() as held:

        def prepare() -> None:
            _refuse_known_bad_stores(data)
            held.enter_context(hold_run_dir(run_dir))  # rank 0 holds it until fit returns
            try:
                prepared["started_here"] = _prepare_run_dir(run_dir, config, data, resume)
            except BaseException:
                _remove_if_empty(run_dir)
                raise

        ranks.on_main(prepare)
        try:
            return _train(method, config, data, run_dir, device, ranks, resume, progress, on_step, started)
        except BaseException:
            if prepared["started_here"] and not _has_progress(run_dir):
                _clear_unstarted(run_dir)
                _remove_if_empty(run_dir)
            raise


class _Step(nn.Module):
    """The loss terms of one step, as a module (what DistributedDataParallel wraps)."""

    def __init__(
        self, method: Method, heads: AlignmentHeads, losses: nn.ModuleDict, ranks: Ranks, options: dict
    ):
        super().__init__()
        self.method, self.heads, self.losses, self.ranks, self.options = method, heads, losses, ranks, options

    def forward(self, batch: Batch) -> dict:
        return loss_terms(self.method, batch, self.heads, self.losses, ranks=self.ranks, **self.options)


def _train(method, config, data, run_dir, device, ranks, resume, progress, on_step, started) -> AlignedModel:
    """Stages 1 and 2 of :func:`fit` in a prepared run directory (files written by rank 0)."""
    ranks.on_main(lambda: _stage1(method, config, data, run_dir))
    teacher = _stage1(method, config, data, run_dir)  # read back by every rank
    if not method.trains_heads:
        model = AlignedModel(teacher=teacher, method=method.name)
        ranks.on_main(lambda: _finish(run_dir, model, data, None, time.perf_counter() - started))
        return model

    torch.manual_seed(config.seed)  # the heads' initialisation; everything else is seeded statelessly
    heads = AlignmentHeads(
        data.image_dim, data.text_dim, config.out_dim, config.head_kind, config.head_hidden_dim
    ).to(device)
    from_teacher = config.head_init == "teacher" or (
        config.head_init == "auto"
        and teacher is not None
        and config.head_kind == "linear"
        and not teacher.normalize_inputs
    )
    if from_teacher:
        heads.init_from_teacher(teacher)
    losses = method.loss_modules().to(device)
    weights = method.weights(config.alpha)
    optimizer = Lion(
        [*heads.parameters(), *losses.parameters()], lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = LambdaLR(optimizer, cosine_schedule(config.warmup_steps, config.steps))
    batches = BatchSource(method, config, data, teacher, device, ranks)
    model = AlignedModel(heads=heads, teacher=teacher, method=method.name)
    divergence_options = dict(
        eps=config.eps, eps_teacher=config.eps_teacher, n_iters=config.n_iters, backend=config.backend
    )
    clock = StepClock(device)
    step_terms = _Step(method, heads, losses, dataclasses.replace(ranks, clock=clock), divergence_options)

    start, best = 0, {"step": None, "metric": -math.inf, "heads": None, "losses": None}
    checkpoint_path, log_path = run_dir / CHECKPOINT, run_dir / LOG_FILE
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, device)
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
        best = {
            "step": 0,
            "metric": metric,
            "heads": _clone(heads.state_dict()),
            "losses": _clone(losses.state_dict()),
        }
    step_terms = data_parallel(step_terms, ranks, device)  # after loading: all ranks start equal
    if ranks.is_main and log_path.exists():
        rewrite_log(log_path, read_log(log_path, start))
    progress = progress and ranks.is_main

    bar = Progress(
        TextColumn(f"[bold]{method.name}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        disable=not progress,
        transient=False,
    )

    def save(done: int, best: dict) -> None:
        save_checkpoint(
            checkpoint_path,
            {
                "step": done,
                "heads": heads.state_dict(),
                "heads_config": heads.config(),
                "losses": losses.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0),
                "best": best,
            },
        )

    unpaired_rows = batches.images.batch_size + batches.texts.batch_size if "unpaired" in method.needs else 0
    prefetcher = Prefetcher(batches.read, config.steps)
    convergence = _KlotConvergence(config, config.steps - start, warn=ranks.is_main)
    with bar, _deferred_interrupt() as interrupt, closing(prefetcher), _klot_warns_through_fit():
        task = bar.add_task("", total=config.steps, completed=start)
        first_step_done = None
        for step in range(start, config.steps):
            clock.enabled = step > start  # the first step pays for warm-ups
            step_started = clock.now()
            with clock.phase("load"):
                parts = batches.to_device(prefetcher.take(step))
            with clock.phase("teacher"):
                batch = batches.with_teacher(parts)
            with clock.phase("forward"):
                terms = step_terms(batch)
                loss = sum(weights[name] * value for name, value in terms.items())
                plan_errors = ot.klot_marginal_errors() if "klot" in terms else None
            with clock.phase("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with clock.phase("update"):
                optimizer.step()
                scheduler.step()

            done = step + 1
            # every logged value in one read of the device: the step's one host sync
            logged = [t.detach().double().reshape(1) for t in (loss, *terms.values())]
            if plan_errors is not None:
                logged.append(plan_errors.detach().double().reshape(2))
            values = torch.cat(logged).tolist()
            record = {
                "step": done,
                "lr": scheduler.get_last_lr()[0],
                **dict(zip(["loss", *terms], values[: 1 + len(terms)], strict=True)),
            }
            if plan_errors is not None:
                record["klot_marginal_error"] = {"student": values[-2], "teacher": values[-1]}
                convergence.observe(done, *values[-2:])
            clock.settle()
            if not prefetcher.active and clock.steps >= PREFETCH_PROBE_STEPS:
                if clock.shares()["load"] > PREFETCH_ABOVE_LOAD_SHARE:
                    prefetcher.start()
            if data.val_images is not None and (done % config.eval_every == 0 or done == config.steps):
                record["val"] = evaluate(model, data.val_images, data.val_texts)
                if record["val"]["mean_R@1"] > best["metric"]:
                    best = {
                        "step": done,
                        "metric": record["val"]["mean_R@1"],
                        "heads": _clone(heads.state_dict()),
                        "losses": _clone(losses.state_dict()),
                    }
            stop = ranks.any(interrupt["stop"])  # every rank stops at the same step
            checkpoint = done % config.checkpoint_every == 0 or done == config.steps or stop
            if ranks.is_main:
                append_line(log_path, record, durable=checkpoint)
                if checkpoint:
                    save(done, best)
            bar.update(task, completed=done, description=_progress_text(record, clock, unpaired_rows))
            if on_step is not None:
                on_step(done)
            if done == start + 1:
                first_step_done = time.perf_counter()
            elif done == start + 2 and progress:  # the first step pays for warm-ups
                per_step = time.perf_counter() - first_step_done
                left = _duration(per_step * (config.steps - done))
                bar.console.print(
                    f"{config.steps} steps planned (--steps), {config.out_dim}-d heads (--out-dim): "
                    f"about {left} left at {per_step:.3g} s per step",
                    markup=False,
                )
            if ranks.any(interrupt["stop"]) and done < config.steps:
                if ranks.is_main and not checkpoint:  # Ctrl-C came after this step's checkpoint decision
                    save(done, best)
                ranks.barrier()
                raise TrainingInterrupted(run_dir, done, config.steps)
            clock.add("step", step_started)
    clock.settle(wait=True)
    timing = _timing(clock, unpaired_rows, prefetcher.active)

    if best["heads"] is not None:  # model selection on the validation split
        heads.load_state_dict(best["heads"])
        losses.load_state_dict(best["losses"])
    best_step = best["step"] if best["heads"] is not None else config.steps
    ranks.on_main(lambda: _finish(run_dir, model, data, best_step, time.perf_counter() - started, timing))
    return model
