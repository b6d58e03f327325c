"""What the `sotalign` command prints: help and errors keep every bracketed word, user strings
are never read as markup, tables are not cut, and bad values are refused before any file is
written."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import toy_flags
from typer.testing import CliRunner

from sotalign.align.config import ConfigError, TrainConfig, load_config
from sotalign.cli import _print_metrics, app
from sotalign.data import write_platonic

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=80)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("platonic")
    write_platonic(directory, 120, image_dim=8, text_dim=6, latent_dim=3, n_concepts=3, seed=0)
    return directory


def test_help_keeps_bracketed_defaults():
    text = " ".join(invoke("fit", "--help").output.split())
    for default in (
        "[sotalign]",
        "[a tenth of the rows, at most 1000]",
        "[2000]",
        "[1e-4]",
        "[auto]",
        "[11000]",
    ):
        assert default in text, default


def test_resume_is_shown_as_a_flag():
    line = next(line for line in invoke("fit", "--help").output.splitlines() if "--resume" in line)
    assert "<" not in line.split("--resume", 1)[1].split("Continue")[0]


def test_error_messages_keep_brackets(tmp_path):
    config = tmp_path / "cfg.toml"
    config.write_text("[data]\nimages = 3\n")
    result = invoke("fit", tmp_path / "run", "--config", config)
    assert result.exit_code == 1
    assert f"{config} [data]: DataSpec.images must be str" in result.output


def test_a_path_with_markup_is_printed_verbatim(tmp_path):
    result = invoke(
        "fit",
        tmp_path / "r[/b]x",
        "--images",
        tmp_path / "[/b]missing.npy",
        "--texts",
        tmp_path / "t.npy",
        "--pairs",
        "3",
    )
    assert result.exit_code == 1
    assert "[/b]missing.npy" in result.output
    assert "Traceback" not in result.output and "MarkupError" not in result.output


def test_tables_are_not_cut_when_piped():
    """A child process writes to a pipe, where rich assumes 80 columns."""
    script = (
        "from sotalign.cli import _print_metrics\n"
        "keys = ('i2t_R@1', 'i2t_R@5', 'i2t_R@10', 't2i_R@1', 't2i_R@5', 't2i_R@10', 'mean_R@1')\n"
        "row = {k: 12.5 for k in keys}\n"
        "_print_metrics('[/b] title', {'val': row, 'test': row})\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "[/b] title" in out
    for header in ("i2t_R@10", "t2i_R@10", "mean_R@1"):
        assert header in out
    assert "…" not in out


def test_json_config_that_is_not_a_table(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[1, 2]")
    with pytest.raises(
        ConfigError, match=r"c\.json: expected a table of options at the top level, got a list"
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("lr", float("inf"), "TrainConfig.lr must be a finite number"),
        ("eps", float("nan"), "TrainConfig.eps must be a finite number"),
        ("alpha", float("inf"), "TrainConfig.alpha must be a finite number"),
        ("backend", "nope", "TrainConfig.backend must be 'auto' or one of"),
        ("head_kind", "nope", "TrainConfig.head_kind must be one of linear, mlp"),
        ("teacher_options", {"foo": 1}, "TrainConfig.teacher_options: .*foo"),
    ],
)
def test_train_config_refuses_bad_values(option, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{option: value})


def test_teacher_options_of_a_method_without_teacher():
    with pytest.raises(ConfigError, match="has no teacher"):
        TrainConfig(method="sail", teacher_options={"reg": 0.2})


def test_a_typo_writes_nothing(store, tmp_path):
    run = tmp_path / "run"
    for typo in (
        ["--backend", "nope"],
        ["--head", "nope"],
        ["--eps", "-1"],
        ["--lr", "inf"],
        ["--teacher-option", "foo=1"],
    ):
        result = invoke(
            "fit",
            run,
            *toy_flags(store, 20, 20),
            *typo,
        )
        assert result.exit_code == 1, typo
        assert not run.exists(), typo


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--seeds", "0,0", "--seeds lists 0 more than once"),
        ("--seeds", ",", "--seeds is empty"),
        ("--methods", ",", "--methods is empty"),
        ("--methods", "sail,sail", "--methods lists sail more than once"),
    ],
)
def test_compare_refuses_empty_or_repeated_lists(store, tmp_path, flag, value, message):
    result = invoke(
        "compare",
        tmp_path / "cmp",
        *toy_flags(store, 20, 20),
        flag,
        value,
    )
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "cmp").exists()


def test_print_metrics_reads_no_markup(capsys):
    _print_metrics("[bold]x[/bold]", {"val": {"mean_R@1": 1.0}})
    assert "[bold]x[/bold]" in capsys.readouterr().out


def test_ctrl_c_during_fit_exits_130_with_the_resume_command(store, tmp_path):
    """A real SIGINT to the command: it stops after the step in progress, checkpoints there,
    prints where the run stands and how to resume, and exits 130."""
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "sotalign.cli",
        "fit",
        str(run),
        *toy_flags(store, 20, 20),
        "--method",
        "sail",
        "--steps",
        "100000",
        "--out-dim",
        "8",
        "--batch-pairs",
        "16",
        "--device",
        "cpu",
        "--quiet",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a shell that started pytest in the background ignores SIGINT,
        # and fit, like Python, leaves an ignored SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    text = " ".join(output.split())
    assert "interrupted at step" in text and f"resume with: sotalign fit {run} --resume" in text
    step = int(text.split("interrupted at step ")[1].split()[0])
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == step
