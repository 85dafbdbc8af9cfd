"""`hybridlm compile`: the train step compiled for a TPU slice on this CPU (libtpu, no TPU).

The slow case compiles a small config for v5p:2x2x1 with the real splash kernel and holds
XLA's TPU numbers against oracles: the analytic parameter and FLOP counts, and the CPU
compile of the same program. CI installs libtpu and sets HYBRIDLM_REQUIRE_LIBTPU=1, so
there a missing libtpu fails instead of skipping.
"""

import os

import jax
import pytest

from hybridlm import cli
from hybridlm import config as config_lib
from hybridlm.config import ConfigError
from hybridlm.model.flops import attention_flops_per_token, matmul_param_count, param_count
from hybridlm.train import aot

GIB = 2**30


@pytest.mark.parametrize("name", ["v5p", "v5p:2x2", "v7:2x2x1", "v5p:2x2x1x2", "v5p:axb"])
def test_bad_topology_names_the_accepted_form(name):
    with pytest.raises(ConfigError, match="KIND:AxB"):
        aot.parse_topology(name)


def test_topology_chips_and_hbm():
    topo = aot.parse_topology("v5p:4x4x8")
    assert (topo.kind, topo.chips, topo.hbm_bytes_per_chip) == ("v5p", 128, 95 * GIB)
    assert aot.parse_topology("v5e:4x4").chips == 16


def test_missing_libtpu_tells_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
    assert cli.main(["compile", "--topology", "v5p:2x2x1"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'hybridlm[tpu]'" in err and "Traceback" not in err


def report(**fields):
    base = dict(topology="v5p:4x4x4", devices=64, chips=64,
                mesh={"data": 64, "fsdp": 1, "context": 1, "tensor": 1}, params=8 * 10**9,
                tokens_per_step=64 * 131072, param_bytes=32 * GIB, opt_bytes=64 * GIB,
                batch_bytes=0, argument_bytes=96 * GIB, temp_bytes=40 * GIB, output_bytes=0,
                hbm_bytes=95 * GIB, xla_flops_per_device=1.0, kernel_flops_per_step=0.0,
                analytic_flops_per_step=1e18,
                mfu=0.5, remat="none", seq_len=131072, attention_impl="splash",
                mosaic_kernels=6, loop_trips=8)
    return aot.Report(**{**base, **fields})


def test_verdict_names_the_knobs_that_would_help():
    over = report()
    assert not over.fits
    verdict = over.verdict()
    assert "41.0 GiB over" in verdict
    assert "mesh.fsdp" in verdict and "1.5 GiB" in verdict  # 96 GiB of state over 64 devices
    assert "model.remat=full" in verdict and "mesh.context" in verdict
    small = report(param_bytes=GIB, opt_bytes=2 * GIB, argument_bytes=3 * GIB, temp_bytes=GIB,
                   remat="full", seq_len=4096)
    assert small.fits and small.verdict().startswith("fits: 4.0 of 95.0 GiB")
    assert small.step_time_s(459e12) == pytest.approx(1e18 / (64 * 459e12 * 0.5))


def test_out_of_hbm_at_compile_is_a_verdict_not_an_error():
    # the TPU compiler's message for the 8B rope step at 128k on v5p:4x4x4 (bench/scaling.py)
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
               "temporaries (224.07G) exceeds available HBM (95.74G).")
    assert aot.out_of_hbm_bytes(message) == int(224.07 * GIB)
    assert aot.out_of_hbm_bytes("INTERNAL: something else") is None
    over = report(compiled=False, temp_bytes=int(224.07 * GIB), argument_bytes=3 * GIB,
                  xla_flops_per_device=0.0, mosaic_kernels=0, remat="full",
                  param_bytes=GIB, opt_bytes=2 * GIB)
    assert not over.fits and "does NOT fit: 227.1 GiB per device" in over.verdict()
    text = aot.format_report(over, aot.parse_topology("v5p:4x4x4"))
    assert "the TPU compiler's figure: it stopped, out of HBM" in text
    assert "XLA's own count needs a program that compiles" in text


def small_config():
    """d 128, 2 query and 2 key/value heads (splash splits them over tensor=2), T=512."""
    return config_lib.load("configs/tiny.py:seq_len=512", [
        "model.d_model=128", "model.num_heads=2", "model.num_kv_heads=2", "model.mlp_dim=256",
        "model.dtype=bfloat16", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
        "train.batch_size=4"])


@pytest.mark.slow
def test_small_config_compiles_for_v5p_with_splash(devices):
    if not aot.libtpu_installed():
        message = "libtpu missing: pip install 'hybridlm[tpu]'"
        if os.environ.get("HYBRIDLM_REQUIRE_LIBTPU"):
            pytest.fail(message)
        pytest.skip(message)
    cfg = small_config()
    topo = aot.parse_topology("v5p:2x2x1")
    # conftest's "highest" would reach splash's bf16 matmuls, which Mosaic rejects
    with jax.default_matmul_precision("default"):
        tpu = aot.compile_for(cfg, topo)
        cpu = aot.compile_for(cfg, topo, devices=devices[:4])  # same program, CPU compiler
    model_cfg = config_lib.model_dict(cfg)

    # the real Mosaic kernel, not interpret mode: fwd, dq and dkv per mask (window, causal)
    assert tpu.attention_impl == "splash" and tpu.devices == 4
    assert tpu.loop_trips == 1  # 4 layers = one pattern group: XLA sees every layer's FLOPs
    assert tpu.mosaic_kernels >= 6 and cpu.mosaic_kernels == 0
    # every weight is split 4 ways (embed over fsdp, heads/mlp/vocab over tensor) except
    # the norm scales (embed only): parameter bytes = analytic count x 4 bytes / 4, +- norms
    norms = 4 * 128 * (2 * 4 + 1)
    assert abs(tpu.param_bytes - param_count(model_cfg)) <= norms
    assert abs(tpu.opt_bytes - 2 * tpu.param_bytes) <= 64  # AdamW mu, nu and step counts
    state = tpu.param_bytes + tpu.opt_bytes + tpu.batch_bytes + 4 * 4  # + 4 int32 counters
    assert cpu.argument_bytes == state  # XLA's input bytes == the layout's arithmetic
    assert state <= tpu.argument_bytes <= 1.5 * state  # TPU tiles pad small arrays
    assert tpu.fits and 0 < tpu.peak_bytes < 1 * GIB and tpu.temp_bytes > 0
    # FLOPs: both compilers count everything outside splash alike; only the CPU's
    # interpret mode exposes the kernel body, which costs about the analytic attention
    # FLOPs (more: whole 128-wide blocks on the mask's edges)
    attention = attention_flops_per_token(model_cfg, cfg.data.seq_len) * tpu.tokens_per_step / 4
    kernel_body = cpu.xla_flops_per_device - tpu.xla_flops_per_device
    assert 0.5 * attention <= kernel_body <= 3 * attention
    # and outside the kernel, XLA's TPU count is 6N plus the elementwise work (norms, RoPE,
    # softmax, the optimizer), a large share at this tiny width
    six_n = 6 * matmul_param_count(model_cfg) * tpu.tokens_per_step / tpu.devices
    assert six_n <= tpu.xla_flops_per_device <= 1.3 * six_n
    assert tpu.analytic_flops_per_step == pytest.approx(4 * (six_n + attention))
    # the kernel's block map, by hand: T=512 in 256-wide blocks; every layer (three with
    # 128-key windows, one causal) visits 3 of the 4 blocks; 12 H D FLOPs per pair, batch 4
    assert tpu.kernel_flops_per_step == 4 * 3 * 256 * 256 * 12 * 2 * 64 * 4
    assert tpu.kernel_flops_per_step > 4 * attention  # whole blocks: more than the pairs
