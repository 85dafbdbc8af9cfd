"""Multi-host start-up: how each process finds the job (plans), flag mistakes, and real
processes on loopback started by launch/local.sh or by hand: the same losses as one process,
a clear failure when the coordinator is missing, and no hang when a process dies."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hybridlm import cli
from hybridlm import config as config_lib
from hybridlm.config import ConfigError
from hybridlm.parallel import distributed
from hybridlm.parallel.distributed import DEFAULT_PORT, Plan, first_slurm_host, plan
from tests.conftest import PATIENT_COLLECTIVES

ROOT = Path(__file__).resolve().parents[1]
PYTHON_CLI = f"{sys.executable} -m hybridlm.cli"

# A d=32 model on 8 x 16-token batches, dense attention (the cheapest to compile).
TINY = ["model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8",
        "model.mlp_dim=64", "model.vocab_size=300", "model.attention_impl=dense",
        "data.seq_len=16", "train.batch_size=8", "train.warmup_steps=2", "log.every=1",
        "eval.steps=0"]
TINY_SPEC = "configs/paper.py:variant=rnope_swa,window=5"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(overrides) -> list[str]:
    return [f"--config.{o}" for o in overrides]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text corpus (ten stdlib modules, ~150 kB) and its own cache."""
    out = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap", "shlex", "csv", "fractions", "glob", "heapq", "bisect",
                 "colorsys", "fnmatch", "string"):
        shutil.copy(Path(__import__(name).__file__), out / f"{name}.py")
    return out


def data_overrides(corpus: Path) -> list[str]:
    return [f"data.source={corpus}", f"data.cache_dir={corpus.parent / 'cache'}"]


def cpu_env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {PATIENT_COLLECTIVES}",
            "HYBRIDLM": PYTHON_CLI}


# ---- plans: which way each process joins ---------------------------------------------

def test_explicit_flags_win_over_the_environment():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "gpu[01-04]"}
    assert plan("10.0.0.2:999", 2, 1, env=env) == Plan("explicit", "10.0.0.2:999", 2, 1)


def test_slurm_variables_name_the_first_node_with_the_explicit_port():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[07-10,15]"}
    assert plan(env=env) == Plan("slurm", f"gpu07:{DEFAULT_PORT}", 4, 3)
    assert plan(env={**env, "SLURM_NTASKS": "1"}) == Plan("single")


def test_tpu_pod_variables_name_worker_0():
    env = {"TPU_WORKER_HOSTNAMES": "t-w0,t-w1,t-w2,t-w3", "TPU_WORKER_ID": "2"}
    assert plan(port=8476, env=env) == Plan("tpu", "t-w0:8476", 4, 2)
    assert plan(env={"TPU_WORKER_HOSTNAMES": "t-w0", "TPU_WORKER_ID": "0"}) == Plan("single")


def test_nothing_means_one_process():
    assert plan(env={}) == Plan("single")


@pytest.mark.parametrize("nodes,first", [("node[003-010,015],gpu7", "node003"),
                                         ("a1,b2", "a1"), ("gpu12", "gpu12"),
                                         ("x[5]", "x5")])
def test_first_slurm_host(nodes, first):
    assert first_slurm_host(nodes) == first


@pytest.mark.parametrize("args,env,message", [
    (("127.0.0.1:5", 2, None), {}, "missing --process_id"),
    (("127.0.0.1", 2, 0), {}, "explicit port"),
    (("127.0.0.1:5", 2, 2), {}, "outside 0..1"),
    ((None, None, None), {"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "SLURM_STEP_NODELIST"),
    ((None, None, None), {"TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_ID"),
])
def test_plan_mistakes_name_what_is_missing(args, env, message):
    with pytest.raises(ConfigError, match=message):
        plan(*args, env=env)


def test_cli_flag_mistakes_exit_2_before_anything_runs(tmp_path, capsys):
    status = cli.main(["train", "--workdir", str(tmp_path / "w"), "--coordinator", "h:1",
                       "--num_processes", "2"])
    assert status == 2
    assert "missing --process_id" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_preflight_fingerprints_differ_for_different_configs():
    a, b = (config_lib.to_json(config_lib.load(TINY_SPEC, TINY + [f"train.steps={n}"]))
            for n in (3, 4))
    assert (distributed.fingerprint(a) == distributed.fingerprint(a)).all()
    assert not (distributed.fingerprint(a) == distributed.fingerprint(b)).all()


# ---- real processes ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_lone_process_fails_fast_naming_what_is_missing(tmp_path):
    """Process 1 of 2 with nobody at the coordinator's port: exit 1, not a hang, not an
    XLA abort."""
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "hybridlm.cli", "train", "--config", TINY_SPEC, *flags(TINY),
         "--workdir", str(tmp_path / "w"), "--coordinator", f"127.0.0.1:{port}",
         "--num_processes", "2", "--process_id", "1", "--distributed_timeout_s", "3"],
        cwd=ROOT, env=cpu_env(4), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"nothing answers at 127.0.0.1:{port}" in result.stderr
    assert "process 1 of 2" in result.stderr
    assert "Check failure" not in result.stderr


def logged(workdir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


@pytest.mark.slow
def test_local_sh_two_processes_continue_a_one_process_run_exactly(corpus, tmp_path):
    """A run on a mesh of data=2, fsdp=2, tensor=2: uninterrupted on 1 process x 8 CPU
    devices, and continued from that run's checkpoint of step 2 by launch/local.sh's 2
    processes x 4 devices. Every step logs the same loss and gradient norm (no batch is fed
    by hand: each process reads its rows of the same global batches from the one data
    position in the checkpoint), and the parameters both processes wrote are the same.
    (tests/test_checkpoint_resume.py resumes a 2-process checkpoint on 1 process.)"""
    import jax
    from flax import nnx

    from hybridlm.runs import load_model
    from hybridlm.train.trainer import train

    overrides = [*TINY, *data_overrides(corpus), "train.steps=7", "mesh.data=2", "mesh.fsdp=2",
                 "mesh.tensor=2", "checkpoint.every=2", "checkpoint.keep=0"]
    one = train(config_lib.load(TINY_SPEC, overrides), tmp_path / "one")  # 8 devices here
    assert one[-1]["loss"] != one[0]["loss"], "the run must change the parameters"

    two = tmp_path / "two"
    shutil.copytree(tmp_path / "one" / "checkpoints" / "2", two / "checkpoints" / "2")
    result = subprocess.run(
        ["bash", "launch/local.sh", "2", "train", "--config", TINY_SPEC, *flags(overrides),
         "--workdir", str(two)],
        cwd=ROOT, env=cpu_env(8), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "resuming from" in result.stdout
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [3, 4, 5, 6, 7], "process 0 alone writes metrics"
    assert len(list((two / "tb").glob("events.out.tfevents*"))) == 1, "and TensorBoard"
    assert "2 process(es)" not in (two / "process_1.log").read_text(), "process 1 is quiet"
    data = {p.name for p in (two / "checkpoints" / "7" / "data").glob("*.json")}
    assert data == {"position.json"}, "one data position for all processes"
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in logged], [r[key] for r in one[2:]],
                                   rtol=1e-5)

    restored_cfg, model, step = load_model(two)  # this test's single process
    assert step == 7 and restored_cfg.mesh.tensor == 2
    _, reference, _ = load_model(tmp_path / "one")
    got, want = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(reference))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_when_one_process_dies_the_other_exits_with_an_error(corpus, tmp_path):
    """Process 1 is killed mid-training; process 0 stops with an error within the
    heartbeat timeout instead of waiting in a collective forever."""
    overrides = [*TINY, *data_overrides(corpus), "train.steps=100000", "mesh.data=8",
                 "model.num_layers=1"]
    spec = "configs/paper.py:variant=rope"  # one layer: the cheapest step to compile
    workdir, port = tmp_path / "w", free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "hybridlm.cli", "train", "--config", spec,
         *flags(overrides), "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
         "--num_processes", "2", "--process_id", str(i), "--distributed_heartbeat_s", "3"],
        cwd=ROOT, env=cpu_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=120)  # raises instead of hanging
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    # Whichever notices first: the coordination service (process 1 stopped sending
    # heartbeats) or the collective that process 1 left half done (gloo on CPU).
    assert "stopped sending heartbeats" in err or "gloo" in err, err[-3000:]


@pytest.mark.slow
def test_processes_with_different_configs_stop_before_compiling(tmp_path):
    """The preflight: process 1 was given another train.steps; both exit 1 naming it."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "hybridlm.cli", "train", "--config", TINY_SPEC,
         *flags([*TINY, f"train.steps={3 + i}"]), "--workdir", str(tmp_path / "w"),
         "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id",
         str(i), "--distributed_timeout_s", "300"],
        cwd=ROOT, env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], [err[-2000:] for _, err in outputs]
    assert "processes [1] run a different resolved config than process 0" in outputs[0][1]
    assert "processes [0] run a different resolved config than process 1" in outputs[1][1]
    assert not (tmp_path / "w").exists(), "nothing was written"
