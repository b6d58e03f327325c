"""DDP training: two gloo ranks train the same model as one process with the same global batch,
a two-rank run resumes on one rank, and `sotalign fit` runs under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_TRAINING, toy_spec
from distributed_cluster import Cluster, free_port
from safetensors.torch import load_file

from sotalign.align import AlignmentData, AlignmentHeads, TrainConfig, fit
from sotalign.align.ddp import Ranks, data_parallel
from sotalign.align.losses import klot_divergence
from sotalign.align.teachers import make_teacher
from sotalign.align.trainer import BatchSource, _Step
from sotalign.data import write_platonic
from sotalign.rundir import hold_run_dir

TINY = dict(TINY_TRAINING, lr=1e-3, steps=6, eval_every=3, checkpoint_every=3)
TINY_EPS = TrainConfig().eps


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(2)
    yield c
    c.close()


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    directory = tmp_path_factory.mktemp("platonic")
    write_platonic(directory, 900, image_dim=24, text_dim=20, latent_dim=8, n_concepts=10, seed=3)
    return toy_spec(directory, n_pairs=64, n_val=100, split_seed=0)


class Stop(Exception):
    pass


def train_task(rank, world, spec, run_dir, options, stop_after=None):
    def on_step(step):
        if step == stop_after:
            raise Stop(f"stopped after step {step}")

    torch.set_num_threads(1)
    fit(TrainConfig(**options), AlignmentData.from_spec(spec), run_dir, progress=False, on_step=on_step)
    return sorted(os.listdir(run_dir))


def single_process(spec, run_dir, options, **kwargs):
    fit(TrainConfig(**options), AlignmentData.from_spec(spec), run_dir, progress=False, **kwargs)


def first_step(rank, world, spec, options):
    """The loss terms and the parameter gradients (after DDP) of step 0, as `fit` computes them."""
    torch.set_num_threads(1)
    config, data, device = TrainConfig(**options), AlignmentData.from_spec(spec), torch.device("cpu")
    method = config.training_method()
    ranks = Ranks.from_environment(device, config.klot_scope)
    teacher = None
    if method.teacher is not None:
        teacher = make_teacher(method.teacher)
        teacher.fit(data.paired_images.all(), data.paired_texts.all())
    torch.manual_seed(config.seed)
    heads = AlignmentHeads(
        data.image_dim, data.text_dim, config.out_dim, config.head_kind, config.head_hidden_dim
    )
    losses = method.loss_modules()
    step = data_parallel(
        _Step(
            method,
            heads,
            losses,
            ranks,
            dict(
                eps=config.eps, eps_teacher=config.eps_teacher, n_iters=config.n_iters, backend=config.backend
            ),
        ),
        ranks,
        device,
    )
    batch = BatchSource(method, config, data, teacher, device, ranks).batch(0)
    terms = step(batch)
    weights = method.weights(config.alpha)
    sum(weights[name] * value for name, value in terms.items()).backward()
    grads = {name: p.grad for name, p in [*heads.named_parameters(), *losses.named_parameters()]}
    return {name: value.item() for name, value in terms.items()}, grads, (heads, batch)


@pytest.mark.parametrize("method", ["sotalign", "sail-semi", "structure"])
def test_ddp_gradients_equal_the_single_process_gradients_of_the_global_batch(cluster, spec, method):
    """Lion's update is the sign of the gradient, so the runs below cannot see a wrong scale:
    this compares the gradients themselves (heads, SigLIP scale and bias) after DDP's average."""
    options = dict(TINY, method=method)
    ranks = cluster.run(first_step, spec, options)
    terms, grads, _ = first_step(0, 1, spec, options)
    for rank_terms, rank_grads, _ in ranks:
        assert rank_terms == pytest.approx(terms, rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(rank_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_local_klot_scope_is_the_mean_of_per_rank_klots(cluster, spec):
    options = dict(TINY, method="sotalign", klot_scope="local")
    ranks = cluster.run(first_step, spec, options)
    terms, grads, (heads, batch) = first_step(0, 1, spec, options)
    halves = [
        torch.tensor_split(t, 2)
        for t in (batch.unpaired_images, batch.unpaired_texts, batch.teacher_images, batch.teacher_texts)
    ]
    per_rank = [
        klot_divergence(
            heads.embed_images(x),
            heads.embed_texts(y),
            tx,
            ty,
            eps=TINY_EPS,
            eps_teacher=TINY["eps_teacher"],
            n_iters=TINY["n_iters"],
        )
        for x, y, tx, ty in zip(*halves, strict=True)
    ]
    mean = sum(per_rank).item() / 2
    for rank_terms, _, _ in ranks:
        assert rank_terms["klot"] == pytest.approx(mean, rel=1e-5)
        assert rank_terms["siglip"] == pytest.approx(terms["siglip"], rel=1e-5)
        assert rank_terms["klot"] != pytest.approx(terms["klot"], rel=1e-3)  # not the global KLOT


def assert_same_heads(a, b, atol=1e-5):
    first, second = load_file(a / "heads.safetensors"), load_file(b / "heads.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=atol, msg=name)


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sotalign", "sail-semi"])
def test_two_ranks_train_like_one_process_on_the_global_batch(cluster, spec, tmp_path, method):
    options = dict(TINY, method=method)
    cluster.run(train_task, spec, tmp_path / "ddp", options)
    single_process(spec, tmp_path / "one", options)
    assert_same_heads(tmp_path / "ddp", tmp_path / "one")
    for ddp, one in zip(log(tmp_path / "ddp"), log(tmp_path / "one"), strict=True):
        assert ddp["step"] == one["step"]
        assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-4)


def test_a_two_rank_run_resumes_on_one_rank(cluster, spec, tmp_path):
    options = dict(TINY, method="sotalign")
    outcomes = cluster.outcomes(train_task, spec, tmp_path / "run", options, 4)
    assert all(not ok and kind == "Stop" for ok, (kind, *_) in outcomes)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 3
    single_process(spec, tmp_path / "run", options, resume=True)
    single_process(spec, tmp_path / "whole", options)
    assert_same_heads(tmp_path / "run", tmp_path / "whole")
    assert [r["step"] for r in log(tmp_path / "run")] == list(range(1, 7))


@pytest.mark.slow
def test_sotalign_fit_under_torchrun(spec, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        "-m",
        "sotalign.cli",
        "fit",
        str(tmp_path / "run"),
        "--images",
        spec.images,
        "--texts",
        spec.texts,
        "--pairs",
        "64",
        "--val",
        "100",
        "--steps",
        "4",
        "--batch-pairs",
        "64",
        "--batch-unpaired",
        "96",
        "--out-dim",
        "16",
        "--n-iters",
        "10",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--device",
        "cpu",
        "--klot-scope",
        "global",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # rank 0 takes the run directory's lock: held by this process, every rank is refused
    with hold_run_dir(tmp_path / "run"):
        refused = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0
    assert f"is in use by process {os.getpid()}" in refused.stderr, refused.stderr[-3000:]
    assert "rank 0: " in refused.stderr and not (tmp_path / "run" / "config.json").exists()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").exists()
    assert [r["step"] for r in log(tmp_path / "run")] == [1, 2, 3, 4]
