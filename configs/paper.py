"""Every attention variant the paper compares, at any size.

    hybridlm train --config configs/paper.py:variant=rnope_swa,size=tiny,seq_len=1024

variant:
  rope         RoPE on every layer, full causal attention (the baseline)
  nope         no positional encoding anywhere
  qknorm       RoPE with q and k RMS-normalised before RoPE (the paper's QK-Norm)
  rope_qknorm  RoPE with q and k RMS-normalised after RoPE (the other placement)
  rnope        3 RoPE layers (theta=`theta`) then 1 NoPE layer, all full attention
  rnope_swa    3 RoPE layers with a sliding window of `window` keys, then 1 NoPE full layer
size: tiny | small | 150m | 1b | 8b (hybridlm/config.py MODEL_SIZES)
"""

from hybridlm.config import ConfigError, defaults, parse_arg, set_size

VARIANTS = ("rope", "nope", "qknorm", "rope_qknorm", "rnope", "rnope_swa")


def layer_stack(variant: str, theta: float, window: int) -> tuple[dict, str]:
    """(layer_types, pattern) for a paper variant."""
    rope = {"rope": True, "rope_theta": theta}
    if variant == "rope":
        return {"global": rope}, "global"
    if variant == "nope":
        return {"global": {"rope": False}}, "global"
    if variant == "qknorm":
        return {"global": {**rope, "qk_norm": "pre_rope"}}, "global"
    if variant == "rope_qknorm":
        return {"global": {**rope, "qk_norm": "post_rope"}}, "global"
    if variant == "rnope":
        return {"rope": rope, "nope": {"rope": False}}, "rope,rope,rope,nope"
    if variant == "rnope_swa":
        return ({"local": {**rope, "window": window}, "global": {"rope": False}},
                "local,local,local,global")
    raise ConfigError(f"unknown paper variant {variant!r}; choose one of {VARIANTS}")


def get_config(arg=None):
    arg = parse_arg(arg, variant="rnope_swa", size="tiny", seq_len=1024, theta=10_000.0,
                    window=4096)
    c = defaults()
    set_size(c.model, arg.size)
    c.model.layer_types, c.model.pattern = layer_stack(arg.variant, arg.theta, arg.window)
    c.data.seq_len = arg.seq_len
    return c
