"""Multi-host start-up: one function every command calls before touching devices.

JAX's own multi-controller runtime (`jax.distributed`) connects the processes; this module
only decides how to call it, in this order:

1. explicit flags: `--coordinator host:port --num_processes N --process_id i`
2. SLURM: `SLURM_NTASKS` > 1 -> coordinator = first host of the step's node list
3. Cloud TPU VM pod: `TPU_WORKER_HOSTNAMES` lists several workers -> worker 0, and this
   process is `TPU_WORKER_ID`
4. otherwise a single process: nothing to do

Commands call `add_cli_flags(parser)` and then `start(args, resolved_config_json)`, which
joins and runs `preflight` (same JAX version and resolved config on every process).

The coordinator port is always explicit (`DEFAULT_PORT` unless given): a changed default
port once broke TPU pods. Start-up fails within `timeout_s` with a message naming what is
missing (exit status 1), and a process that stops sending heartbeats brings the others down after
`heartbeat_s` instead of leaving them hanging in a collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import numpy as np

from hybridlm.errors import ConfigError, UserError

DEFAULT_PORT = 12_357
T = TypeVar("T")


class DistributedError(RuntimeError):
    """The processes could not be connected or disagree; the message says what to fix.

    (Malformed flags or variables are `ConfigError`s, raised before anything connects.)"""


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
            raise ConfigError(f"multi-process start-up needs all of --coordinator, "
                              f"--num_processes and --process_id; missing {', '.join(missing)}")
        host, _, port_text = coordinator.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"--coordinator {coordinator!r} must be HOST:PORT with an "
                              f"explicit port (e.g. {coordinator.split(':')[0]}:{port})")
        if num_processes < 1:
            raise ConfigError(f"--num_processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id {process_id} is outside 0..{num_processes - 1} "
                              f"(--num_processes {num_processes})")
        return Plan("explicit", coordinator, num_processes, process_id)
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise ConfigError("SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor "
                                   "SLURM_JOB_NODELIST is set; run under srun or pass "
                                   "--coordinator/--num_processes/--process_id")
        return Plan("slurm", f"{first_slurm_host(nodes)}:{port}", int(env["SLURM_NTASKS"]),
                    int(env["SLURM_PROCID"]))
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        workers = [h for h in hosts.split(",") if h]
        if "TPU_WORKER_ID" not in env:
            raise ConfigError("TPU_WORKER_HOSTNAMES lists several workers but "
                                   "TPU_WORKER_ID is not set")
        return Plan("tpu", f"{workers[0]}:{port}", len(workers), int(env["TPU_WORKER_ID"]))
    return Plan("single")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, port: int = DEFAULT_PORT,
               timeout_s: int = 120, heartbeat_s: int = 30) -> Plan:
    """Join the job (or do nothing for a single process). Idempotent.

    XLA's client aborts the process (no Python exception) when the others do not show up,
    with a message that names nothing; a watchdog therefore says what is missing and exits
    with status 1 a moment before XLA would give up.
    """
    p = plan(coordinator, num_processes, process_id, port)
    if p.method == "single" or jax.distributed.is_initialized():
        return p
    joined = threading.Event()
    watchdog = threading.Thread(target=_give_up_after, args=(p, timeout_s, joined), daemon=True)
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=p.coordinator, num_processes=p.num_processes,
            process_id=p.process_id, initialization_timeout=timeout_s + WATCHDOG_GRACE_S,
            heartbeat_timeout_seconds=heartbeat_s, cluster_detection_method="deactivate")
    except Exception as e:  # noqa: BLE001  (XLA raises several types here)
        raise DistributedError(f"{_who(p)} could not join the job: "
                               f"{str(e).splitlines()[0]}. {_ADVICE}") from None
    finally:
        joined.set()
    return p


WATCHDOG_GRACE_S = 5  # XLA's own deadline is this much later than the watchdog's
_ADVICE = ("Check that all processes were started with the same --num_processes and "
           "--coordinator host:port, and that the port is reachable from every host.")


def _who(p: Plan) -> str:
    return (f"process {p.process_id} of {p.num_processes} (coordinator {p.coordinator}, "
            f"from {'flags' if p.method == 'explicit' else p.method})")


def _give_up_after(p: Plan, timeout_s: float, joined: threading.Event) -> None:
    if joined.wait(timeout_s):
        return
    if p.process_id == 0:
        missing = (f"the other {p.num_processes - 1} process(es) did not all register with "
                   f"this coordinator")
    elif _reachable(p.coordinator):
        missing = ("the coordinator answers, but not all processes registered with it "
                   "(is every process of the job started?)")
    else:
        missing = (f"nothing answers at {p.coordinator} (is process 0 running there, on "
                   "that port?)")
    print(f"hybridlm: error: {_who(p)} could not join the job within {timeout_s:g} s: "
          f"{missing}. {_ADVICE}", file=sys.stderr, flush=True)
    os._exit(1)


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags, shared by every command that computes."""
    group = parser.add_argument_group(
        "multi-host", "all three of --coordinator/--num_processes/--process_id, or none "
        "(then SLURM or TPU-pod variables, else one process); see docs/launching.md")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help=f"process 0's address, port explicit (e.g. 10.0.0.2:{DEFAULT_PORT})")
    group.add_argument("--num_processes", type=int, default=None, metavar="N")
    group.add_argument("--process_id", type=int, default=None, metavar="I")
    group.add_argument("--distributed_timeout_s", type=int, default=120, metavar="S",
                       help="give up with an error if the processes have not all joined "
                       "within S seconds (default 120)")
    group.add_argument("--distributed_heartbeat_s", type=int, default=30, metavar="S",
                       help="a process silent for S seconds brings the others down with an "
                       "error instead of leaving them waiting (default 30)")


def start(args: argparse.Namespace, resolved_config_json: str,
          what: str = "resolved config") -> Plan:
    """initialize() from add_cli_flags' flags, then preflight(); call before anything
    compiles or touches a device. `what` names the text in the preflight's message (eval
    commands pass their flags and the checkpoint they found)."""
    for flag in ("distributed_timeout_s", "distributed_heartbeat_s"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    p = initialize(args.coordinator, args.num_processes, args.process_id,
                   timeout_s=args.distributed_timeout_s,
                   heartbeat_s=args.distributed_heartbeat_s)
    preflight(resolved_config_json, what)
    return p


def fingerprint(text: str) -> np.ndarray:
    """A string as 8 uint32 words (SHA-256), for comparing across processes."""
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint32).copy()


def preflight(resolved_config_json: str, what: str = "resolved config") -> None:
    """Every process must run the same JAX version and the same resolved config."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    for label, text in (("JAX version", jax.__version__), (what, resolved_config_json)):
        mine = fingerprint(text)
        everyone = np.asarray(multihost_utils.process_allgather(mine))
        if not (everyone == mine[None]).all():
            differ = [i for i in range(everyone.shape[0]) if not (everyone[i] == mine).all()]
            raise DistributedError(f"processes {differ} run a different {label} than process "
                                   f"{jax.process_index()}; start every process from the same "
                                   "install with the same config, flags and overrides, on "
                                   "a workdir that every host sees")


# ---- agreeing on a decision (every process must take the same path to the next collective) --
def all_processes(ok: bool) -> bool:
    """Whether `ok` holds on every process (each contributes its own outcome)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def on_process_0(check: Callable[[], T]) -> T | None:
    """`check()` on process 0 alone (its result there, None elsewhere). If it raises, every
    process raises, the others a UserError pointing at process 0's output, so that none is
    left waiting for process 0 in a collective."""
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = check()
        except Exception as e:  # noqa: BLE001  (re-raised below, after the others know)
            error = e
    if not all_processes(jax.process_index() != 0 or error is None):
        if error is None:
            raise UserError("process 0 stopped this run before it began; its output says why")
    if error is not None:
        raise error
    return result
