"""No TPU probe on a machine without a TPU (the `hybridlm` entry point, before jax loads).

With libtpu installed (the `tpu` extra, which `hybridlm compile` needs), JAX 0.10 registers
a TPU backend whenever `libtpu` is importable, and initialises every registered backend the
first time a program touches a device. On a machine without a TPU, libtpu then loads and
prints "could not determine TPU accelerator type" and "INVALID_ARGUMENT: unexpected worker
hostname" before JAX falls back to the next backend: noise a user cannot tell from a real
failure. (jax/_src/cloud_tpu_init.py skips only its own environment set-up when it finds no
TPU PCI device; the backend factory in jax/_src/xla_bridge.py still runs.)

So when JAX_PLATFORMS is unset, libtpu is installed and nothing says a TPU is here (no
Google PCI device, no /dev/accel* or /dev/vfio, no TPU_* variable, no JAX_FORCE_TPU_INIT),
`skip_absent_tpu` sets JAX_PLATFORMS to the platforms that can exist: "cuda" where a CUDA
plugin is installed (JAX itself skips it when no NVIDIA device is visible), "rocm" where a
ROCm plugin and /dev/kfd are, and "cpu". An unknown PJRT plugin, or JAX_PLATFORMS set by
the user, leaves everything as it is. Nothing here imports jax.
"""

from __future__ import annotations

import glob
import os
import pkgutil
from collections.abc import Iterable, Mapping
from importlib import metadata, util
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are Google PCI devices (jax/_src/hardware_utils.py)
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio")
NOT_A_TPU_SIGN = ("TPU_LIBRARY_PATH", "TPU_SKIP_MDS_QUERY")  # set without any TPU too


def tpu_may_be_here(environ: Mapping[str, str]) -> bool:
    """Whether anything on this machine or in the environment points to a TPU."""
    if "JAX_FORCE_TPU_INIT" in environ or any(
            k.startswith("TPU_") and k not in NOT_A_TPU_SIGN for k in environ):
        return True
    if any(glob.glob(pattern) for pattern in TPU_DEVICE_FILES):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def pjrt_plugins() -> list[str]:
    """The module names of the installed JAX PJRT plugins (as JAX discovers them)."""
    names = []
    spec = util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    names += [e.value for e in metadata.entry_points(group="jax_plugins")]
    return names


def platforms_without_tpu(plugins: Iterable[str], has_kfd: bool) -> str | None:
    """JAX_PLATFORMS for this machine without its TPU backend; None if a plugin is unknown."""
    platforms = []
    for plugin in plugins:
        if "cuda" in plugin:
            platforms.append("cuda")
        elif "rocm" in plugin:
            if has_kfd:
                platforms.append("rocm")
        else:
            return None
    return ",".join(dict.fromkeys([*platforms, "cpu"]))


def skip_absent_tpu(environ: dict[str, str] | None = None) -> str | None:
    """Set JAX_PLATFORMS when libtpu is installed but no TPU is here; returns what it set."""
    env = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in env or util.find_spec("libtpu") is None or tpu_may_be_here(env):
        return None
    platforms = platforms_without_tpu(pjrt_plugins(), os.path.exists("/dev/kfd"))
    if platforms is not None:
        env["JAX_PLATFORMS"] = platforms
    return platforms
