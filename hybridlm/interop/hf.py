"""hybridlm parameters <-> a Hugging Face checkpoint directory (config.json + safetensors).

    arch = save_hf(cfg, model, out)        # config.json, model.safetensors, tokenizer files
    cfg, model = load_hf(directory)         # any transformers-saved Cohere2 / SmolLM3 /
                                            # Llama 4 text (dense) checkpoint, offline

Weights are rearranged, never changed: hybridlm keeps `wq [d, H, D]`, `wkv [d, 2, Hkv, D]`,
`wo [H, D, d]` and a fused gate/up `wi [d, 2, F]`, stacked over pattern groups; a torch
Linear stores `[out, in]`. Both RoPE layouts already match the HF code of each architecture
(interleaved pairs for Cohere2 and Llama 4, halves for SmolLM3), so no head permutation is
needed. Writing needs numpy and safetensors only; reading a directory uses transformers'
own config class (its defaults and backwards-compatible fields), so it needs the `[hf]` extra.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from hybridlm import config as config_lib
from hybridlm.errors import ConfigError
from hybridlm.interop import hf_config, tokenizer_files
from hybridlm.model.pattern import layer_layout

MISSING_HF = ("needs the Hugging Face extra: pip install 'hybridlm[hf]' (torch CPU, "
              "transformers, safetensors)")


# ---- per-layer view of the stacked parameters --------------------------------------------
def unstack_layers(m: Mapping[str, Any], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One nested dict of numpy arrays per layer, in depth order."""
    layout, layers = layer_layout(m), []
    for i in range(layout.num_layers):
        group, entry = layout.locate(i)
        if group is None:
            layers.append(jax.tree.map(np.asarray, params["tail"]["blocks"][entry]))
        else:
            block = params["groups"]["blocks"][entry]
            layers.append(jax.tree.map(lambda x, g=group: np.asarray(x[g]), block))
    return layers


def stack_layers(m: Mapping[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Inverse of unstack_layers: {'groups': ..., 'tail': ...} (absent parts omitted)."""
    layout = layer_layout(m)
    out: dict[str, Any] = {}
    if layout.num_groups:
        out["groups"] = {"blocks": {j: jax.tree.map(lambda *xs: np.stack(xs), *(
            layers[layout.index(g, j)] for g in range(layout.num_groups)))
            for j in range(layout.per_group)}}
    if layout.tail:
        out["tail"] = {"blocks": {j: layers[layout.index(None, j)]
                                  for j in range(len(layout.tail))}}
    return out


# ---- hybridlm layer <-> HF tensors --------------------------------------------------------
def _linear(w: np.ndarray, n_in: int) -> np.ndarray:
    """hybridlm [*in, *out] -> torch Linear [out, in]."""
    return np.ascontiguousarray(w.reshape(n_in, -1).T)


def _unlinear(w: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    return np.ascontiguousarray(w.T).reshape(*in_shape, *out_shape)


def _mlp_name(arch: str) -> str:
    return "feed_forward" if arch == "llama4" else "mlp"


def to_state_dict(m: Mapping[str, Any], params: Mapping[str, Any], arch: str
                  ) -> dict[str, np.ndarray]:
    """HF state dict (float32 numpy) of hybridlm params (a pure dict of the model's Params)."""
    d, f = m["d_model"], m["mlp_dim"]
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
    if not m["tie_embeddings"]:
        out["lm_head.weight"] = _linear(np.asarray(params["head"]), d)
    mlp = _mlp_name(arch)
    for i, layer in enumerate(unstack_layers(m, params)):
        extra = set(layer["attn"]) - {"wq", "wkv", "wo"}
        if extra:  # a q/k norm scale or sinks: the architecture check refuses these earlier
            raise ConfigError(f"layer {i} has parameters {sorted(extra)} that {arch} lacks")
        p, a = f"model.layers.{i}.", layer["attn"]
        out[p + "self_attn.q_proj.weight"] = _linear(a["wq"], d)
        out[p + "self_attn.k_proj.weight"] = _linear(a["wkv"][:, 0], d)
        out[p + "self_attn.v_proj.weight"] = _linear(a["wkv"][:, 1], d)
        out[p + "self_attn.o_proj.weight"] = _linear(a["wo"], a["wo"].shape[0] * a["wo"].shape[1])
        out[p + f"{mlp}.gate_proj.weight"] = _linear(layer["mlp"]["wi"][:, 0], d)
        out[p + f"{mlp}.up_proj.weight"] = _linear(layer["mlp"]["wi"][:, 1], d)
        out[p + f"{mlp}.down_proj.weight"] = _linear(layer["mlp"]["wo"], f)
        out[p + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
        if "mlp_norm" in layer:
            out[p + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def from_state_dict(m: Mapping[str, Any], tensors: Mapping[str, np.ndarray], arch: str
                    ) -> dict[str, Any]:
    """hybridlm params (pure dict of float32 numpy) from an HF state dict; checks every key."""
    d, f, h, hkv, hd = (m["d_model"], m["mlp_dim"], m["num_heads"], m["num_kv_heads"],
                        m["head_dim"])
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise ConfigError(f"the checkpoint lacks tensor {key!r}")
        used.add(key)
        w = np.asarray(tensors[key], dtype=np.float32)
        if w.shape != shape:
            raise ConfigError(f"tensor {key!r} has shape {w.shape}; config.json implies {shape}")
        return w

    mlp, layers = _mlp_name(arch), []
    for i in range(m["num_layers"]):
        p = f"model.layers.{i}."
        k = take(p + "self_attn.k_proj.weight", (hkv * hd, d))
        v = take(p + "self_attn.v_proj.weight", (hkv * hd, d))
        layer = {
            "attn": {"wq": _unlinear(take(p + "self_attn.q_proj.weight", (h * hd, d)), (d,),
                                     (h, hd)),
                     "wkv": np.stack([_unlinear(k, (d,), (hkv, hd)),
                                      _unlinear(v, (d,), (hkv, hd))], axis=1),
                     "wo": _unlinear(take(p + "self_attn.o_proj.weight", (d, h * hd)),
                                     (h, hd), (d,))},
            "attn_norm": {"scale": take(p + "input_layernorm.weight", (d,))},
            "mlp": {"wi": np.stack([take(p + f"{mlp}.gate_proj.weight", (f, d)).T,
                                    take(p + f"{mlp}.up_proj.weight", (f, d)).T], axis=1),
                    "wo": take(p + f"{mlp}.down_proj.weight", (d, f)).T.copy()}}
        if m["block"] == "sequential":
            layer["mlp_norm"] = {"scale": take(p + "post_attention_layernorm.weight", (d,))}
        layers.append(layer)
    out = {"embed": take("model.embed_tokens.weight", (m["vocab_size"], d)),
           "final_norm": {"scale": take("model.norm.weight", (d,))}, **stack_layers(m, layers)}
    if not m["tie_embeddings"]:
        out["head"] = take("lm_head.weight", (m["vocab_size"], d)).T.copy()
    unused = sorted(set(tensors) - used - {"lm_head.weight"})
    if unused:
        raise ConfigError(f"the checkpoint has tensors hybridlm would drop: {unused[:5]}"
                          f"{' ...' if len(unused) > 5 else ''}")
    return out


# ---- directories --------------------------------------------------------------------------
def model_params(model: nnx.Module) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_hf(cfg: mlc.ConfigDict, model: nnx.Module, out: Path, arch: str = "auto",
            tokenizer: bool = True) -> str:
    """Write config.json + model.safetensors (+ tokenizer files) into `out`; returns arch.

    Raises ConfigError before writing anything when no architecture computes the model
    exactly. The tokenizer is written when data.tokenizer is expressible as tokenizer.json.
    """
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ConfigError(f"export --format hf {MISSING_HF}") from None
    m = config_lib.model_dict(cfg)
    tok = tokenizer_files.resolve(cfg) if tokenizer else None
    arch, hf = hf_config.to_hf_config(m, arch, tokenizer_files.token_ids(tok))
    hf["max_position_embeddings"] = max(int(cfg.data.seq_len), 1)
    tensors = to_state_dict(m, model_params(model), arch)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        tokenizer_files.write(tok, out, max_length=hf["max_position_embeddings"])
    return arch


def read_hf_config(src: Path) -> dict[str, Any]:
    """config.json as transformers completes it (its defaults, derived per-layer fields)."""
    path = Path(src) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--from {src}: no config.json there; give a directory written by "
                          "save_pretrained or `hybridlm export --format hf`")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"--from {src}: config.json is not valid JSON ({e})") from None
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError(f"import {MISSING_HF}") from None
    hf_config.from_hf_config(raw)  # refuses unknown model types before transformers reads it
    return AutoConfig.from_pretrained(str(src), local_files_only=True).to_dict()


def read_tensors(src: Path) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors or its shards, as float32 numpy (bf16 included)."""
    from safetensors import safe_open

    src = Path(src)
    index = src / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) \
        if index.is_file() else ["model.safetensors"]
    out = {}
    for name in files:
        if not (src / name).is_file():
            raise ConfigError(f"--from {src}: {name} is missing")
        with safe_open(str(src / name), framework="flax") as f:
            for key in f.keys():
                out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return out


def load_hf(src: Path) -> tuple[mlc.ConfigDict, nnx.Module]:
    """(full hybridlm config, model with the checkpoint's weights) from an HF directory."""
    from hybridlm.model import abstract_model

    hf = read_hf_config(src)
    arch, fields = hf_config.from_hf_config(hf)
    cfg = config_lib.defaults()
    cfg.model.update(fields)
    cfg.model.layer_types = fields["layer_types"]
    cfg.data.seq_len = min(int(hf.get("max_position_embeddings") or 512), 8192)
    tokenizer_files.configure(cfg, Path(src))
    params = from_state_dict(fields, read_tensors(src), arch)
    graphdef, state = abstract_model(config_lib.model_dict(cfg), cfg.train.seed)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    return cfg, nnx.merge(graphdef, state)


def copy_tokenizer(src: Path, out: Path) -> None:
    for name in tokenizer_files.FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(out) / name)


# ---- the CLI's two directions (checkpoints through hybridlm.train.checkpoint) -----------
def export_hf(workdir: Path, out: Path, step: int | None = None, arch: str = "auto") -> str:
    """`hybridlm export --format hf`: a run's checkpoint (or params export) -> HF directory."""
    from hybridlm.runs import load_model

    _check_empty(out, "--out")
    if not Path(workdir).exists():
        raise ConfigError(f"--workdir {workdir} does not exist")
    cfg, model, step = load_model(Path(workdir), step)
    return save_hf(cfg, model, Path(out), arch)


def import_hf(src: Path, out: Path) -> tuple[str, mlc.ConfigDict]:
    """`hybridlm import`: HF directory -> params-only export that train.init_from reads."""
    from hybridlm.runs import export_params

    _check_empty(out, "--out")
    cfg, model = load_hf(Path(src))
    arch = hf_config.from_hf_config(read_hf_config(Path(src)))[0]
    out = Path(out).absolute()
    if (Path(src) / "tokenizer.json").is_file():  # the run reads the copy next to the params
        cfg.data.tokenizer = str(out / "tokenizer.json")
    export_params(cfg, nnx.state(model, nnx.Param), out)
    copy_tokenizer(Path(src), out)
    (out / "config.py").write_text(CONFIG_PY.format(src=Path(src).absolute()))
    return arch, cfg


CONFIG_PY = '''"""The model imported by `hybridlm import --from {src}`, as a config file.

Continue training it (the parameters come from this directory through train.init_from):
    hybridlm train --config {{this file}} --workdir RUN [--config.data.seq_len=...]
"""

from pathlib import Path

from hybridlm.config import from_json


def get_config(arg=None):
    here = Path(__file__).resolve().parent
    c = from_json((here / "config.json").read_text())
    c.train.init_from = str(here)
    return c
'''


def _check_empty(path: Path, flag: str) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{flag} {path} exists and is not empty; remove it or choose another")
