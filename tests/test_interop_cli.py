"""`hybridlm export --format hf` and `hybridlm import` through real checkpoint directories."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from hybridlm import cli
from hybridlm import config as config_lib
from hybridlm.runs import export_params, load_model
from tests.helpers import neighbour_model_config, tiny_model_config
from tests.test_interop_hf import random_model


def params_export(model_cfg, out):
    """A params-only hybridlm export (what `hybridlm export --format params` writes)."""
    cfg = config_lib.defaults()
    model_cfg.attention_impl = "dense"
    cfg.model = model_cfg
    model = random_model(cfg.model, seed=3)
    export_params(cfg, nnx.state(model, nnx.Param), out, step=7)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_export_import_export_round_trips_through_the_cli(tmp_path, capsys):
    params = params_export(neighbour_model_config("cohere2"), tmp_path / "run")
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--format", "hf",
                     "--out", str(tmp_path / "hf")]) == 0
    assert "as Cohere2ForCausalLM" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}

    assert cli.main(["import", "--from", str(tmp_path / "hf"), "--out",
                     str(tmp_path / "imported")]) == 0
    cfg, model, _ = load_model(tmp_path / "imported")
    restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_a, flat_b = nnx.traversals.flatten_mapping(params), \
        nnx.traversals.flatten_mapping(restored)
    assert sorted(flat_a) == sorted(flat_b)
    for key, value in flat_a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[key]), err_msg=key)
    assert (tmp_path / "imported" / "tokenizer.json").is_file()
    assert cfg.data.tokenizer == str((tmp_path / "imported" / "tokenizer.json").absolute())

    assert cli.main(["export", "--workdir", str(tmp_path / "imported"), "--format", "hf",
                     "--out", str(tmp_path / "hf2")]) == 0
    first, second = load_file(tmp_path / "hf" / "model.safetensors"), \
        load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(first) == sorted(second)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)

    assert cli.main(["export", "--workdir", str(tmp_path / "imported"), "--format", "params",
                     "--out", str(tmp_path / "params")]) == 0
    _, again, _ = load_model(tmp_path / "params")
    for key, value in nnx.traversals.flatten_mapping(
            nnx.to_pure_dict(nnx.state(again, nnx.Param))).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_a[key]), err_msg=key)

    # the config file the import leaves trains on from the imported parameters
    resumed = config_lib.load(str(tmp_path / "imported" / "config.py"))
    assert resumed.train.init_from == str((tmp_path / "imported").resolve())
    assert config_lib.model_dict(resumed) == config_lib.model_dict(cfg)


@pytest.mark.parametrize("argv_tail,message", [
    (["--format", "hf"], "no Hugging Face architecture computes this model exactly"),
    (["--format", "hf", "--arch", "llama4"], "Llama4ForCausalLM: model.layer_types"),
])
def test_export_refusals_exit_2_without_traceback(argv_tail, message, tmp_path, capsys):
    params_export(tiny_model_config("qknorm", num_layers=1, pattern="global"), tmp_path / "run")
    code = cli.main(["export", "--workdir", str(tmp_path / "run"), "--out",
                     str(tmp_path / "hf"), *argv_tail])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


def test_import_errors_exit_2(tmp_path, capsys):
    assert cli.main(["import", "--from", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json there" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert cli.main(["import", "--from", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err
    assert cli.main(["export", "--workdir", str(tmp_path / "none"), "--format", "hf",
                     "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
