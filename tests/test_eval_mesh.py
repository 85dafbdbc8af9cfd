"""Evaluation on the training mesh: parameters restored into their shards (fsdp x tensor),
the rest of the devices data replicas, and the same numbers as on one device and as two
processes of four devices each (launch/local.sh)."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from hybridlm import cli
from hybridlm import config as config_lib
from hybridlm.config import ConfigError
from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.eval import analysis, commands, placement, tasks
from hybridlm.model import Transformer
from hybridlm.runs import export_params, load_model
from tests.test_data_sources import make_corpus
from tests.test_launch import cpu_env

ROOT = Path(__file__).resolve().parents[1]

TOK = ByteTokenizer()
HAY = TOK.encode("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 50)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A params export of a tiny RNoPE-SWA model whose run trained on fsdp=4 x tensor=2."""
    root = tmp_path_factory.mktemp("evalmesh")
    cfg = config_lib.load("configs/tiny.py:seq_len=128,window=16", [
        f"data.cache_dir={root / 'cache'}", f"data.source={make_corpus(root / 'corpus')}",
        "data.val_fraction=0.5", "model.d_model=32", "model.num_heads=4",
        "model.num_kv_heads=2", "model.head_dim=8", "model.mlp_dim=64", "model.vocab_size=300",
        "mesh.data=-1", "mesh.fsdp=4", "mesh.tensor=2"])
    model = Transformer(cfg.model.to_dict(), rngs=nnx.Rngs(params=3))
    export_params(cfg, nnx.state(model, nnx.Param), root / "export", step=5)
    return root / "export"


def _sharded_and_single(export):
    cfg, sharded, _ = load_model(export, mesh_for=placement.eval_mesh)
    _, single, _ = load_model(export)
    return cfg, sharded, single


def test_parameters_land_in_their_shards(export, devices):
    cfg, sharded, single = _sharded_and_single(export)
    mesh = placement.eval_mesh(cfg)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    params = nnx.to_flat_state(nnx.state(sharded, nnx.Param))
    split = [v[...] for _, v in params if len(v[...].sharding.device_set) == 8
             and not v[...].sharding.is_fully_replicated]
    assert split, "no parameter is split over the mesh"
    for v in split:  # each device holds a slice, not the whole matrix
        shard = v.addressable_shards[0].data
        assert shard.size < v.size
    flat_single = dict(nnx.to_flat_state(nnx.state(single, nnx.Param)))
    for path, v in params:
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(flat_single[path][...]))


@pytest.mark.slow
def test_ppl_niah_and_analysis_match_one_device_and_two_processes(export, tmp_path, devices):
    """On data=2 x fsdp=2 x tensor=2: one process of 8 devices equals one device, and
    `launch/local.sh 2 eval` (2 processes x 4 devices, each restoring its own shards;
    started first, it runs beside this process's work) writes the same grid and losses."""
    mesh_flags = ["--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    two = subprocess.Popen(
        ["bash", "launch/local.sh", "2", "eval", "--workdir", str(export), "--task",
         "niah,ppl", "--lengths", "128", "--depths", "0.5", "--samples", "3", "--quiet",
         "--out", str(tmp_path / "two"), *mesh_flags],
        cwd=ROOT, env=cpu_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cfg, sharded, single = _sharded_and_single(export)
    mesh = placement.eval_mesh(cfg, [f.removeprefix("--config.") for f in mesh_flags])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    cfg, sharded, _ = load_model(export, mesh_for=lambda c: mesh)
    kw = dict(lengths=[128], depths=[0.5], samples=3, progress=False)
    with placement.on_mesh(mesh, cfg):
        ppl_mesh = commands.eval_ppl(cfg, sharded, tmp_path / "mesh", lengths=[128],
                                     samples=3, progress=False)
        niah_mesh = commands.eval_niah(cfg, sharded, tmp_path / "mesh", **kw)
        (sample,) = tasks.make_samples("niah_single", TOK, HAY, [200], [0.5], 1, seed=0)
        answer = TOK.encode(sample.answer)
        an_mesh = analysis.analyze_sample(sharded, sample, answer)
    ppl_one = commands.eval_ppl(cfg, single, tmp_path / "one", lengths=[128], samples=3,
                                progress=False)
    niah_one = commands.eval_niah(cfg, single, tmp_path / "one", **kw)
    an_one = analysis.analyze_sample(single, sample, answer)
    for a, b in zip(ppl_mesh["lengths"], ppl_one["lengths"], strict=True):
        assert a["documents"] == b["documents"] == 3  # 2 per pass on the mesh: one padded
        np.testing.assert_allclose([x["loss"] for x in a["buckets"]],
                                   [x["loss"] for x in b["buckets"]], rtol=1e-5)
    assert [s["output"] for s in niah_mesh["samples"]] == \
        [s["output"] for s in niah_one["samples"]]
    for key in ("overall", "uniform"):  # the masses and their uniform baselines
        got, want = (a["overall"] if key == "overall" else a["overall"]["uniform"]
                     for a in (an_mesh, an_one))
        assert {k: v for k, v in got.items() if k != "uniform"} == pytest.approx(
            {k: v for k, v in want.items() if k != "uniform"}, abs=1e-5)
    # the oracle: cross-entropy in float64 from a full forward pass's logits on one device
    doc = commands.heldout.held_out_documents(cfg, min_tokens=129)[0][:129]
    logits = np.asarray(single(doc[None, :-1].astype(np.int32)), np.float64)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    oracle = logz - logits[np.arange(128), doc[1:]]
    with placement.on_mesh(mesh, cfg):
        device_losses = commands.next_token_losses(sharded)(np.stack([doc, doc]))
    np.testing.assert_allclose(np.asarray(device_losses)[0], oracle, rtol=1e-4, atol=1e-5)

    log, _ = two.communicate(timeout=900)
    assert two.returncode == 0, log[-3000:]
    assert "on the mesh data=2 fsdp=2 context=1 tensor=2 (8 cpu devices), 2 processes" in log
    niah_two, ppl_two = (json.loads((tmp_path / "two" / f"{name}.json").read_text())
                         for name in ("niah", "ppl"))
    assert niah_two["grid"] == niah_mesh["grid"]
    assert [s["output"] for s in niah_two["samples"]] == \
        [s["output"] for s in niah_mesh["samples"]]
    (a,), (b,) = ppl_two["lengths"], ppl_mesh["lengths"]
    assert a["documents"] == b["documents"] == 3
    np.testing.assert_allclose([x["loss"] for x in a["buckets"]],
                               [x["loss"] for x in b["buckets"]], rtol=1e-5)
    assert (tmp_path / "two" / "niah.png").exists() and "results in" in log
    assert "results in" not in (export / "eval_process_1.log").read_text(), \
        "process 1 computes but neither prints nor writes results"


def test_eval_mesh_shapes_and_refusals(export, devices):
    cfg = config_lib.load("configs/tiny.py", ["mesh.data=2", "mesh.fsdp=2", "mesh.context=2"])
    mesh = placement.eval_mesh(cfg)  # context folds into data
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "context": 1, "tensor": 1}
    assert placement.describe(mesh) == "mesh data=4 fsdp=2 context=1 tensor=1 (8 cpu devices)"
    fully_sharded = config_lib.load("configs/tiny.py", ["mesh.data=1", "mesh.fsdp=-1",
                                                        "mesh.tensor=2"])
    assert dict(placement.eval_mesh(fully_sharded).shape) == \
        {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    with pytest.raises(ConfigError, match=r"mesh.fsdp=3 x mesh.tensor=1 = 3 does not divide"):
        placement.eval_mesh(cfg, ["mesh.fsdp=3"])
    with pytest.raises(ConfigError, match="only the mesh may change"):
        placement.eval_mesh(cfg, ["model.d_model=64"])


def test_cli_eval_reports_its_mesh_and_refuses_model_overrides(export, tmp_path, capsys):
    assert cli.main(["eval", "--workdir", str(export), "--task", "ppl", "--lengths", "128",
                     "--samples", "2", "--out", str(tmp_path), "--quiet",
                     "--config.mesh.fsdp=2", "--config.mesh.tensor=1"]) == 0
    captured = capsys.readouterr()
    assert "on the mesh data=4 fsdp=2 context=1 tensor=1 (8 cpu devices)" in captured.err
    assert (tmp_path / "ppl.json").exists()
    assert cli.main(["analyze", "--workdir", str(export), "--config.model.d_model=64"]) == 2
    assert "only the mesh may change" in capsys.readouterr().err
    assert cli.main(["export", "--workdir", str(export), "--out", str(tmp_path / "x"),
                     "--config.mesh.fsdp=2"]) == 2
    assert "not accepted by export" in capsys.readouterr().err


def test_processes_agree_on_the_command_and_the_checkpoint(export):
    """What the eval preflight compares across processes: the flags but the process id, the
    overrides, and the checkpoint each process found (another step: another fingerprint)."""
    from hybridlm.eval import cli as eval_cli
    from hybridlm.runs import Source, find_sources

    def fingerprint(*flags, overrides=(), source=None):
        args = cli._parser().parse_args(["eval", "--workdir", str(export), *flags])
        return eval_cli._invocation(args, list(overrides), source or find_sources(export)[0])

    job = ["--coordinator", "h:1", "--num_processes", "2", "--process_id"]
    assert fingerprint(*job, "0") == fingerprint(*job, "1")
    newest = find_sources(export)[0]
    later = Source(newest.kind, newest.directory, newest.step + 1)
    for other in (fingerprint(*job, "0", "--lengths", "256"),
                  fingerprint(*job, "0", overrides=["mesh.fsdp=2"]),
                  fingerprint(*job, "0", source=later)):
        assert other != fingerprint(*job, "0")
