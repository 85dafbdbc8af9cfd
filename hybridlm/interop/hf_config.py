"""Model config <-> Hugging Face config.json, for the architectures that compute the same thing.

Each architecture is two functions: `to_hf(model) -> config.json dict` writes the closest
HF config, and `from_hf(config.json dict) -> model` reads back what transformers will
compute with it (the same defaults and per-layer rules as its modeling code). A model is
exportable exactly when reading back what we wrote gives the same computation: the global
fields and, layer by layer, the attention fields in `LAYER_COMPARED`. Anything else is
refused with the fields that differ, so an export never loads but computes something else.

What each transformers model computes (transformers 5.x, read from its modeling code):
  Cohere2:  parallel block, mean-centred LayerNorm without bias, logits * logit_scale;
            "sliding_attention" layers: interleaved RoPE + a window of W keys (query
            included); "full_attention" layers: NoPE, full causal; head_dim = hidden / heads.
  SmolLM3:  sequential block, RMSNorm; half-split RoPE where no_rope_layers[i] == 1;
            "sliding_attention" layers (use_sliding_window) see W keys; RoPE and window
            are independent per layer.
  Llama 4 text (dense MLPs only: moe_layers = []): sequential, RMSNorm; interleaved RoPE
            where no_rope_layers[i] == 1, followed by a weightless RMS q/k norm when
            use_qk_norm; "chunked_attention" layers see their own C-token chunk; NoPE
            layers scale q by 1 + attn_scale * log(floor((p + 1) / floor_scale) + 1) when
            attn_temperature_tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hybridlm.errors import ConfigError
from hybridlm.model.pattern import LayerSpec, expand, layer_defaults

GLOBAL_COMPARED = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                   "mlp_dim", "activation", "norm", "norm_eps", "block", "tie_embeddings",
                   "logit_scale")
LAYER_COMPARED = ("rope", "rope_theta", "rope_style", "window", "chunk", "qk_norm",
                  "qk_norm_scale", "temperature_floor", "temperature_scale", "sink")
# hybridlm's GeGLU is jax.nn.gelu's tanh approximation; transformers calls it this:
HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu_pytorch_tanh"}
ACTIVATIONS_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu",
                       "gelu_new": "gelu"}


def layer_view(spec: LayerSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The attention fields of one layer that change its output (irrelevant ones as None)."""
    get = (lambda k: getattr(spec, k)) if isinstance(spec, LayerSpec) else spec.__getitem__
    view = {k: get(k) for k in LAYER_COMPARED}
    if not view["rope"]:
        view["rope_theta"] = view["rope_style"] = None
    if view["qk_norm"] == "none":
        view["qk_norm_scale"] = None
    if view["temperature_floor"] is None:
        view["temperature_scale"] = None
    return view


def model_view(model: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(global fields, one layer_view per layer) of a hybridlm model config."""
    layers = expand(model["layer_types"], model["pattern"], model["num_layers"])
    return {k: model[k] for k in GLOBAL_COMPARED}, [layer_view(s) for s in layers]


def differences(model: Mapping[str, Any], other: Mapping[str, Any], arch: str) -> list[str]:
    """Human-readable fields in which `other` (read back from HF) computes differently."""
    (mine, my_layers), (theirs, their_layers) = model_view(model), model_view(other)
    out = [f"model.{k} is {mine[k]!r} ({arch} has {theirs[k]!r})"
           for k in GLOBAL_COMPARED if mine[k] != theirs[k]]
    if mine["num_layers"] != theirs["num_layers"]:  # layers compare only at the same depth
        return out
    names = [s.name for s in expand(model["layer_types"], model["pattern"],
                                    model["num_layers"])]
    for field in LAYER_COMPARED:
        for name in dict.fromkeys(names):  # one line per (layer type, field) that differs
            bad = [i for i, (n, a, b) in enumerate(zip(names, my_layers, their_layers,
                                                       strict=True))
                   if n == name and a[field] != b[field]]
            if bad:
                out.append(f"model.layer_types.{name}.{field} is {my_layers[bad[0]][field]!r} "
                           f"({arch} has {their_layers[bad[0]][field]!r} at layers "
                           f"{_ranges(bad)})")
    return out


def _ranges(indices: list[int]) -> str:
    return ",".join(str(i) for i in indices) if len(indices) <= 8 else \
        f"{','.join(str(i) for i in indices[:8])},... ({len(indices)} layers)"


def build_model(globals_: Mapping[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    """A hybridlm model section from global fields and one layer dict per layer.

    Equal layers share a layer type; the pattern is the shortest period of the layer
    sequence (a remainder becomes a partial pattern), so the decoder scans as it would
    for a config written by hand.
    """
    types: dict[str, dict[str, Any]] = {}
    names = []
    for layer in layers:
        fields = {**layer_defaults(), **{k: v for k, v in layer.items() if v is not None}}
        name = next((n for n, f in types.items() if f == fields), None)
        if name is None:
            name = _type_name(fields, types)
            types[name] = fields
        names.append(name)
    period = next(p for p in range(1, len(names) + 1)
                  if all(names[i] == names[i % p] for i in range(len(names))))
    return {**globals_, "layer_types": types, "pattern": ",".join(names[:period]),
            "allow_partial_pattern": len(names) % period != 0}


def _type_name(fields: Mapping[str, Any], taken: Mapping[str, Any]) -> str:
    base = "rope" if fields["rope"] else "nope"
    if fields["window"] is not None:
        base += "_window"
    if fields["chunk"] is not None:
        base += "_chunk"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    return name


# ---- shared pieces of the three architectures -------------------------------------------
def _common_to_hf(m: Mapping[str, Any], tokens: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "vocab_size": m["vocab_size"], "hidden_size": m["d_model"],
        "intermediate_size": m["mlp_dim"], "num_hidden_layers": m["num_layers"],
        "num_attention_heads": m["num_heads"], "num_key_value_heads": m["num_kv_heads"],
        "head_dim": m["head_dim"], "hidden_act": HF_ACTIVATIONS[m["activation"]],
        "tie_word_embeddings": m["tie_embeddings"], "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": m["init_std"], "use_cache": True,
        "dtype": "float32", **tokens}


def _common_from_hf(c: Mapping[str, Any], arch: str) -> dict[str, Any]:
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConfigError(f"{arch} config has attention_bias/mlp_bias set: hybridlm's "
                          "projections have no biases")
    rope = c.get("rope_parameters") or {"rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{arch} config has rope_parameters.rope_type "
                          f"{rope['rope_type']!r}: hybridlm implements plain RoPE only "
                          "('default')")
    act = c.get("hidden_act", "silu")
    if act not in ACTIVATIONS_FROM_HF:
        raise ConfigError(f"{arch} config has hidden_act {act!r}; hybridlm has "
                          f"{sorted(ACTIVATIONS_FROM_HF)}")
    heads = c["num_attention_heads"]
    return {"vocab_size": c["vocab_size"], "d_model": c["hidden_size"],
            "num_layers": c["num_hidden_layers"], "num_heads": heads,
            "num_kv_heads": c.get("num_key_value_heads") or heads,
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
            "mlp_dim": c["intermediate_size"], "activation": ACTIVATIONS_FROM_HF[act],
            "tie_embeddings": bool(c.get("tie_word_embeddings", True)),
            "logit_scale": 1.0, "block": "sequential", "norm": "rms"}


def _theta(c: Mapping[str, Any], default: float) -> float:
    return float((c.get("rope_parameters") or {}).get("rope_theta", default))


def _first(layers: list[LayerSpec], pick: Callable[[LayerSpec], Any], default: Any) -> Any:
    return next((v for v in map(pick, layers) if v is not None), default)


def _layers(m: Mapping[str, Any]) -> list[LayerSpec]:
    return expand(m["layer_types"], m["pattern"], m["num_layers"])


# ---- Cohere2ForCausalLM ------------------------------------------------------------------
def cohere2_to_hf(m: Mapping[str, Any], tokens: Mapping[str, Any]) -> dict[str, Any]:
    layers = _layers(m)
    sliding = [s.window is not None for s in layers]  # HF: RoPE comes with the window
    out = _common_to_hf(m, tokens)
    out.pop("head_dim")  # Cohere2Config derives it: hidden_size // num_attention_heads
    return {**out, "architectures": ["Cohere2ForCausalLM"], "model_type": "cohere2",
            "layer_norm_eps": m["norm_eps"], "logit_scale": m["logit_scale"],
            "sliding_window": _first(layers, lambda s: s.window, None),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "rope_parameters": {"rope_type": "default", "rope_theta": _first(
                layers, lambda s: s.rope_theta if s.rope else None, 10_000.0)}}


def cohere2_from_hf(c: Mapping[str, Any]) -> dict[str, Any]:
    g = _common_from_hf(c, "Cohere2")
    g.update(head_dim=c["hidden_size"] // c["num_attention_heads"], norm="layernorm",
             block="parallel", norm_eps=c.get("layer_norm_eps", 1e-5),
             logit_scale=float(c.get("logit_scale", 0.0625)))
    theta, window = _theta(c, 10_000.0), c.get("sliding_window")
    layers = []
    for kind in _layer_types(c, lambda i: (i + 1) % c.get("sliding_window_pattern", 4) != 0,
                             "sliding_attention"):
        sliding = kind == "sliding_attention"
        if sliding and window is None:
            raise ConfigError("Cohere2 config has sliding_attention layers but no sliding_window")
        layers.append({"rope": sliding, "rope_theta": theta, "rope_style": "interleaved",
                       "window": window if sliding else None})
    return build_model(g, layers)


def _layer_types(c: Mapping[str, Any], default_local: Callable[[int], bool],
                 local: str) -> list[str]:
    kinds = c.get("layer_types") or [local if default_local(i) else "full_attention"
                                     for i in range(c["num_hidden_layers"])]
    if len(kinds) != c["num_hidden_layers"]:
        raise ConfigError(f"config layer_types has {len(kinds)} entries for "
                          f"{c['num_hidden_layers']} layers")
    unknown = sorted(set(kinds) - {local, "full_attention"})
    if unknown:
        raise ConfigError(f"config layer_types has {unknown}; this architecture knows "
                          f"{local!r} and 'full_attention'")
    return kinds


def _rope_flags(c: Mapping[str, Any]) -> list[bool]:
    """SmolLM3 / Llama 4: no_rope_layers[i] == 1 means layer i *uses* RoPE."""
    interval = c.get("no_rope_layer_interval", 4)
    flags = c.get("no_rope_layers") or [int((i + 1) % interval != 0)
                                        for i in range(c["num_hidden_layers"])]
    return [bool(f) for f in flags[: c["num_hidden_layers"]]]


# ---- SmolLM3ForCausalLM ------------------------------------------------------------------
def smollm3_to_hf(m: Mapping[str, Any], tokens: Mapping[str, Any]) -> dict[str, Any]:
    layers = _layers(m)
    window = _first(layers, lambda s: s.window, None)
    return {**_common_to_hf(m, tokens), "architectures": ["SmolLM3ForCausalLM"],
            "model_type": "smollm3", "rms_norm_eps": m["norm_eps"], "mlp_bias": False,
            "no_rope_layers": [int(s.rope) for s in layers],
            "use_sliding_window": window is not None, "sliding_window": window,
            "layer_types": ["sliding_attention" if s.window is not None else "full_attention"
                            for s in layers],
            "rope_parameters": {"rope_type": "default", "rope_theta": _first(
                layers, lambda s: s.rope_theta if s.rope else None, 2_000_000.0)}}


def smollm3_from_hf(c: Mapping[str, Any]) -> dict[str, Any]:
    g = _common_from_hf(c, "SmolLM3")
    g["norm_eps"] = c.get("rms_norm_eps", 1e-6)
    use_sliding, window = bool(c.get("use_sliding_window")), c.get("sliding_window")
    rope = _rope_flags(c)
    kinds = _layer_types(c, lambda i: use_sliding and window is not None and not rope[i],
                         "sliding_attention")
    if "sliding_attention" in kinds and not (use_sliding and window):
        raise ConfigError("SmolLM3 config lists sliding_attention layers but "
                          "use_sliding_window/sliding_window are not set: transformers' "
                          "kernels disagree on such a config; set both or neither")
    theta = _theta(c, 2_000_000.0)
    layers = [{"rope": r, "rope_theta": theta, "rope_style": "half",
               "window": window if k == "sliding_attention" else None}
              for r, k in zip(rope, kinds, strict=True)]
    return build_model(g, layers)


# ---- Llama4ForCausalLM (text, dense MLPs) ------------------------------------------------
def llama4_to_hf(m: Mapping[str, Any], tokens: Mapping[str, Any]) -> dict[str, Any]:
    layers = _layers(m)
    nope = [s for s in layers if not s.rope]
    chunk = _first(layers, lambda s: s.chunk, None)
    floor = _first(nope, lambda s: s.temperature_floor, None)
    return {**_common_to_hf(m, tokens), "architectures": ["Llama4ForCausalLM"],
            "model_type": "llama4_text", "rms_norm_eps": m["norm_eps"],
            "intermediate_size_mlp": m["mlp_dim"], "moe_layers": [],
            "num_local_experts": 1, "num_experts_per_tok": 1,
            "no_rope_layers": [int(s.rope) for s in layers],
            "use_qk_norm": any(s.qk_norm != "none" for s in layers if s.rope),
            "attention_chunk_size": chunk,
            "layer_types": ["chunked_attention" if s.chunk is not None else "full_attention"
                            for s in layers],
            "attn_temperature_tuning": floor is not None,
            "floor_scale": floor if floor is not None else 8192,
            "attn_scale": _first(nope, lambda s: s.temperature_scale
                                 if s.temperature_floor is not None else None, 0.1),
            "rope_parameters": {"rope_type": "default", "rope_theta": _first(
                layers, lambda s: s.rope_theta if s.rope else None, 500_000.0)}}


def llama4_from_hf(c: Mapping[str, Any]) -> dict[str, Any]:
    if c.get("moe_layers") is None or len(c["moe_layers"]) > 0:
        raise ConfigError("Llama 4 config has mixture-of-experts layers (moe_layers = "
                          f"{c.get('moe_layers')!r}); hybridlm imports dense Llama 4 text "
                          "models only (moe_layers = [])")
    g = _common_from_hf(c, "Llama4")
    g.update(norm_eps=c.get("rms_norm_eps", 1e-5), mlp_dim=c["intermediate_size_mlp"])
    chunk, rope = c.get("attention_chunk_size"), _rope_flags(c)
    kinds = _layer_types(c, lambda i: rope[i] and chunk is not None, "chunked_attention")
    if "chunked_attention" in kinds and chunk is None:
        raise ConfigError("Llama 4 config has chunked_attention layers but no "
                          "attention_chunk_size")
    theta, qk_norm = _theta(c, 500_000.0), bool(c.get("use_qk_norm", True))
    tuning = bool(c.get("attn_temperature_tuning", True))
    layers = [{"rope": r, "rope_theta": theta, "rope_style": "interleaved",
               "chunk": chunk if k == "chunked_attention" else None,
               "qk_norm": "post_rope" if r and qk_norm else "none", "qk_norm_scale": False,
               "temperature_floor": c.get("floor_scale", 8192) if tuning and not r else None,
               "temperature_scale": float(c.get("attn_scale", 0.1))}
              for r, k in zip(rope, kinds, strict=True)]
    return build_model(g, layers)


ARCHS: dict[str, tuple[str, Callable, Callable]] = {
    # name: (HF class, to_hf, from_hf)
    "cohere2": ("Cohere2ForCausalLM", cohere2_to_hf, cohere2_from_hf),
    "smollm3": ("SmolLM3ForCausalLM", smollm3_to_hf, smollm3_from_hf),
    "llama4": ("Llama4ForCausalLM", llama4_to_hf, llama4_from_hf),
}
MODEL_TYPES = {"cohere2": "cohere2", "smollm3": "smollm3", "llama4_text": "llama4"}


def arch_differences(model: Mapping[str, Any], arch: str) -> list[str]:
    """What an export of `model` as `arch` would compute differently (empty: exact)."""
    cls, to_hf, from_hf = ARCHS[arch]
    try:
        return differences(model, from_hf(to_hf(model, {})), cls)
    except ConfigError as e:  # the closest config is not even a valid one
        return [str(e)]


def to_hf_config(model: Mapping[str, Any], arch: str = "auto",
                 tokens: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(arch, config.json dict) of the architecture that computes `model` exactly.

    arch "auto" takes the first exact one; none exact (or the named one not exact) raises
    ConfigError listing, per architecture, the fields that differ.
    """
    if arch != "auto" and arch not in ARCHS:
        raise ConfigError(f"unknown HF architecture {arch!r}; choose auto or one of "
                          f"{sorted(ARCHS)}")
    candidates = list(ARCHS) if arch == "auto" else [arch]
    report = {}
    for name in candidates:
        if model["activation"] not in HF_ACTIVATIONS:
            report[name] = [f"model.activation {model['activation']!r} has no HF name"]
            continue
        report[name] = arch_differences(model, name)
        if not report[name]:
            return name, ARCHS[name][1](model, tokens or {})
    lines = "; ".join(f"{ARCHS[n][0]}: " + "; ".join(d) for n, d in sorted(
        report.items(), key=lambda item: len(item[1])))
    raise ConfigError("no Hugging Face architecture computes this model exactly, so it is not "
                      f"exported (an export must not compute something else). Differences: "
                      f"{lines}")


def from_hf_config(c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(arch, hybridlm model fields) of a config.json transformers would build."""
    model_type = c.get("model_type")
    if model_type == "llama4" and "text_config" in c:
        raise ConfigError("this is a multimodal Llama 4 checkpoint (model_type 'llama4'); "
                          "hybridlm imports Llama4ForCausalLM text checkpoints only")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"config.json has model_type {model_type!r}; hybridlm imports "
                          f"{sorted(MODEL_TYPES)}")
    arch = MODEL_TYPES[model_type]
    return arch, ARCHS[arch][2](c)
