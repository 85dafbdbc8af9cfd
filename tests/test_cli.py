"""The command line: clear errors without tracebacks, and a real short training run."""

import json
import os
import subprocess
import sys

import pytest

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
