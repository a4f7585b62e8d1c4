"""One grammar for every command, `dist-ortho CMD [CONFIG] [--set KEY=VALUE]... [-o OUT]`, and one
rule for errors: a user mistake is one line and exit 2, anything else a bug with its traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_ortho.cli import build_parser
from dist_ortho.cli import main as cli_main
from dist_ortho.core.commands import run_command
from dist_ortho.core.errors import ConfigError, UserError, user_input

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"
CONFIG_COMMANDS = ["run", "sweep", "study", "convergence"]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(only=argv[0]).parse_args(argv)


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("order", ["config_first", "sets_first", "out_between"])
def test_set_repeats_and_never_swallows_the_config(command, order):
    sets = ["--set", "train.steps=3", "--set", "optimizer.lr=0.01"]
    argv = {"config_first": [command, "c.yaml", *sets, "-o", "OUT"],
            "sets_first": [command, *sets, "c.yaml", "-o", "OUT"],
            "out_between": [command, "--set", "train.steps=3", "-o", "OUT", "c.yaml",
                            "--set", "optimizer.lr=0.01"]}[order]
    args = parse(argv)
    assert args.config == Path("c.yaml")
    assert args.overrides == ["train.steps=3", "optimizer.lr=0.01"]
    assert args.out == Path("OUT")


@pytest.mark.parametrize("argv", [["report", "results/x", "-o", "OUT"],
                                  ["project", "--model", "llama-1b", "-o", "OUT"],
                                  ["project", "--out", "OUT"]])
def test_commands_without_a_config_take_o_too(argv):
    assert str(parse(argv).out) == "OUT"


def test_two_values_after_one_set_is_an_error_naming_the_fix(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["sweep", "--set", "train.steps=3", "optimizer.lr=0.01"])
    assert exc.value.code == 2
    assert "looks like a KEY=VALUE override, not a config file: give each override its own " \
           "--set" in capsys.readouterr().err


def test_set_without_equals_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse(["run", "--set", "train.steps"])
    assert "expected KEY=VALUE, got 'train.steps'" in capsys.readouterr().err


def test_project_ns_dtype_auto_is_bfloat16_on_a_gpu_preset(tmp_path, capsys):
    assert cli_main(["project", "--model", "llama-1b", "--world-sizes", "8", "--strategies",
                     "balanced", "--no-plots", "-o", str(tmp_path)]) == 0
    assert "NS bfloat16" in (tmp_path / "llama-1b_h100.md").read_text()


def test_sweep_with_set_before_the_study_and_o_runs(tmp_path):
    """The command line a user types first: `--set` ahead of the study file, `-o` after it."""
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "name": "s", "base": str(TINY), "output_dir": str(tmp_path / "unused"),
        "grid": {"strategies": ["balanced"], "world_sizes": [1]}}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dist_ortho", "sweep", "--set", "train.steps=3",
                           str(study), "-o", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "s" / "summary.csv").is_file()
    assert not (tmp_path / "unused").exists()


# --- user mistake or bug ------------------------------------------------------------------------

def command_raising(exc: BaseException):
    def main(args):
        raise exc
    return main


@pytest.mark.parametrize("exc", [UserError("--x: must be 1, got 2"),
                                 ConfigError("train.steps", "must be >= 1, got 0")])
def test_a_user_mistake_is_one_line_and_exit_2(exc, capsys):
    assert run_command("demo", command_raising(exc), argparse.Namespace()) == 2
    assert capsys.readouterr().err.splitlines() == [f"dist-ortho demo: error: {exc}"]


@pytest.mark.parametrize("exc", [ValueError("matrix shapes disagree"), OSError(5, "I/O error"),
                                 KeyError("owner"), AssertionError("plan and counts differ")])
def test_anything_else_is_a_bug_with_its_traceback(exc, capsys, monkeypatch):
    monkeypatch.delenv("DIST_ORTHO_TRACEBACK", raising=False)
    assert run_command("demo", command_raising(exc), argparse.Namespace()) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"dist-ortho demo: internal error: {type(exc).__name__}: {exc} "
                      f"(a bug; the traceback follows)")
    assert err[1] == "Traceback (most recent call last):"
    assert err[-1].startswith(type(exc).__name__)


def test_user_input_turns_a_checks_value_error_into_a_user_error():
    with pytest.raises(UserError, match="^--mesh: bad axis$"), user_input("--mesh"):
        raise ValueError("bad axis")
    with pytest.raises(KeyError), user_input("--mesh"):  # only ValueErrors are the user's
        raise KeyError("x")


def test_a_bug_inside_a_rank_keeps_its_traceback(tmp_path):
    """An internal error raised inside a run's rank reaches stderr with its traceback."""
    proc = subprocess.run([sys.executable, "-m", "dist_ortho", "run", str(TINY), "-o",
                           str(tmp_path), "--fault", "fail_step=0", "--fault", "fail_mode=raise"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert "dist-ortho run: error: rank 0: RuntimeError: testing aid: rank 0 failed on purpose" \
        in proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr


# --- under torchrun -------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["run.sh", "multinode.sh"])
def test_a_bad_key_through_the_torchrun_launchers_is_one_line_and_exit_2(script, tmp_path):
    """launch/*.sh check the config (`dist-ortho run --check`) before torchrun starts: torchrun
    itself reports any failed rank with its own multi-line summary and exit status 1."""
    env = {**os.environ, "NPROC": "2", "NNODES": "1", "NODE_RANK": "0",
           "RDZV_ENDPOINT": "localhost:29999"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), str(TINY), "--set",
                           "optimizer.lrr=1", "-o", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "dist-ortho run: error: optimizer.lrr: unknown key; did you mean 'lr'? (known: name, "
        "lr, momentum, beta2, weight_decay, nesterov, ns_steps, ns_dtype, ns_coefficients, "
        "ns_form, rule_hparams, adamw_lr, adamw_betas, adamw_weight_decay, split, nonfinite, "
        "replicas)"]
    assert proc.stdout == ""


def test_check_counts_the_world_size_torchrun_will_start(tmp_path, capsys, monkeypatch):
    """`--check` sees WORLD_SIZE: a replicate count that does not divide it fails before launch."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert cli_main(["run", str(TINY), "--set", "train.replicate=2", "-o", str(tmp_path),
                     "--check"]) == 2
    assert "train.replicate" in capsys.readouterr().err
