"""The attention stack as data: a table of named layer types and a pattern of their names.

`expand(layer_types, pattern, num_layers)` turns the config into one `LayerSpec` per
layer. The paper's RNoPE-SWA is

    layer_types = {local: {rope: True, window: 4096}, global: {rope: False}}
    pattern = "local,local,local,global"

and every other variant is another table or another pattern (see configs/).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hybridlm.ops.masks import MaskRule

ROPE_STYLES = ("half", "interleaved")
QK_NORMS = ("none", "pre_rope", "post_rope")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Everything that makes one attention layer differ from another."""

    name: str = "global"
    rope: bool = True  # rotary position embedding on q and k; False = NoPE
    rope_theta: float = 10_000.0  # RoPE base
    rope_style: str = "half"  # "half": rotate halves (Llama); "interleaved": pairs (GPT-J, Cohere)
    window: int | None = None  # sliding window: the W most recent keys, the query included
    chunk: int | None = None  # chunked attention: keys in the query's own C-token chunk only
    qk_norm: str = "none"  # RMS-normalise q and k: "none" | "pre_rope" | "post_rope"
    qk_norm_scale: bool = True  # learnable scale in the q/k norm (Llama-4's has none)
    temperature_floor: int | None = None  # Llama-4: q *= 1 + scale*log(floor((p+1)/floor)+1)
    temperature_scale: float = 0.1  # the `scale` in the line above
    sink: bool = False  # learned per-head sink logit in the softmax (GPT-OSS)

    @property
    def mask(self) -> MaskRule:
        """The layer's mask rule (always causal: a decoder), whole, for every consumer."""
        return MaskRule(causal=True, window=self.window, chunk=self.chunk)

    @property
    def is_local(self) -> bool:
        """True when the layer sees a bounded span (window or chunk)."""
        return self.mask.span is not None


LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerSpec) if f.name != "name")


def layer_defaults() -> dict[str, Any]:
    """Defaults for a layer-type entry: a RoPE layer with full causal attention."""
    spec = LayerSpec()
    return {name: getattr(spec, name) for name in LAYER_FIELDS}


def parse_pattern(pattern: str) -> list[str]:
    """'local, local,local,global' -> ['local', 'local', 'local', 'global']."""
    return [name.strip() for name in pattern.split(",") if name.strip()]


def make_spec(name: str, fields: Mapping[str, Any]) -> LayerSpec:
    values = layer_defaults()
    values.update(fields)
    return LayerSpec(name=name, **values)


def expand(layer_types: Mapping[str, Mapping[str, Any]], pattern: str,
           num_layers: int) -> list[LayerSpec]:
    """One LayerSpec per layer: the pattern repeated to the depth.

    When num_layers is not a multiple of the pattern length, the remaining layers take
    the pattern's first entries (Gemma 3 does this); config validation decides whether
    that is allowed.
    """
    names = parse_pattern(pattern)
    specs = {name: make_spec(name, layer_types[name]) for name in dict.fromkeys(names)}
    return [specs[names[i % len(names)]] for i in range(num_layers)]


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """How the decoder holds its layers: `num_groups` repetitions of the pattern, stacked
    (`group`: one LayerSpec per pattern entry), then a `tail` of the layers left over when
    the depth is not a multiple of the pattern (Gemma 3). Layer i in depth order is entry
    i % len(group) of group i // len(group), or, past the last whole group, of the tail.

    The one owner of that arrangement: the model, its KV cache, the Hugging Face mapping
    and the compile report all read it here.
    """

    group: tuple[LayerSpec, ...]
    num_groups: int
    tail: tuple[LayerSpec, ...]

    @property
    def per_group(self) -> int:
        return len(self.group)

    @property
    def stacked(self) -> int:
        """Layers held in the stacked groups."""
        return self.num_groups * self.per_group

    @property
    def num_layers(self) -> int:
        return self.stacked + len(self.tail)

    def layers(self) -> list[LayerSpec]:
        """Every layer's spec in depth order."""
        return [*self.group * self.num_groups, *self.tail]

    def locate(self, layer: int) -> tuple[int | None, int]:
        """(group, entry) of layer `layer`; group is None for a layer of the tail."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} of a {self.num_layers}-layer model")
        group, entry = divmod(layer, self.per_group)
        return (group, entry) if group < self.num_groups else (None, layer - self.stacked)

    def index(self, group: int | None, entry: int) -> int:
        """Inverse of `locate`: the depth of entry `entry` of `group` (None: the tail)."""
        return self.stacked + entry if group is None else group * self.per_group + entry


def layer_layout(model_cfg: Mapping[str, Any]) -> LayerLayout:
    """The layout of a model config (its layer_types, pattern and num_layers)."""
    types, pattern, depth = (model_cfg[k] for k in ("layer_types", "pattern", "num_layers"))
    per_group = len(parse_pattern(pattern))
    num_groups = depth // per_group
    return LayerLayout(tuple(expand(types, pattern, per_group)), num_groups,
                       tuple(expand(types, pattern, depth)[num_groups * per_group:]))
