"""Validation rules of the train, mesh, eval and log sections (one case per rule)."""

import pytest

from hybridlm.config import ConfigError, load

BAD = [
    (["train.optimizer=sgd"], "train.optimizer is 'sgd'"),
    (["train.schedule=linear"], "train.schedule is 'linear'"),
    (["train.learning_rate=0.0"], "train.learning_rate must be > 0"),
    (["train.warmup_steps=-1"], "train.warmup_steps must be an integer >= 0"),
    (["train.min_lr_ratio=1.5"], "train.min_lr_ratio must be in [0, 1]"),
    (["train.decay_fraction=-0.1"], "train.decay_fraction must be in [0, 1]"),
    (["train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
    (["train.b2=1.0"], "train.b1 and train.b2 must be in [0, 1)"),
    (["train.grad_clip=-1.0"], "train.grad_clip must be >= 0"),
    (["train.z_loss=-1e-4"], "train.z_loss must be >= 0"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps must be an integer >= 1"),
    (["train.grad_accum_steps=3"], "train.batch_size (4) must be a multiple of train.grad_accum"),
    (["train.max_nan_streak=0"], "train.max_nan_streak must be an integer >= 1"),
    (["mesh.tensor=0"], "mesh.tensor must be an integer >= 1, or -1"),
    (["mesh.fsdp=-2"], "mesh.fsdp must be an integer >= 1, or -1"),
    (["mesh.fsdp=-1"], "only one mesh field may be -1"),
    (["eval.every=-1"], "eval.every must be an integer >= 0"),
    (["eval.steps=-2"], "eval.steps must be an integer >= -1"),
    (["log.peak_flops=-1.0"], "log.peak_flops must be >= 0"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_each_rule_rejects_a_bad_config_with_its_message(overrides, message):
    with pytest.raises(ConfigError) as e:
        load("configs/tiny.py", overrides)
    assert message in str(e.value)


def test_the_defaults_and_shipped_options_are_valid():
    for overrides in (["train.optimizer=adafactor", "train.schedule=wsd"],
                      ["train.schedule=constant", "train.grad_accum_steps=4", "mesh.data=1",
                       "mesh.fsdp=-1", "train.z_loss=1e-4"]):
        cfg = load("configs/tiny.py", overrides)
        assert cfg.train.optimizer in ("adamw", "adafactor")
    assert load("configs/tiny.py").mesh.to_dict() == \
        {"data": -1, "fsdp": 1, "context": 1, "tensor": 1, "context_attention": "allgather",
         "context_layout": "zigzag"}


BAD_MODEL = [
    ('"sink": 1', "model.layer_types.local.sink must be True or False, got 1"),
    ('"qk_norm_scale": "no"', "model.layer_types.local.qk_norm_scale must be True or False"),
    ('"temperature_scale": 0.0', "model.layer_types.local.temperature_scale must be a number > 0"),
    ('"window": 8}, "global": {"rope": "yes"', "model.layer_types.global.rope must be True or"),
]


@pytest.mark.parametrize("fields,message", BAD_MODEL, ids=[b[1][:50] for b in BAD_MODEL])
def test_every_layer_type_field_is_checked_as_a_config_file_writes_it(tmp_path, fields,
                                                                        message):
    path = tmp_path / "bad.py"
    path.write_text("from hybridlm.config import defaults\n\n\ndef get_config(arg=None):\n"
                    "    c = defaults()\n"
                    f"    c.model.layer_types = {{\"local\": {{{fields}}}}}\n"
                    "    c.model.pattern = 'local'\n"
                    "    return c\n")
    with pytest.raises(ConfigError) as e:
        load(str(path))
    assert message in str(e.value)


def test_the_activation_and_other_choices_come_from_the_code_that_runs_them():
    from hybridlm.model.layers import ACTIVATIONS

    with pytest.raises(ConfigError, match=r"model.activation is 'relu'; choose one of "
                                          r"\('silu', 'gelu'\)"):
        load("configs/tiny.py", ["model.activation=relu"])
    assert set(ACTIVATIONS) == {"silu", "gelu"}  # what the MLP can apply, nothing else
