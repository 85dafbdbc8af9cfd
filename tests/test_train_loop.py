"""The loop: what it logs, MFU by hand, stopping on divergence, resuming, and clear errors."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from hybridlm.config import ConfigError
from hybridlm.data.pipeline import make_train_iterator
from hybridlm.train.metrics import mfu, peak_flops
from hybridlm.train.trainer import NonFiniteLoss, train
from tests.train_helpers import tiny_config


def read_rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


class MemoryCheckpoints:
    """The loop's checkpoint protocol over host memory (Orbax comes with its own issue)."""

    def __init__(self, every: int):
        self.every, self.saved = every, {}

    def restore(self, layout):
        if not self.saved:
            return None
        state, data_state = self.saved[max(self.saved)]
        return jax.device_put(state, layout.shardings), dict(data_state)

    def should_save(self, step):
        return step % self.every == 0

    def save(self, step, state, data_state):
        self.saved[step] = (jax.device_get(state), dict(data_state))

    def close(self):
        pass


def test_logs_eval_and_mfu_against_a_hand_count(tmp_path, devices):
    cfg = tiny_config("train.steps=6", "log.every=2", "eval.every=3", "eval.steps=2",
                      "log.peak_flops=1e9")
    history = train(cfg, tmp_path, devices=devices[:1])
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6]  # the first and eval steps too
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert all(np.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    assert [r["loss"] for r in rows] == [h["loss"] for h in history]
    for row in rows:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu",
                "nan_skipped"} <= set(row)
        assert row["tokens_per_s"] == pytest.approx(8 * 16 / row["step_time_s"])
    # d 32, 4 heads x 8, 2 kv heads, MLP 64, vocab 300, 3 window-5 layers + 1 full, T 16.
    per_layer = 32 * 32 + 32 * 2 * 2 * 8 + 32 * 32 + 32 * 2 * 64 + 64 * 32
    local_keys = (1 + 2 + 3 + 4 + 5 * 12) / 16
    flops = 6 * (4 * per_layer + 300 * 32) + 12 * 32 * (3 * local_keys + 17 / 2)
    for row in rows:
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops / 1e9, rel=1e-9)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_peak_table_and_mfu():
    def device(kind):
        return SimpleNamespace(device_kind=kind)

    assert peak_flops(device("TPU v5 lite")) == 197e12
    assert peak_flops(device("TPU v5p")) == peak_flops(device("TPU v5")) == 459e12
    assert peak_flops(device("TPU v4")) == 275e12
    assert peak_flops(device("TPU v6 lite")) == 918e12
    assert peak_flops(device("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(device("NVIDIA A100-SXM4-80GB")) == 312e12
    assert peak_flops(device("cpu")) is None
    assert mfu(1000.0, 6e9, None, 8) is None
    assert mfu(1000.0, 6e9, 1e12, 8) == pytest.approx(1000 * 6e9 / 8e12)


def test_divergence_is_skipped_then_stops_with_the_last_good_state(tmp_path, devices):
    """A learning rate of 1e30 makes the gradients overflow after the first update."""
    cfg = tiny_config("train.steps=20", "train.learning_rate=1e30", "train.grad_clip=0.0",
                      "train.schedule=constant", "train.max_nan_streak=3")
    checkpoints = MemoryCheckpoints(every=1)
    with pytest.raises(NonFiniteLoss, match="last 3 steps"):
        train(cfg, tmp_path, devices=devices[:1], checkpoints=checkpoints)
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["nan_skipped"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["grad_norm"] is not None and all(r["grad_norm"] is None for r in rows[1:])
    assert sorted(checkpoints.saved) == [1], "no save while the streak lasts"
    saved = checkpoints.saved[1][0]
    assert np.isfinite(saved["params"]["embed"]).all() and int(saved["applied"]) == 1


def test_resume_from_the_checkpoint_protocol_equals_the_uninterrupted_run(tmp_path, devices):
    """With the options a long run would use: Adafactor, WSD, z-loss, bfloat16 compute."""
    cfg = tiny_config("train.steps=6", "train.optimizer=adafactor", "train.schedule=wsd",
                      "train.z_loss=1e-4", "model.dtype=bfloat16")
    checkpoints = MemoryCheckpoints(every=3)
    full = train(cfg, tmp_path / "full", devices=devices[:1], checkpoints=checkpoints)
    assert sorted(checkpoints.saved) == [3, 6]
    saved = checkpoints.saved[3][0]  # parameters and optimizer state stay float32
    assert {x.dtype for x in jax.tree.leaves((saved["params"], saved["opt_state"]))
            if x.ndim} == {np.dtype(np.float32)}
    del checkpoints.saved[6]  # as if the job had been killed after saving step 3
    resumed = train(cfg, tmp_path / "resumed", devices=devices[:1], checkpoints=checkpoints)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == \
        [(r["loss"], r["grad_norm"]) for r in full[3:]]
    assert full[-1]["loss"] < full[0]["loss"]


@pytest.mark.parametrize("overrides,message", [
    (["mesh.data=3"], "has 3 devices but this job has 8"),
    (["mesh.data=-1", "mesh.tensor=3"], "does not divide 8"),
    (["train.batch_size=4"], r"train.batch_size \(4\) is not a multiple of mesh.data x mesh.fsdp"),
    (["train.grad_accum_steps=2"], r"train.batch_size / train.grad_accum_steps \(4\)"),
])
def test_mesh_and_batch_mistakes_stop_before_anything_compiles(overrides, message, tmp_path,
                                                               devices):
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(*overrides), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_pipeline_batch_that_breaks_the_contract_is_named(tmp_path, devices):
    cfg = tiny_config()
    good = make_train_iterator(cfg, 0, 1)

    class Short:
        def __next__(self):
            batch = next(good)
            return {**batch, "positions": batch["positions"][:, :8]}

    with pytest.raises(ValueError, match=r"'positions' is int32\[8, 8\]; expected int32\[8, 16\]"):
        train(cfg, tmp_path, devices=devices[:1], train_iter=Short())


def test_cli_reports_a_mesh_that_does_not_fit(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "hybridlm.cli", "train", "--config.mesh.data=2",
         "--workdir", str(tmp_path / "w")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "mesh.data=2" in result.stderr and "this job has 1" in result.stderr
    assert "Traceback" not in result.stderr
