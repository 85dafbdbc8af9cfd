"""On 8 fake CPU devices, every mesh trains exactly like one device (to float tolerance).

Two real processes with 4 devices each are compared with one process in tests/test_launch.py
(through launch/local.sh, fed the same global batches: each process packs its own slice of
the data, so the two runs' batches differ unless the test pins them)."""

import os

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
