"""Properties of the model that follow from the paper's definitions of each layer type."""

import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridlm import config as config_lib
from hybridlm.model import Transformer, flops_per_token, param_count
from tests.helpers import (
    NEIGHBOURS,
    VARIANTS,
    build,
    jitted,
    neighbour_model_config,
    random_tokens,
    tiny_model_config,
)

ALL = [("paper", v) for v in VARIANTS] + [("neighbour", n) for n in NEIGHBOURS]


def model_config(kind, name, **kw):
    cfg = tiny_model_config(name) if kind == "paper" else neighbour_model_config(name)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("kind,name", ALL)
def test_causality(kind, name):
    model = build(model_config(kind, name))
    tokens = random_tokens(0, (2, 24))
    t = 13
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 300)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:]), "changing token t must change later logits"


def one_layer(layer_type: dict, pattern_name="x"):
    cfg = tiny_model_config("rope", num_layers=1)
    cfg.layer_types = {pattern_name: {**config_lib.defaults().model.layer_types["global"],
                                      **_filled(layer_type)}}
    cfg.pattern = pattern_name
    return build(cfg)


def _filled(fields):
    from hybridlm.model.pattern import layer_defaults
    return {**layer_defaults(), **fields}


def test_window_hides_keys_outside_it():
    window, t = 5, 17
    model = one_layer({"rope": True, "window": window})
    tokens = random_tokens(1, (1, 24))
    base = model(tokens)[:, t]
    for s in range(t + 1):
        changed = tokens.at[:, s].set((tokens[:, s] + 7) % 300)
        out = model(changed)[:, t]
        if s <= t - window:
            np.testing.assert_array_equal(out, base, err_msg=f"key {s} is outside the window")
        else:
            assert not np.allclose(out, base), f"key {s} is inside the window of query {t}"


def test_nope_layer_ignores_order_of_the_past():
    t = 15
    tokens = random_tokens(2, (1, 20))
    perm = np.random.default_rng(0).permutation(t)
    shuffled = tokens.at[:, :t].set(tokens[:, perm])
    nope = one_layer({"rope": False})
    np.testing.assert_allclose(nope(tokens)[:, t], nope(shuffled)[:, t], atol=1e-5)
    rope = one_layer({"rope": True})
    assert not np.allclose(rope(tokens)[:, t], rope(shuffled)[:, t], atol=1e-4)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_layer_is_shift_invariant(style):
    model = one_layer({"rope": True, "rope_style": style})
    tokens = random_tokens(3, (2, 20))
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    np.testing.assert_allclose(model(tokens, pos), model(tokens, pos + 1000), atol=2e-4)
    assert not np.allclose(model(tokens, pos), model(tokens, pos * 2), atol=1e-3)


@pytest.mark.parametrize("kind,name", ALL)
def test_document_alone_equals_document_packed(kind, name):
    model = build(model_config(kind, name))
    before, doc, after = random_tokens(4, (1, 7)), random_tokens(5, (1, 14)), random_tokens(
        6, (1, 5))
    packed = jnp.concatenate([before, doc, after], axis=1)
    segments = jnp.array([[1] * 7 + [2] * 14 + [3] * 5])
    positions = jnp.array([list(range(7)) + list(range(14)) + list(range(5))])
    alone = model(doc)
    inside = model(packed, positions, segments)[:, 7:21]
    np.testing.assert_allclose(alone, inside, atol=1e-5)


@pytest.mark.parametrize("kind,name", [("paper", "rnope_swa"), ("neighbour", "gemma3")])
def test_scanned_and_unrolled_stacks_agree(kind, name):
    scanned = build(model_config(kind, name, scan_layers=True)).model
    unrolled = build(model_config(kind, name, scan_layers=False)).model
    nnx.update(unrolled, nnx.state(scanned))
    tokens = random_tokens(7, (2, 16))
    np.testing.assert_allclose(jitted(scanned)(tokens), jitted(unrolled)(tokens), rtol=1e-6,
                               atol=1e-6)


def test_layer_layout_places_every_layer_once():
    """Gemma-3-like depth 8 over a 3-entry pattern: 2 stacked groups, a tail of 2, and the
    model's blocks in the layout's order (what the cache, interop and AOT rely on)."""
    from hybridlm.model.pattern import expand, layer_layout

    cfg = neighbour_model_config("gemma3").to_dict()
    cfg.update(num_layers=8, pattern="local,local,global")
    layout = layer_layout(cfg)
    assert (layout.per_group, layout.num_groups, len(layout.tail)) == (3, 2, 2)
    assert layout.layers() == expand(cfg["layer_types"], cfg["pattern"], 8)
    places = [layout.locate(i) for i in range(8)]
    assert places == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (None, 0), (None, 1)]
    assert [layout.index(*place) for place in places] == list(range(8))
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # shapes only
    assert tuple(b.attn.spec for b in model.groups.blocks) == layout.group
    assert tuple(b.attn.spec for b in model.tail.blocks) == layout.tail
    assert model.groups.blocks[0].attn.wq.shape[0] == layout.num_groups


def test_groups_stack_parameters_with_a_layers_axis():
    model = build(tiny_model_config("rnope_swa", num_layers=8)).model
    wq = model.groups.blocks[0].attn.wq
    assert wq.shape == (2, 32, 4, 8)
    assert wq.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")


def shipped_configs():
    specs = []
    for path in sorted(glob.glob(str(config_lib.REPO_ROOT / "configs" / "*.py"))):
        name = path.rsplit("/", 1)[1][:-3]
        if name == "paper":
            specs += [f"{path}:variant={v},size={s}" for v in VARIANTS
                      for s in config_lib.MODEL_SIZES]
        else:
            specs.append(path)
    specs += [f"{config_lib.REPO_ROOT}/configs/{n}.py:size={s}" for n, s in
              [("cohere2", "r7b"), ("llama4", "scout"), ("smollm3", "3b"), ("gemma3", "4b"),
               ("gpt_oss", "20b")]]
    return specs


@pytest.mark.parametrize("spec", shipped_configs(), ids=lambda s: s.rsplit("/", 1)[1])
def test_param_count_matches_the_built_model(spec):
    cfg = config_lib.load(spec).model.to_dict()
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert param_count(cfg) == real


def test_flops_per_token_by_hand():
    cfg = tiny_model_config("rnope_swa").to_dict()  # d 32, 4 heads x 8, kv 2, mlp 64, V 300
    d, hd, f, v, t, w = 32, 8, 64, 300, 12, 5
    per_layer = d * 4 * hd + d * 2 * 2 * hd + 4 * hd * d + d * 2 * f + f * d
    n = 4 * per_layer + v * d
    local_keys = sum(min(i + 1, w) for i in range(t)) / t  # 1,2,3,4,5,5,... -> 50/12
    global_keys = (t + 1) / 2
    attention = 12 * 4 * hd * (3 * local_keys + global_keys)
    assert flops_per_token(cfg, t) == pytest.approx(6 * n + attention)
    assert local_keys == pytest.approx(50 / 12)
