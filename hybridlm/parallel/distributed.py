"""Multi-host start-up: one function every command calls before touching devices.

JAX's own multi-controller runtime (`jax.distributed`) connects the processes; this module
only decides how to call it, in this order:

1. explicit flags: `--coordinator host:port --num_processes N --process_id i`
2. SLURM: `SLURM_NTASKS` > 1 -> coordinator = first host of the step's node list
3. Cloud TPU VM pod: JAX's own TPU detection (TPU_WORKER_HOSTNAMES / metadata server)
4. otherwise a single process: nothing to do

The coordinator port is always explicit (`DEFAULT_PORT` unless given): a changed default
port once broke TPU pods. Start-up fails within `timeout_s` with a message naming what is
missing, and a process that stops sending heartbeats brings the others down after
`heartbeat_s` instead of leaving them hanging in a collective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping

import jax
import numpy as np

DEFAULT_PORT = 12_357


class DistributedError(RuntimeError):
    """Start-up could not connect the processes; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Plan:
    method: str  # "explicit" | "slurm" | "tpu" | "single"
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0


def first_slurm_host(node_list: str) -> str:
    """'node[003-010,015],gpu7' -> 'node003'; 'a1,b2' -> 'a1'."""
    head = node_list.split(",")[0] if "[" not in node_list.split(",")[0] else node_list
    if "[" not in head:
        return head
    prefix, rest = node_list.split("[", 1)
    first = rest.split("]", 1)[0].split(",")[0].split("-")[0]
    return prefix + first


def plan(coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, port: int = DEFAULT_PORT,
         env: Mapping[str, str] | None = None) -> Plan:
    """Decide how this process joins the job, without connecting anything."""
    env = os.environ if env is None else env
    given = {"--coordinator": coordinator, "--num_processes": num_processes,
             "--process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise DistributedError(f"multi-process start-up needs all of --coordinator, "
                                   f"--num_processes and --process_id; missing {missing}")
        if ":" not in coordinator:
            raise DistributedError(f"--coordinator {coordinator!r} must be host:port "
                                   f"(e.g. {coordinator}:{port})")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"--process_id {process_id} is outside 0..{num_processes - 1}")
        return Plan("explicit", coordinator, num_processes, process_id)
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise DistributedError("SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor "
                                   "SLURM_JOB_NODELIST is set; run under srun or pass "
                                   "--coordinator/--num_processes/--process_id")
        return Plan("slurm", f"{first_slurm_host(nodes)}:{port}", int(env["SLURM_NTASKS"]),
                    int(env["SLURM_PROCID"]))
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        workers = [h for h in hosts.split(",") if h]
        if "TPU_WORKER_ID" not in env:
            raise DistributedError("TPU_WORKER_HOSTNAMES lists several workers but "
                                   "TPU_WORKER_ID is not set")
        return Plan("tpu", f"{workers[0]}:{port}", len(workers), int(env["TPU_WORKER_ID"]))
    return Plan("single")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, port: int = DEFAULT_PORT,
               timeout_s: int = 120, heartbeat_s: int = 30) -> Plan:
    """Join the job (or do nothing for a single process). Idempotent."""
    p = plan(coordinator, num_processes, process_id, port)
    if p.method == "single" or jax.distributed.is_initialized():
        return p
    try:
        jax.distributed.initialize(
            coordinator_address=p.coordinator, num_processes=p.num_processes,
            process_id=p.process_id, initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_s, cluster_detection_method="deactivate")
    except Exception as e:  # noqa: BLE001  (XLA raises several types here)
        raise DistributedError(
            f"process {p.process_id} of {p.num_processes} could not join the job at "
            f"{p.coordinator} ({p.method}) within {timeout_s} s: {str(e).splitlines()[0]}. "
            "Check that every process was started, that they agree on the coordinator "
            "host:port, and that the port is reachable.") from None
    return p


def fingerprint(text: str) -> np.ndarray:
    """A string as 8 uint32 words (SHA-256), for comparing across processes."""
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint32).copy()


def preflight(resolved_config_json: str) -> None:
    """Every process must run the same JAX version and the same resolved config."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    for what, text in (("JAX version", jax.__version__), ("resolved config",
                                                          resolved_config_json)):
        mine = fingerprint(text)
        everyone = np.asarray(multihost_utils.process_allgather(mine))
        if not (everyone == mine[None]).all():
            differ = [i for i in range(everyone.shape[0]) if not (everyone[i] == mine).all()]
            raise DistributedError(f"processes {differ} run a different {what} than process "
                                   f"{jax.process_index()}; start every process from the same "
                                   "install with the same config and overrides")
