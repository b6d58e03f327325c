"""The `sotalign` command end to end on tiny platonic stores: fit, eval, compare, distance, info."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import toy_flags
from safetensors.torch import load_file
from typer.testing import CliRunner

import sotalign
from sotalign.cli import app
from sotalign.data import open_store, write_platonic
from sotalign.eval import retrieval_metrics, selection_distance

runner = CliRunner()
FAST = [
    "--out-dim",
    "12",
    "--lr",
    "1e-2",
    "--batch-pairs",
    "48",
    "--batch-unpaired",
    "64",
    "--n-iters",
    "10",
    "--eval-every",
    "5",
    "--checkpoint-every",
    "5",
    "--device",
    "cpu",
    "--quiet",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("platonic")
    write_platonic(directory, 700, image_dim=20, text_dim=16, latent_dim=6, n_concepts=5, seed=2)
    return directory


def data_args(store, pairs=48):
    return toy_flags(store, pairs, 100, "--test", "150")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_fit_then_eval_retrieval_and_zero_shot(store, tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "fit", run, *data_args(store), "--method", "sotalign", "--steps", "10", "--alpha", "0.1", *FAST
    )
    assert result.exit_code == 0, result.output
    for name in (
        "config.json",
        "heads.safetensors",
        "heads.json",
        "metrics.json",
        "log.jsonl",
        "teacher/teacher.json",
        "checkpoints/last.pt",
    ):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())

    # `eval` on the run's own test split recomputes the metrics of metrics.json
    out = tmp_path / "eval.json"
    result = invoke("eval", run, "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["retrieval (test)"] == pytest.approx(metrics["test"])

    # on explicit stores: the same numbers as embedding them with sotalign.load
    images, texts = open_store(store / "images.npy"), open_store(store / "texts.npy")
    model = sotalign.load(run)
    expected = retrieval_metrics(
        model.embed_images(images.read(0, 700)), model.embed_texts(texts.read(0, 700))
    )
    result = invoke(
        "eval", run, "--images", store / "images.npy", "--texts", store / "texts.npy", "--json", out
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["retrieval"] == pytest.approx(expected)

    result = invoke(
        "eval",
        run,
        "--images",
        store / "images.npy",
        "--labels",
        store / "labels.npy",
        "--classes",
        store / "classes.json",
        "--text-encoder",
        f"platonic:{store}",
        "--template",
        "a photo of a {}.",
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    zero_shot = json.loads(out.read_text())["zero-shot"]
    assert 100 / 5 < zero_shot["top1"] <= 100  # above chance over 5 concepts


def test_fit_from_toml_and_resume_after_sigkill(store, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'method = "sail"\nsteps = 60\nout_dim = 12\nlr = 1e-2\npaired_batch_size = 16\n'
        f'eval_every = 2\ncheckpoint_every = 2\ndevice = "cpu"\n'
        f'[data]\nimages = "{store / "images.npy"}"\ntexts = "{store / "texts.npy"}"\n'
        f"n_pairs = 48\nn_val = 100\n"
    )
    whole = invoke("fit", tmp_path / "whole", "--config", config, "--quiet")
    assert whole.exit_code == 0, whole.output

    # A real kill: start the CLI in a subprocess, SIGKILL it once it has checkpointed, resume.
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sotalign.cli", "fit", str(run), "--config", str(config), "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (
        not (run / "checkpoints" / "last.pt").exists() and process.poll() is None and time.time() < deadline
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if (run / "heads.safetensors").exists():
        pytest.skip("the run finished before it could be killed")
    result = invoke("fit", run, "--resume", "--quiet")
    assert result.exit_code == 0, result.output
    a, b = load_file(tmp_path / "whole" / "heads.safetensors"), load_file(run / "heads.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compare_summarises_mean_and_std_over_seeds(store, tmp_path):
    result = invoke(
        "compare",
        tmp_path / "cmp",
        *data_args(store),
        "--methods",
        "sail,cca+none",
        "--seeds",
        "0,1",
        "--steps",
        "6",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for method in ("sail", "cca+none"):
        scores = [
            json.loads((tmp_path / "cmp" / method / f"seed{s}" / "metrics.json").read_text())["test"][
                "mean_R@1"
            ]
            for s in (0, 1)
        ]
        assert summary["summary"][method]["mean_R@1"] == pytest.approx(np.mean(scores))
        assert summary["summary"][method]["std"] == pytest.approx(np.std(scores, ddof=1))
    assert "| sail |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "cca+none" in result.output


def test_distance_matches_the_library(store):
    result = invoke(
        "distance",
        "--paired-images",
        store / "images.npy",
        "--paired-texts",
        store / "texts.npy",
        "--unpaired-images",
        store / "images.npy",
        "--unpaired-texts",
        store / "texts.npy",
        "--max-rows",
        "300",
        "--n-projections",
        "64",
    )
    assert result.exit_code == 0, result.output
    expected = selection_distance(
        *(open_store(store / f"{m}.npy") for m in ("images", "texts", "images", "texts")),
        n_projections=64,
        max_rows=300,
    )
    assert f"{expected['mean']:.4f}" in result.output


def test_info_lists_backends_and_methods():
    result = invoke("info")
    assert result.exit_code == 0
    assert all(b in result.output for b in sotalign.available_backends())
    assert "sail-semi" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "sotalgn"], "unknown method 'sotalgn'"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--alpha", "-1"], "alpha must be >= 0"),
        (["--option", "weight"], "--option expects key=value"),
    ],
)
def test_bad_options_fail_with_one_line(store, tmp_path, args, message):
    result = invoke("fit", tmp_path / "r", *data_args(store), *args, "--quiet")
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_stores_and_configs_fail_with_one_line(store, tmp_path):
    np.save(tmp_path / "short.npy", np.zeros((10, 16), np.float32))
    result = invoke(
        "fit",
        tmp_path / "r",
        "--images",
        store / "images.npy",
        "--texts",
        tmp_path / "short.npy",
        "--pairs",
        "5",
        "--quiet",
    )
    assert result.exit_code == 1 and "short.npy has 10" in result.output
    config = tmp_path / "bad.toml"
    config.write_text("method = 'sail'\nlearning_rate = 3\n")
    result = invoke("fit", tmp_path / "r", "--config", config)
    assert result.exit_code == 1 and "bad.toml: unknown option(s) learning_rate" in result.output
    result = invoke("eval", tmp_path / "no-run")
    assert result.exit_code == 1 and "no-run: no such run directory" in result.output
    # through the console entry point in a fresh process: one line on stderr, no traceback
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "sotalign.cli",
            "fit",
            str(tmp_path / "r"),
            "--images",
            str(tmp_path / "missing.npy"),
            "--texts",
            str(tmp_path / "short.npy"),
            "--pairs",
            "5",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 1
    assert "missing.npy: no such file" in process.stderr and "Traceback" not in process.stderr


#: Every training and data option that `fit` and `compare` share, with the config field it sets
#: and a value other than its default.
SHARED_OPTIONS = {
    "--steps": ("steps", 2),
    "--lr": ("lr", 0.02),
    "--weight-decay": ("weight_decay", 0.001),
    "--warmup": ("warmup_steps", 1),
    "--batch-pairs": ("paired_batch_size", 40),
    "--batch-unpaired": ("unpaired_batch_size", 50),
    "--alpha": ("alpha", 0.3),
    "--eps": ("eps", 0.07),
    "--eps-teacher": ("eps_teacher", 0.02),
    "--n-iters": ("n_iters", 7),
    "--backend": ("backend", "torch"),
    "--out-dim": ("out_dim", 10),
    "--head": ("head_kind", "mlp"),
    "--head-init": ("head_init", "random"),
    "--eval-every": ("eval_every", 2),
    "--checkpoint-every": ("checkpoint_every", 2),
    "--device": ("device", "cpu"),
}


@pytest.mark.parametrize("command", ["fit", "compare"])
def test_every_shared_option_reaches_the_run_config(store, tmp_path, command):
    flags = [str(part) for flag, (_, value) in SHARED_OPTIONS.items() for part in (flag, value)]
    data = ["--split-seed", "5", "--unpaired", "200", *toy_flags(store, 30, 60, "--test", "70")]
    runs = ["--methods", "sail", "--seeds", "0"] if command == "compare" else ["--method", "sail"]
    result = invoke(command, tmp_path / "out", *data, *runs, *flags, "--quiet")
    assert result.exit_code == 0, result.output
    (config_file,) = (tmp_path / "out").rglob("config.json")
    config = json.loads(config_file.read_text())
    assert {field: config[field] for field, _ in SHARED_OPTIONS.values()} == dict(SHARED_OPTIONS.values())
    expected_data = dict(n_pairs=30, n_val=60, n_test=70, n_unpaired=200, split_seed=5)
    assert {key: config["data"][key] for key in expected_data} == expected_data
