"""Fit before you pay: compile the real train step for a TPU slice on a CPU machine.

libtpu (`pip install 'hybridlm[tpu]'`) describes a slice's chips without owning any
(`jax.experimental.topologies`); the train step is lowered from ShapeDtypeStructs with the
same mesh, sharding rules, optimizer and attention kernel (splash) as `hybridlm train`, and
compiled by the TPU compiler. Its memory analysis gives the bytes each device needs, its
cost analysis the FLOPs, without allocating anything.

XLA cannot see inside Mosaic kernels, so its FLOP count leaves out the attention scores
and values that splash computes; the step time is estimated from the analytic count
(`hybridlm.model.flops`) instead, which includes them and honours windows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

import jax
import ml_collections as mlc

from hybridlm import config as config_lib
from hybridlm.errors import ConfigError
from hybridlm.model import abstract_model, flops_per_token
from hybridlm.model.flops import layers, param_count
from hybridlm.model.pattern import layer_layout
from hybridlm.ops import resolve_impl, splash
from hybridlm.parallel.mesh import check_batch, make_mesh
from hybridlm.train.optim import decay_mask, make_optimizer
from hybridlm.train.state import make_layout
from hybridlm.train.trainer import compile_train_step

GIB = 2**30
# Chip kind -> (HBM GiB per chip, dense bf16 peak FLOP/s per chip), from the data sheets.
CHIPS = {"v4": (32, 275e12), "v5e": (16, 197e12), "v5p": (95, 459e12), "v6e": (32, 918e12)}
DIMS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}  # 3D torus or 2D mesh of chips
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
# The TPU compiler stops with this when a step's temporaries cannot fit the chip's HBM.
OUT_OF_HBM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                        r"\(([\d.]+)([KMGT]?)\)")
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
INSTALL_HINT = "pip install 'hybridlm[tpu]'"


class TPUSupportMissing(RuntimeError):
    """libtpu is not installed, so TPU programs cannot be compiled here."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5p:4x4x8"
    kind: str  # chip kind, a key of CHIPS
    chips: int

    @property
    def hbm_bytes_per_chip(self) -> int:
        return CHIPS[self.kind][0] * GIB

    @property
    def peak_flops_per_chip(self) -> float:
        return CHIPS[self.kind][1]


def parse_topology(name: str) -> Topology:
    """'v5p:4x4x8' -> Topology; ConfigError naming the accepted forms otherwise."""
    match = TOPOLOGY.match(name.strip())
    if not match or len(match.group(2).split("x")) != DIMS[match.group(1)]:
        raise ConfigError(f"--topology {name!r} is not KIND:AxB[xC] with KIND one of "
                          f"{sorted(CHIPS)}: AxBxC for v4 and v5p, AxB for v5e and v6e "
                          "(e.g. v5p:4x4x8, v5e:4x4)")
    kind, dims = match.groups()
    return Topology(name.strip(), kind, math.prod(int(d) for d in dims.split("x")))


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: Topology) -> list[jax.Device]:
    """Compile-only devices of the slice (no TPU needed; libtpu is)."""
    if not libtpu_installed():
        raise TPUSupportMissing(
            "compiling for TPU needs libtpu, which is not installed in this environment; "
            f"install it with: {INSTALL_HINT} (jax[tpu] at this jax version, {jax.__version__})")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host probe
    # Compiling touches no chip: let several processes (a test, a sweep) load libtpu at once
    # instead of failing on its lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology.name)
    except jax.errors.JaxRuntimeError as e:
        if "INVALID_ARGUMENT" not in str(e):
            raise
        raise ConfigError(f"--topology {topology.name!r}: libtpu rejected it: {e}") from e
    return list(topo.devices)


def _shard_bytes(abstract: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(abstract))


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-device numbers of one compiled train step (bytes per device, FLOPs per step)."""

    topology: str
    devices: int
    chips: int
    mesh: dict[str, int]
    params: int  # parameter count
    tokens_per_step: int
    param_bytes: int  # this device's share of the parameters
    opt_bytes: int  # ... of the optimizer state
    batch_bytes: int  # ... of the input batch
    argument_bytes: int  # XLA: all inputs of the step (state + batch)
    temp_bytes: int  # XLA: activations and other scratch live during the step
    output_bytes: int  # XLA: outputs not aliased to the donated inputs
    hbm_bytes: int  # HBM per device
    xla_flops_per_device: float  # XLA cost analysis (Mosaic kernel bodies not counted)
    kernel_flops_per_step: float  # splash's visited blocks x 12 H D per (query, key) pair
    analytic_flops_per_step: float  # 6N + attention, all devices
    mfu: float
    remat: str
    seq_len: int
    attention_impl: str
    mosaic_kernels: int  # Mosaic (Pallas TPU) calls in the compiled program: splash, for real
    loop_trips: int  # layer groups run by one scanned loop, whose body XLA counts only once
    # False when the TPU compiler stopped because the step cannot fit: temp_bytes is then
    # the compiler's own figure from that message, and XLA's FLOPs are unknown (0).
    compiled: bool = True

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    @property
    def compiled_flops_per_step(self) -> float:
        """What the compiled program computes: XLA's count plus the kernel's block map."""
        return self.xla_flops_per_device * self.devices + self.kernel_flops_per_step

    def step_time_s(self, peak_flops_per_chip: float) -> float:
        return self.analytic_flops_per_step / (self.chips * peak_flops_per_chip * self.mfu)

    def verdict(self) -> str:
        """Fits or not, by how much, and which knob to turn first."""
        margin = (self.hbm_bytes - self.peak_bytes) / GIB
        if self.fits:
            return (f"fits: {self.peak_bytes / GIB:.1f} of {self.hbm_bytes / GIB:.1f} GiB per "
                    f"device ({margin:.1f} GiB free)")
        state = self.param_bytes + self.opt_bytes
        hints = []
        if state > self.hbm_bytes / 2 and self.mesh["fsdp"] < self.devices:
            fully = state * self.mesh["fsdp"] * self.mesh["tensor"] / self.devices
            hints.append(f"more FSDP (mesh.fsdp=-1 with mesh.data=1 splits the "
                         f"{state / GIB:.1f} GiB of parameters and optimizer state down to "
                         f"about {fully / GIB:.1f} GiB)")
        if self.remat == "none":
            hints.append("rematerialisation (model.remat=full keeps only each layer's input "
                         "for the backward pass)")
        if self.mesh["context"] == 1 and self.seq_len >= 16384:
            hints.append("context parallelism (mesh.context>1 splits the sequence)")
        hints.append("a smaller train.batch_size per device, or train.grad_accum_steps")
        return (f"does NOT fit: {self.peak_bytes / GIB:.1f} GiB per device needed, "
                f"{self.hbm_bytes / GIB:.1f} available ({-margin:.1f} GiB over); try "
                + "; or ".join(hints))

    def as_dict(self, peak_flops_per_chip: float) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(peak_bytes=self.peak_bytes, fits=self.fits,
                   compiled_flops_per_step=self.compiled_flops_per_step,
                   step_time_s=self.step_time_s(peak_flops_per_chip), verdict=self.verdict())
        return out


def compile_for(cfg: mlc.ConfigDict, topology: Topology, *, mfu: float = 0.4,
                devices: list[jax.Device] | None = None) -> Report:
    """Compile cfg's train step for `topology` and report; nothing is allocated.

    `attention_impl=auto` resolves as on a TPU (splash), also when `devices` (default: the
    topology's) are CPUs, which compiles the same program with splash in interpret mode.
    """
    jax.config.update("jax_threefry_partitionable", True)  # as in training
    devices = tpu_devices(topology) if devices is None else devices
    cfg = mlc.ConfigDict(cfg.to_dict())  # a copy: the kernel choice below is ours
    cfg.model.attention_impl = resolve_impl(cfg.model.attention_impl, backend="tpu")
    t, seq_len = cfg.train, cfg.data.seq_len
    mesh = make_mesh(cfg.mesh, devices)
    check_batch(mesh, t.batch_size, seq_len, "train.batch_size")
    model_cfg = config_lib.model_dict(cfg)
    graphdef, params_meta = abstract_model(model_cfg, t.seed)
    tx = make_optimizer(t, mask=decay_mask(params_meta))
    layout = make_layout(graphdef, params_meta, tx, mesh)
    tokens = t.batch_size * seq_len
    batch_bytes = tokens * 4 * 5 // math.prod(
        mesh.shape[a] for a in ("data", "fsdp", "context"))  # five int32/float32 [B, T] inputs
    param_bytes = _shard_bytes(layout.abstract["params"])
    opt_bytes = _shard_bytes(layout.abstract["opt_state"])
    common = dict(
        topology=topology.name, devices=len(devices), chips=topology.chips,
        mesh=dict(mesh.shape), params=param_count(model_cfg), tokens_per_step=tokens,
        param_bytes=param_bytes, opt_bytes=opt_bytes, batch_bytes=batch_bytes,
        hbm_bytes=topology.hbm_bytes_per_chip * topology.chips // len(devices),
        kernel_flops_per_step=splash_flops(cfg) if cfg.model.attention_impl == "splash" else 0.0,
        analytic_flops_per_step=flops_per_token(model_cfg, seq_len) * tokens,
        mfu=mfu, remat=cfg.model.remat, seq_len=seq_len,
        attention_impl=cfg.model.attention_impl, loop_trips=_loop_trips(model_cfg))
    try:
        compiled = compile_train_step(cfg, mesh, layout, tx)
    except jax.errors.JaxRuntimeError as e:
        temp = out_of_hbm_bytes(str(e))
        if temp is None:
            raise
        return Report(**common, argument_bytes=param_bytes + opt_bytes + batch_bytes,
                      temp_bytes=temp, output_bytes=0, xla_flops_per_device=0.0,
                      mosaic_kernels=0, compiled=False)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Report(
        **common, argument_bytes=memory.argument_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        output_bytes=memory.output_size_in_bytes - memory.alias_size_in_bytes,
        xla_flops_per_device=float(cost.get("flops", 0.0)),
        mosaic_kernels=compiled.as_text().count('custom_call_target="tpu_custom_call"'))


def out_of_hbm_bytes(message: str) -> int | None:
    """The temporaries' bytes from the TPU compiler's out-of-HBM error, or None."""
    match = OUT_OF_HBM.search(message)
    if match is None:
        return None
    return int(float(match.group(1)) * UNITS[match.group(2)])


def _loop_trips(model_cfg: dict[str, Any]) -> int:
    """Groups in the scanned layer loop (1 when model.scan_layers=False unrolls it)."""
    return layer_layout(model_cfg).num_groups if model_cfg["scan_layers"] else 1


def splash_flops(cfg: mlc.ConfigDict) -> float:
    """Training FLOPs inside splash per step, from the blocks its mask visits, at the
    analytic count's rate (12 H D per query-key pair: 2 matmuls forward, 4 backward)."""
    m, seq_len = cfg.model, cfg.data.seq_len
    total = 0.0
    for spec in layers(config_lib.model_dict(cfg)):
        blocks, bq, bk = splash.visited_blocks(spec.mask, seq_len, m.attention_block_q,
                                               m.attention_block_kv)
        total += blocks * bq * bk * 12.0 * m.num_heads * m.head_dim
    return total * cfg.train.batch_size


def format_report(report: Report, topology: Topology) -> str:
    """The human-readable summary `hybridlm compile` prints."""
    g = lambda b: f"{b / GIB:8.2f} GiB"
    step = report.step_time_s(topology.peak_flops_per_chip)
    flops = (f"FLOPs per step: {report.analytic_flops_per_step:.3e} analytic (6N + attention); "
             + (f"compiled {report.compiled_flops_per_step:.3e} = XLA's count "
                f"{report.xla_flops_per_device * report.devices:.3e} (outside the attention "
                f"kernel) + {report.kernel_flops_per_step:.3e} in the kernel (its visited "
                "blocks)" if report.compiled else
                f"{report.kernel_flops_per_step:.3e} in the kernel's block map (XLA's own "
                "count needs a program that compiles)")
             + (f"; XLA counts the scanned loop's body once, not {report.loop_trips} times "
                "(model.scan_layers=False for the full count, slower to compile)"
                if report.compiled and report.loop_trips > 1 else ""))
    lines = [
        f"{report.topology}: {report.devices} devices on {report.chips} chips, mesh "
        + " ".join(f"{a}={s}" for a, s in report.mesh.items())
        + f", attention {report.attention_impl} ({report.mosaic_kernels} Mosaic kernel calls), "
        f"remat {report.remat}",
        f"model: {report.params:,} parameters; {report.tokens_per_step:,} tokens per step "
        f"(seq_len {report.seq_len})",
        "per device:",
        f"  parameters      {g(report.param_bytes)}",
        f"  optimizer state {g(report.opt_bytes)}",
        f"  batch           {g(report.batch_bytes)}",
        f"  activations     {g(report.temp_bytes)}   "
        + ("(XLA temp: live during the step)" if report.compiled else
           "(the TPU compiler's figure: it stopped, out of HBM)"),
        f"  outputs         {g(report.output_bytes)}   (not aliased to the donated state)",
        f"  total           {g(report.peak_bytes)}   of {g(report.hbm_bytes)} HBM",
        flops,
        f"step time at {report.mfu:.0%} MFU: {step:.3g} s "
        f"({report.tokens_per_step / step:,.0f} tokens/s)",
        report.verdict(),
    ]
    return "\n".join(lines)
