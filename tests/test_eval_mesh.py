"""Evaluation on the training mesh: parameters restored into their shards (fsdp x tensor),
the rest of the devices data replicas, and the same numbers as on one device."""

import numpy as np
import pytest
from flax import nnx

from hybridlm import cli
from hybridlm import config as config_lib
from hybridlm.config import ConfigError
from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.eval import analysis, commands, placement, tasks
from hybridlm.model import Transformer
from hybridlm.train.checkpoint import export_params, load_model
from tests.test_data_sources import make_corpus

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


def test_ppl_niah_and_analysis_match_one_device(export, tmp_path, devices):
    cfg, sharded, single = _sharded_and_single(export)
    mesh = placement.eval_mesh(cfg, ["mesh.fsdp=2", "mesh.tensor=2"])  # data=2 replicas
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    cfg, sharded, _ = load_model(export, mesh_for=lambda c: mesh)
    kw = dict(lengths=[128], depths=[0.5], samples=1, progress=False)
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
    assert an_mesh["overall"] == pytest.approx(an_one["overall"], abs=1e-5)
    # the oracle: cross-entropy in float64 from a full forward pass's logits on one device
    doc = commands.heldout.held_out_documents(cfg, min_tokens=129)[0][:129]
    logits = np.asarray(single(doc[None, :-1].astype(np.int32)), np.float64)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    oracle = logz - logits[np.arange(128), doc[1:]]
    with placement.on_mesh(mesh, cfg):
        device_losses = commands.next_token_losses(sharded)(np.stack([doc, doc]))
    np.testing.assert_allclose(np.asarray(device_losses)[0], oracle, rtol=1e-4, atol=1e-5)


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
