"""Config loading, overrides and every validation rule."""

import json

import pytest

from hybridlm import config as config_lib
from hybridlm.config import ConfigError, load


def test_paper_variants_build_the_stack_the_paper_describes():
    c = load("configs/paper.py:variant=rnope_swa,seq_len=2048,window=256")
    assert c.model.pattern == "local,local,local,global"
    assert c.model.layer_types.local.window == 256 and c.model.layer_types.local.rope
    assert c.model.layer_types["global"].rope is False
    assert c.model.layer_types["global"].window is None
    assert c.data.seq_len == 2048
    assert load("configs/paper.py:variant=qknorm").model.layer_types["global"].qk_norm == \
        "pre_rope"
    rnope = load("configs/paper.py:variant=rnope,theta=4000000").model
    assert rnope.layer_types.rope.rope_theta == 4e6 and not rnope.layer_types.nope.rope
    big = load("configs/paper.py:variant=rope,size=8b").model
    assert (big.num_layers, big.d_model, big.num_heads, big.num_kv_heads) == (32, 4096, 32, 8)


def test_overrides_set_nested_fields_with_types():
    c = load("configs/tiny.py", ["train.steps=7", "model.layer_types.local.window=64",
                                 "model.layer_types.local.rope_theta=5e5", "model.dtype=bfloat16",
                                 "train.learning_rate=1"])
    assert c.train.steps == 7 and c.model.layer_types.local.window == 64
    assert c.model.layer_types.local.rope_theta == 5e5 and c.model.dtype == "bfloat16"
    assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)
    assert load("configs/tiny.py", ["model.layer_types.local.window=None"]) \
        .model.layer_types.local.window is None


def test_resolved_config_round_trips_through_json(tmp_path):
    c = load("configs/llama4.py")
    config_lib.save(c, tmp_path / "config.json")
    back = config_lib.from_json((tmp_path / "config.json").read_text())
    assert back.to_dict() == c.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["model"]["layer_types"][
        "chunked"]["qk_norm"] == "post_rope"


BAD = [
    (["model.windw=3"], "unknown config field 'model.windw'"),
    (["model.layer_types.local.windw=3"], "did you mean 'window'"),
    (["trian.steps=3"], "unknown config field 'trian'"),
    (["model.num_kv_heads=3"], "model.num_heads (4) must be a multiple of model.num_kv_heads"),
    (["model.pattern=local,global,nope"], "model.pattern names 'nope'"),
    (["model.pattern= , "], "model.pattern is empty"),
    (["model.layer_types.local.window=0"], "layer_types.local.window must be an integer >= 1"),
    (["model.layer_types.global.chunk=-2"], "model.layer_types.global.chunk must be an integer"),
    (["model.num_layers=6"], "model.num_layers (6) is not a multiple of the pattern length"),
    (["model.vocab_size=100"], "model.vocab_size (100) is smaller than the byte tokenizer"),
    (["model.layer_types.local.rope_style=spiral"], "model.layer_types.local.rope_style"),
    (["model.layer_types.local.qk_norm=after"], "model.layer_types.local.qk_norm"),
    (["model.head_dim=63"], "model.head_dim (63) must be even for RoPE"),
    (["model.attention_impl=magic"], "model.attention_impl is 'magic'"),
    (["model.attention_block_q=0"], "model.attention_block_q must be an integer >= 1"),
    (["model.attention_block_kv=100"], "model.attention_block_kv (100) must be a multiple of 8"),
    (["model.remat=some"], "model.remat is 'some'"),
    (["model.block=serial"], "model.block is 'serial'"),
    (["data.seq_len=0"], "data.seq_len must be an integer >= 1"),
    (["train.batch_size=0"], "train.batch_size must be an integer >= 1"),
    (["train.steps=ten"], "config.train.steps='ten': expected a int"),
    (["model.d_model=2.5"], "config.model.d_model='2.5': expected a int"),
    (["train.steps"], "not of the form section.field=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_each_rule_rejects_a_bad_config_with_its_message(overrides, message):
    with pytest.raises(ConfigError) as e:
        load("configs/tiny.py", overrides)
    assert message in str(e.value)


def test_partial_pattern_is_allowed_only_when_asked():
    c = load("configs/tiny.py", ["model.num_layers=6", "model.allow_partial_pattern=True"])
    assert c.model.num_layers == 6


def test_bad_config_files_and_arguments(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load("configs/nope.py")
    with pytest.raises(ConfigError, match="unknown config argument 'varaint'"):
        load("configs/paper.py:varaint=rope")
    with pytest.raises(ConfigError, match="unknown paper variant 'ropee'"):
        load("configs/paper.py:variant=ropee")
    with pytest.raises(ConfigError, match="unknown model size"):
        load("configs/paper.py:size=huge")
    no_fn = tmp_path / "x.py"
    no_fn.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        load(str(no_fn))
    typo = tmp_path / "typo.py"
    typo.write_text("from hybridlm.config import defaults\n"
                    "def get_config(arg):\n    c = defaults()\n    c.model.num_layer = 3\n"
                    "    return c\n")
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        load(str(typo))


def test_parse_arg_types():
    a = config_lib.parse_arg("seq_len=4096,theta=5e5,variant=rope,flag", seq_len=1, theta=1.0,
                             variant="x", flag=False)
    assert (a.seq_len, a.theta, a.variant, a.flag) == (4096, 5e5, "rope", True)
    with pytest.raises(ConfigError, match="expected int"):
        config_lib.parse_arg("seq_len=long", seq_len=1)
