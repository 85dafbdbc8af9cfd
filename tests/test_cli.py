"""The command line: clear errors without tracebacks, and a real short training run."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from hybridlm import cli

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def run_cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "hybridlm.cli", *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["train", "--config.model.num_kv_heads=3"], "model.num_kv_heads"),
    (["train", "--config.model.windw=3"], "unknown config field 'model.windw'"),
    (["train", "--config", "configs/missing.py"], "configs/missing.py"),
    (["train", "--config.train.steps"], "needs a value"),
])
def test_user_mistakes_exit_2_with_one_message(args, message, tmp_path):
    result = run_cli(*args, "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists(), "nothing is written before the config is valid"


def test_help_lists_train():
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout


@pytest.mark.slow
def test_train_writes_the_workdir_and_the_loss_falls(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", "--config", "configs/tiny.py:seq_len=128",
                     "--config.train.steps=40", "--config.train.batch_size=4",
                     "--config.train.warmup_steps=5", "--config.log.every=5",
                     "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, *range(5, 45, 5)]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu"} <= set(r)
               for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert rows[-1]["val_loss"] < 4.0
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 40 and config["data"]["seq_len"] == 128
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tb").iterdir())

    # the run ends by saying what it made (paths that exist) and what to run next
    out = result.stdout
    evaluated = [r for r in rows if r.get("val_loss") is not None]
    best = min(evaluated, key=lambda r: r["val_loss"])
    assert f"finished 40 steps in {workdir}" in out
    assert (f"validation loss  {evaluated[-1]['val_loss']:.4f} at step 40 (final), best "
            f"{best['val_loss']:.4f} at step {best['step']}") in out
    checkpoint = workdir / "checkpoints" / "40"
    assert f"checkpoint       {checkpoint} (step 40)" in out and checkpoint.is_dir()
    assert f"metrics          {workdir / 'metrics.jsonl'}" in out
    assert f"tensorboard --logdir {workdir / 'tb'}" in out
    commands = [shlex.split(line, comments=True)
                for line in out.split("\nnext:\n", 1)[1].splitlines()]
    assert [c[:2] for c in commands] == [["hybridlm", "eval"], ["hybridlm", "generate"],
                                         ["hybridlm", "export"]]
    assert all(c[c.index("--workdir") + 1] == str(workdir) for c in commands)
    for c in commands:  # real commands with real flags (argparse exits 2 otherwise); the
        cli._parser().parse_args(c[1:])  # eval CLI itself runs in tests/test_eval_mesh.py
