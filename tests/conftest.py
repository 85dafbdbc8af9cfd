"""Every test sees 8 fake CPU devices (set before JAX is imported anywhere)."""

import os

# XLA's CPU runtime aborts the whole process when one device's thread reaches a collective
# more than 40 s after the others (xla_cpu_collective_call_terminate_timeout_seconds); eight
# fake devices on a loaded 2-core CI machine (the other xdist worker, a test's subprocesses)
# once took that long, and the worker died with a bare "Fatal Python error: Aborted".
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=600"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 " +
                           PATIENT_COLLECTIVES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "conftest must run before jax is imported"
    return jax.devices()


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves os.environ as it found it. An in-process TPU compile sets
    TPU_WORKER_HOSTNAMES (hybridlm/train/aot.py); inherited by a later test's subprocess, it
    made that `hybridlm` believe a TPU may be here and load libtpu, whose warning then broke
    a one-line-error assertion, on whichever xdist worker ran both (1 CI run in many)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
