"""Real training subprocesses stopped and resumed: the same losses, bit for bit; a damaged
checkpoint moved aside while a second run is refused; a full disk.

The subprocesses share a persistent XLA compilation cache (the same executable, so the same
numbers; it only saves compile time). A checkpoint every 2 steps also slows the tiny run
enough for a signal to land mid-run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from hybridlm.config import REPO_ROOT, load
from hybridlm.data.pipeline import make_train_iterator
from hybridlm.errors import UserError
from hybridlm.model import Transformer, abstract_model
from hybridlm.runs import load_model
from hybridlm.train.step import loss_sums
from hybridlm.train.trainer import contract, train

STEPS = 16
OVERRIDES = ["model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8",
             "model.mlp_dim=64", "model.vocab_size=300", "model.attention_impl=dense",
             "train.batch_size=4", "train.warmup_steps=2", "log.every=1", "eval.steps=0",
             "checkpoint.every=2", "checkpoint.keep=2"]
RUN = ["--config", "configs/paper.py:variant=rnope_swa,window=5,seq_len=16",
       f"--config.train.steps={STEPS}", *(f"--config.{o}" for o in OVERRIDES)]

pytestmark = pytest.mark.slow


CACHE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    CACHE["dir"] = tmp_path_factory.mktemp("xla_cache")


def subprocess_env(cache: bool = True) -> dict[str, str]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(CACHE["dir"]),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def start(workdir: Path) -> subprocess.Popen:
    env = subprocess_env()
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


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int,
                  checkpointed: bool = False) -> None:
    """Until metrics.jsonl has `step` rows (and, if asked, a checkpoint is complete)."""
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be stopped"
        if (metrics.exists() and len(metrics.read_text().splitlines()) >= step
                and (not checkpointed or checkpoint_steps(workdir))):
            return
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} in {metrics}")


def checkpoint_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("runs") / "reference"
    finish(workdir)
    curve = losses(workdir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    return workdir, curve


def test_sigkill_then_sigterm_at_random_steps_then_resume_gives_the_same_losses(
        reference, tmp_path):
    workdir = tmp_path / "run"
    kill_at = random.randint(3, 6)
    proc = start(workdir)
    wait_for_step(proc, workdir, kill_at, checkpointed=True)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL

    # SIGKILL: the rerun resumes from the last complete checkpoint; then SIGTERM
    proc = start(workdir)
    wait_for_step(proc, workdir, random.randint(kill_at + 2, STEPS - 4))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = workdir.with_suffix(".log").read_text()
    assert "resuming from" in log
    stopped = re.search(r"SIGTERM: stopped after step (\d+) and saved a checkpoint", log)
    assert stopped and "To resume, run the same `hybridlm train` command again" in log, log
    step = int(stopped.group(1))
    assert checkpoint_steps(workdir)[-1] == step == max(losses(workdir))

    finish(workdir)
    assert losses(workdir) == reference[1], f"killed after step {kill_at}, stopped at {step}"


def test_a_damaged_checkpoint_is_moved_aside_and_the_run_completes_while_a_second_is_refused(
        reference, tmp_path, devices, capsys):
    """The latest checkpoint's largest file emptied: the rerun moves the checkpoint aside,
    quietly (the reads its failed restore left behind once printed tracebacks), resumes
    from the one before
    and saves that step again (Orbax refused to before: "step 16 already exists", on every
    rerun); a second run meanwhile is refused by the lock; a third finds nothing to do; a
    run that would not resume is refused; nothing the first run wrote is lost."""
    source, curve = reference
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    data = max((workdir / f"checkpoints/{STEPS}/state/d").iterdir(),
               key=lambda p: p.stat().st_size)
    data.write_bytes(b"")
    cfg = load(RUN[1], [f"train.steps={STEPS}", *OVERRIDES])
    proc = start(workdir)
    try:  # hold the first run still once it holds the lock, and start a second
        lock = workdir / ".lock"
        while f'"pid": {proc.pid},' not in lock.read_text():
            assert proc.poll() is None, workdir.with_suffix(".log").read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)
        with pytest.raises(UserError, match=rf"in use by another run \(pid {proc.pid} on "):
            train(cfg, workdir, devices=devices[:1])
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=300) == 0, workdir.with_suffix(".log").read_text()[-3000:]
    [moved] = (workdir / "checkpoints").glob(f"{STEPS}.bad-*")
    log = workdir.with_suffix(".log").read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert f"moved the checkpoint of step {STEPS}, which does not restore, aside to {moved}" \
        in log and f"resuming from {workdir / 'checkpoints' / str(STEPS - 2)}" in log
    assert data.name in {p.name for p in (moved / "state/d").iterdir()}, "kept, not deleted"
    assert losses(workdir) == curve, "the run completed as the uninterrupted one"
    superseded = [json.loads(line) for line in
                  (workdir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in superseded] == \
        [(s, curve[s]) for s in (STEPS - 1, STEPS)], "the first attempt's rows, set aside"

    before = {name: (workdir / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    assert train(cfg, workdir, devices=devices[:1]) == []
    assert f"nothing to do: {workdir} has finished step {STEPS}" in capsys.readouterr().out
    cfg.checkpoint.enabled = False
    with pytest.raises(UserError, match=r"holds a run \(metrics.jsonl with 16 rows, "
                       r"checkpoints of steps \[14, 16\].*checkpoint.enabled=False.*--restart"):
        train(cfg, workdir, devices=devices[:1])
    assert before == {name: (workdir / name).read_bytes() for name in before}


FULL_DISK = """
mount -t tmpfs -o size={size} tmpfs {fs} || exit 99
{python} -m hybridlm.cli train {flags} --workdir {workdir} \\
    --config.checkpoint.dir={fs}/checkpoints --config.checkpoint.keep=0
status=$?
cp -a {fs}/checkpoints {copy}
exit $status
"""


def test_a_full_disk_stops_the_run_once_with_the_last_checkpoint_intact(tmp_path):
    """checkpoint.dir on a 2 MB tmpfs (in a private mount namespace): room for the start-up
    check (one checkpoint, ~0.6 MB of state) and for two checkpoints, not three."""
    fs, copy = tmp_path / "fs", tmp_path / "copy"
    fs.mkdir()
    script = FULL_DISK.format(size="2m", fs=fs, copy=copy, python=sys.executable,
                              workdir=tmp_path / "run", flags=" ".join(RUN))
    try:
        result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                 script], cwd=REPO_ROOT, env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.skip("no unshare(1) here to mount a small tmpfs")
    if result.returncode == 99 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[:3000]
    message = lines[0]
    assert message.startswith(f"hybridlm: training stopped: saving the checkpoint of step 6 "
                              f"into {fs}/checkpoints failed (No space left on device")
    assert f"the last complete checkpoint, {fs}/checkpoints/4, is intact" in message
    assert sorted(p.name for p in copy.iterdir() if p.name.isdigit()) == ["2", "4"]
    _, _, step = load_model(copy)
    assert step == 4, "and it restores"


def mean_loss(params, graphdef, batch) -> float:
    _, (ce_sum, weight_sum) = loss_sums(params, graphdef, contract(batch))
    return float(ce_sum / weight_sum)


def test_init_from_into_4x_seq_len_and_another_theta_trains(reference, tmp_path, devices,
                                                           capsys):
    """The paper's recipe: a new stage at a longer context with another RoPE theta."""
    source, _ = reference
    stage = load("configs/paper.py:variant=rnope_swa,window=8,seq_len=64,theta=500000.0",
                 [*OVERRIDES, "train.steps=3", f"train.init_from={source}",
                  "checkpoint.enabled=False"])
    history = train(stage, tmp_path / "stage", devices=devices[:1])
    assert all(np.isfinite(row["loss"]) for row in history)
    assert f"new stage: params from {source}/checkpoints/{STEPS}" in capsys.readouterr().out

    # Oracle for the first step's loss: the source's parameters in the stage's model, and a
    # fresh init of the same model, on the stage's first batch.
    batch = next(make_train_iterator(stage, 0, 1))
    graphdef, _ = abstract_model(stage.model.to_dict(), stage.train.seed)
    _, source_model, _ = load_model(source)
    loaded = nnx.to_pure_dict(nnx.state(source_model, nnx.Param))
    with nnx.use_eager_sharding(False):
        fresh = nnx.to_pure_dict(nnx.state(Transformer(stage.model.to_dict(),
                                                       rngs=nnx.Rngs(params=0)), nnx.Param))
    first = history[0]["loss"]
    np.testing.assert_allclose(first, mean_loss(loaded, graphdef, batch), rtol=1e-5)
    assert first < mean_loss(fresh, graphdef, batch) - 0.5


WORKER = """
import sys
import jax
port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from hybridlm.config import load
from hybridlm.train.trainer import train
train(load(sys.argv[4], sys.argv[5:]), workdir)
jax.distributed.shutdown()
"""


def start_two_processes(workdir: Path) -> list[subprocess.Popen]:
    """One run over two processes of one CPU device each (gloo on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(workdir),
                              RUN[1], f"train.steps={STEPS}", *OVERRIDES], cwd=REPO_ROOT,
                             env=subprocess_env(cache=False),
                             stdout=open(workdir.with_suffix(f".{i}.log"), "a"),
                             stderr=subprocess.STDOUT) for i in range(2)]


def test_sigterm_to_one_of_two_processes_stops_both_then_one_process_finishes_the_run(
        reference, tmp_path):
    """Two processes (one device each) stop together at the same step with a checkpoint, and
    one process finishes the run from it: every step's loss is the uninterrupted
    single-process run's (both processes read their rows of the same global batches, and
    the checkpoint holds one data position, not one per process)."""
    workdir = tmp_path / "two"
    workers = start_two_processes(workdir)
    wait_for_step(workers[0], workdir, random.randint(3, STEPS - 6))
    workers[1].send_signal(signal.SIGTERM)
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    log = workdir.with_suffix(".0.log").read_text()
    stopped = re.search(r"SIGTERM: stopped after step (\d+) and saved a checkpoint", log)
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert checkpoint_steps(workdir)[-1] == step == max(losses(workdir))
    data = workdir / "checkpoints" / str(step) / "data"
    assert {p.name for p in data.glob("*.json")} == {"position.json"}

    assert "resuming from" in finish(workdir)  # one process, one device
    curve, want = losses(workdir), reference[1]
    assert sorted(curve) == sorted(want)
    np.testing.assert_allclose([curve[s] for s in want], list(want.values()), rtol=1e-5,
                               err_msg=f"two processes to step {step}, then one")
