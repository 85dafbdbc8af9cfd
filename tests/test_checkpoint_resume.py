"""Real training subprocesses stopped and resumed: the same losses, bit for bit."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridlm.config import REPO_ROOT

STEPS = 24
RUN = ["--config", "configs/paper.py:variant=rnope_swa,window=5,seq_len=16",
       "--config.model.d_model=32", "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
       "--config.model.head_dim=8", "--config.model.mlp_dim=64", "--config.model.vocab_size=300",
       "--config.model.attention_impl=dense", "--config.train.batch_size=4",
       "--config.train.warmup_steps=2", f"--config.train.steps={STEPS}", "--config.log.every=1",
       "--config.eval.steps=0", "--config.checkpoint.every=1", "--config.checkpoint.keep=2"]

pytestmark = pytest.mark.slow


def start(workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    log = open(workdir.with_suffix(".log"), "a")
    return subprocess.Popen([sys.executable, "-m", "hybridlm.cli", "train", *RUN,
                             "--workdir", str(workdir)], cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def finish(workdir: Path) -> str:
    proc = start(workdir)
    assert proc.wait(timeout=300) == 0, workdir.with_suffix(".log").read_text()[-3000:]
    return workdir.with_suffix(".log").read_text()


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps repeat or go back: {steps}"
    return {row["step"]: row["loss"] for row in rows}


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int) -> None:
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be stopped"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} in {metrics}")


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("runs") / "reference"
    finish(workdir)
    curve = losses(workdir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    return workdir, curve


def test_sigkill_at_a_random_step_then_resume_gives_the_same_losses(reference, tmp_path):
    workdir, kill_at = tmp_path / "killed", random.randint(3, STEPS // 2)
    proc = start(workdir)
    wait_for_step(proc, workdir, kill_at)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert checkpoint_steps(workdir), "no checkpoint before the kill"
    log = finish(workdir)
    assert "resuming from" in log
    assert losses(workdir) == reference[1], f"killed after step {kill_at}"


def test_sigterm_saves_the_current_step_exits_0_and_resumes_the_same(reference, tmp_path):
    workdir, stop_at = tmp_path / "terminated", random.randint(3, STEPS // 2)
    proc = start(workdir)
    wait_for_step(proc, workdir, stop_at)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = workdir.with_suffix(".log").read_text()
    stopped = re.search(r"SIGTERM: stopped after step (\d+) and saved a checkpoint", log)
    assert stopped and "To resume, run the same `hybridlm train` command again" in log, log
    step = int(stopped.group(1))
    assert checkpoint_steps(workdir)[-1] == step == max(losses(workdir))
    finish(workdir)
    assert losses(workdir) == reference[1], f"stopped after step {step}"
