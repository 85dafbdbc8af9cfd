"""On 8 fake CPU devices, every mesh trains exactly like one device (to float tolerance),
and so do two real processes (jax.distributed on loopback) with 4 devices each."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from hybridlm.train.trainer import train
from tests.train_helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ("train.steps=4", "train.warmup_steps=2")
MESHES = {
    "data8": ("mesh.data=8",),
    "fsdp8": ("mesh.data=1", "mesh.fsdp=8"),
    "fsdp2_tensor4": ("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"),
    # with 2 microbatches of 4 rows: the same updates as batches of 8
    "data2_fsdp2_tensor2_accum2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                   "train.grad_accum_steps=2"),
    # the sequence split in two, zig-zag reordered on the host (tests/test_parallel_context.py)
    "data4_context2": ("mesh.data=4", "mesh.context=2"),
}


def curves(history):
    return {key: np.array([row[key] for row in history]) for key in ("loss", "grad_norm")}


def assert_same_training(got, want):
    assert len(got["loss"]) == 4
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-6)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=2e-5)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, devices):
    history = train(tiny_config(*COMMON, "mesh.data=1"), tmp_path_factory.mktemp("one"),
                    devices=devices[:1])
    assert history[-1]["loss"] < history[0]["loss"], "the runs must learn something"
    return curves(history)


@pytest.mark.slow
@pytest.mark.parametrize("name", MESHES)
def test_mesh_matches_one_device(name, one_device, tmp_path, devices):
    assert_same_training(curves(train(tiny_config(*COMMON, *MESHES[name]), tmp_path)),
                         one_device)


WORKER = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from hybridlm.train.trainer import train
from tests.train_helpers import tiny_config
print("HISTORY" + json.dumps(train(tiny_config(*sys.argv[4:]), workdir)), flush=True)
jax.distributed.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_device(one_device, tmp_path):
    """Each process loads only its half of every batch (make_array_from_process_local_data)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    args = [*COMMON, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    port = free_port()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i),
                                 str(tmp_path), *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err[-3000:]
    histories = [json.loads(out.split("HISTORY", 1)[1]) for out, _ in outputs]
    assert curves(histories[0])["loss"].tolist() == curves(histories[1])["loss"].tolist(), \
        "both processes log the same global loss"
    assert_same_training(curves(histories[0]), one_device)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()  # written by process 0 only
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
