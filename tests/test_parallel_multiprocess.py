"""Two real processes (jax.distributed on loopback, 4 CPU devices each) train like one
process with 8 devices: each process loads only its half of every batch."""

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
MESH = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
WORKER = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from hybridlm.train.trainer import train
from tests.train_helpers import tiny_config
history = train(tiny_config("train.steps=3", *sys.argv[4:]), workdir)
print("HISTORY" + json.dumps(history), flush=True)
jax.distributed.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, devices):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    port = free_port()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i),
                                 str(tmp_path / "multi"), *MESH], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err[-3000:]
    histories = [json.loads(out.split("HISTORY", 1)[1]) for out, _ in outputs]
    single = train(tiny_config("train.steps=3", *MESH), tmp_path / "single")
    losses = [[row["loss"] for row in h] for h in histories + [single]]
    assert len(losses[0]) == 3
    assert losses[0] == losses[1], "both processes see the same global loss"
    np.testing.assert_allclose(losses[0], losses[2], rtol=1e-6)
    # Only process 0 writes the workdir's logs.
    rows = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
