"""On 8 fake CPU devices, every mesh trains exactly like one device (to float tolerance)."""

import numpy as np
import pytest

from hybridlm.train.trainer import train
from tests.train_helpers import tiny_config

STEPS = 4
MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    # 2 microbatches of 4 on the same mesh: the same updates as batches of 8.
    "data2_fsdp2_tensor2_accum2": dict(data=2, fsdp=2, tensor=2, accum=2),
}


def run(tmp_path, name, devices, **mesh):
    accum = mesh.pop("accum", 1)
    cfg = tiny_config(f"train.steps={STEPS}", f"train.grad_accum_steps={accum}",
                      "train.warmup_steps=2",
                      *[f"mesh.{axis}={size}" for axis, size in mesh.items()])
    history = train(cfg, tmp_path / name, devices=devices)
    return {key: np.array([row[key] for row in history]) for key in ("loss", "grad_norm")}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, devices):
    return run(tmp_path_factory.mktemp("one"), "one", devices[:1], data=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", MESHES)
def test_mesh_matches_one_device(name, one_device, tmp_path, devices):
    sharded = run(tmp_path, name, None, **MESHES[name])
    assert len(sharded["loss"]) == STEPS
    assert one_device["loss"][-1] < one_device["loss"][0], "the runs must learn something"
    np.testing.assert_allclose(sharded["loss"], one_device["loss"], rtol=2e-6)
    np.testing.assert_allclose(sharded["grad_norm"], one_device["grad_norm"], rtol=2e-5)
