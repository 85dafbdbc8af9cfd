"""The training loop, in sections: setup, mesh, data, model and optimizer, state, compile, loop.

One jitted step with pinned input and output shardings and a donated state; the host
only feeds batches, and reads metrics back at log steps (a device-to-host read at every
step would stall the asynchronous dispatch). Checkpointing plugs in through the small
`Checkpoints` protocol below: `restore` returns the state and the data iterator's state,
`save` is offered every step after the step's batch is consumed.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from hybridlm import config as config_lib
from hybridlm.data import pipeline as data_pipeline
from hybridlm.errors import RunStopped
from hybridlm.model import abstract_model, flops_per_token
from hybridlm.model.attention import config_tiles
from hybridlm.ops import kernel_tiles
from hybridlm.parallel import (
    activation_sharding,
    batch_sharding,
    distributed,
    process_rows,
    put_batch,
    replicated,
)
from hybridlm.parallel.context import check_length, context_parallel, reorder_batch
from hybridlm.parallel.mesh import check_batch, make_mesh
from hybridlm.train import checkpoint as checkpoint_lib
from hybridlm.train import summary as run_summary
from hybridlm.train import workdir as workdir_lib
from hybridlm.train.metrics import MetricsWriter, mfu, peak_flops, peak_memory_gb
from hybridlm.train.optim import decay_mask, make_optimizer, schedule
from hybridlm.train.preemption import Preemption
from hybridlm.train.state import (
    StateLayout,
    count_params,
    init_state,
    make_layout,
)
from hybridlm.train.step import auto_loss_chunk, make_eval_step, make_train_step

BATCH_KEYS = {"inputs": np.int32, "targets": np.int32, "positions": np.int32,
              "segment_ids": np.int32, "weights": np.float32}


class NonFiniteLoss(RunStopped):
    """Loss or gradient NaN/Inf for train.max_nan_streak steps in a row: the run stopped."""


class Checkpoints(Protocol):
    """What the loop needs from a checkpoint manager."""

    def restore(self, layout: StateLayout) -> tuple[dict, Any] | None:
        """(state, data-iterator state) of the latest checkpoint, placed as `layout` says."""

    def should_save(self, step: int) -> bool: ...

    def save(self, step: int, state: dict, data_state: Any) -> None: ...

    def close(self) -> None: ...


class NoCheckpoints:
    """checkpoint.enabled=False: nothing to restore or save."""

    def restore(self, layout: StateLayout) -> None:
        return None

    def should_save(self, step: int) -> bool:
        return False

    def save(self, step: int, state: dict, data_state: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def check_local_batch(local: dict[str, np.ndarray], rows: int, seq_len: int) -> None:
    """The data pipeline's first batch must match the contract; say what differs."""
    for key, dtype in BATCH_KEYS.items():
        if key not in local:
            raise ValueError(f"the data pipeline's batch lacks {key!r} (has {sorted(local)})")
        value = local[key]
        if value.shape != (rows, seq_len) or value.dtype != dtype:
            raise ValueError(f"the data pipeline's {key!r} is {value.dtype}{list(value.shape)}; "
                             f"expected {np.dtype(dtype)}[{rows}, {seq_len}] (this process's "
                             "share of the global batch)")


def contract(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The contract's arrays only (a pipeline may carry extra keys)."""
    return {key: local[key] for key in BATCH_KEYS}


def evaluate(eval_step: Callable, params: Any, batches: Iterator, steps: int, mesh,
             rows: int) -> float | None:
    """Mean validation cross-entropy over up to `steps` global batches of `rows` rows (all
    of them with steps=-1; None if there are none)."""
    totals = []
    for _, local in zip(range(steps) if steps >= 0 else itertools.count(), batches,
                        strict=False):
        totals.append(eval_step(params, put_batch(contract(local), mesh, rows)))
    if not totals:
        return None
    ce, weight = np.sum(np.asarray(jax.device_get(totals), np.float64), axis=0)
    return float(ce / max(weight, 1.0))


def loss_chunk(cfg: mlc.ConfigDict, mesh, microbatches: int) -> int:
    """train.loss_chunk, with -1 resolved for this mesh and the device kind."""
    if cfg.train.loss_chunk >= 0:
        return cfg.train.loss_chunk
    rows = cfg.train.batch_size / microbatches / (mesh.shape["data"] * mesh.shape["fsdp"])
    vocab = cfg.model.vocab_size / mesh.shape["tensor"]
    return auto_loss_chunk(cfg.data.seq_len, rows * vocab / mesh.shape["context"],
                           mesh.devices.flat[0].platform)


@contextlib.contextmanager
def tracing(cfg: mlc.ConfigDict, mesh) -> Iterator[None]:
    """Trace the model as this run runs it: on `mesh` (sharding, context parallelism) with
    the config's attention tiles."""
    with (activation_sharding(mesh), context_parallel(mesh, cfg.mesh),
          kernel_tiles(*config_tiles(cfg.model))):
        yield


def compile_train_step(cfg: mlc.ConfigDict, mesh, layout: StateLayout,
                       tx: optax.GradientTransformation) -> Callable:
    """The train step compiled ahead of time for the global batch, state donated, input and
    output shardings pinned (so that its outputs are valid inputs of the next call)."""
    t = cfg.train
    sharding = batch_sharding(mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct((t.batch_size, cfg.data.seq_len), jnp.dtype(d),
                                              sharding=sharding)
                      for k, d in BATCH_KEYS.items()}
    step_fn = make_train_step(layout.graphdef, tx, schedule(t), grad_accum=t.grad_accum_steps,
                              z_loss=t.z_loss, loss_chunk=loss_chunk(cfg, mesh, t.grad_accum_steps),
                              unroll=not cfg.model.scan_layers)
    with tracing(cfg, mesh):
        return jax.jit(step_fn, in_shardings=(layout.shardings, sharding),
                       out_shardings=(layout.shardings, replicated(mesh)),
                       donate_argnums=0).lower(layout.abstract, abstract_batch).compile()


def stopped_message(signal_name: str, step: int, saved: bool, workdir: Path) -> str:
    what = (f"saved a checkpoint of step {step}" if saved else
            "saved no checkpoint (the loss is in a NaN streak); a resume starts from the last "
            "one")
    return (f"{signal_name}: stopped after step {step} and {what}. To resume, run the same "
            f"`hybridlm train` command again with --workdir {workdir}.")


def train(cfg: mlc.ConfigDict, workdir: str | Path, *,
          devices: Sequence[jax.Device] | None = None, train_iter: Iterator | None = None,
          checkpoints: Checkpoints | None = None, restart: bool = False
          ) -> list[dict[str, Any]]:
    """Train for cfg.train.steps; returns the logged rows (also in metrics.jsonl).

    `devices` (default: all) and `train_iter` (default: the data pipeline) are for tests;
    `checkpoints` defaults to Orbax checkpoints in checkpoint.dir (checkpoint.enabled).
    The workdir is locked for the run's life; a workdir holding a run that this one would
    not resume is refused unless `restart` moves that run aside (train/workdir.py).
    SIGTERM or SIGINT ends the run after the current step, with a checkpoint of that step
    (during start-up: before the first step, with Interrupted). Whatever it opens (the
    lock, Orbax, Grain, the metrics files) is closed on every way out.
    """
    with contextlib.ExitStack() as stack:
        history = _train(cfg, Path(workdir), stack, devices, train_iter, checkpoints, restart)
    if history and jax.process_index() == 0:  # what the run made, what to run next
        run_summary.print_if_finished(Path(workdir), cfg.train.steps)
    return history


def _train(cfg: mlc.ConfigDict, workdir: Path, stack: contextlib.ExitStack,
           devices: Sequence[jax.Device] | None, train_iter: Iterator | None,
           checkpoints: Checkpoints | None, restart: bool) -> list[dict[str, Any]]:
    # ---- setup ---------------------------------------------------------------------
    jax.config.update("jax_threefry_partitionable", True)  # same init on every mesh
    t, seq_len = cfg.train, cfg.data.seq_len
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    preemption = Preemption().install()
    stack.callback(preemption.uninstall)

    # ---- mesh ----------------------------------------------------------------------
    mesh = make_mesh(cfg.mesh, devices)
    check_batch(mesh, t.batch_size, seq_len, "train.batch_size", process_count)
    check_length(mesh, cfg.mesh, seq_len)
    if t.grad_accum_steps > 1:
        check_batch(mesh, t.batch_size // t.grad_accum_steps, seq_len,
                    "train.batch_size / train.grad_accum_steps", process_count)

    # ---- the workdir: locked, and no other run's history overwritten (process 0) ------
    checkpoint_dir = checkpoint_lib.directory_of(cfg, workdir)
    lock = distributed.on_process_0(
        lambda: workdir_lib.claim(cfg, workdir, checkpoint_dir, restart=restart))
    if lock is not None:
        stack.callback(lock.release)
    if is_main:
        print(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} "
              f"devices, {process_count} process(es)", flush=True)

    # ---- data: this process's rows of every global batch; both splits checked ----------
    rows, local_rows = t.batch_size, process_rows(mesh, t.batch_size)
    if train_iter is None:
        data_pipeline.check_vocab(cfg)  # a tokenizer file's vocabulary (config checks the rest)
        train_iter = data_pipeline.make_train_iterator(cfg, rows=local_rows)
        stack.callback(train_iter.close)  # its reading threads or worker processes
    if cfg.eval.steps != 0:  # the validation split exists (before anything compiles)
        data_pipeline.make_eval_iterator(cfg, rows=local_rows, progress=False).close()
    stage_sources = checkpoint_lib.stage_sources(cfg) if t.init_from else None

    # ---- model, optimizer and state --------------------------------------------------
    model_cfg = config_lib.model_dict(cfg)
    graphdef, params_meta = abstract_model(model_cfg, t.seed)
    tx = make_optimizer(t, mask=decay_mask(params_meta))
    layout = make_layout(graphdef, params_meta, tx, mesh)
    if checkpoints is None and cfg.checkpoint.enabled:
        distributed.on_process_0(lambda: workdir_lib.check_disk_space(
            checkpoint_dir, checkpoint_lib.state_bytes(layout), cfg.checkpoint.keep))
        checkpoints = checkpoint_lib.Checkpointer(cfg, workdir)
    elif checkpoints is None:
        checkpoints = NoCheckpoints()
    stack.callback(checkpoints.close)
    preemption.check_startup()
    restored = checkpoints.restore(layout)
    if restored is not None:  # the data position (refused if seq_len/packing changed)
        state, data_state = restored
        train_iter.set_state(data_state)
    if is_main:  # after the checkpoints accepted this config
        config_lib.save(cfg, workdir / "config.json")
    start = 0 if restored is None else int(jax.device_get(state["step"]))
    if start >= t.steps:
        if is_main:
            print(f"nothing to do: {workdir} has finished step {start} of train.steps="
                  f"{t.steps}", flush=True)
        return []
    first = next(train_iter)  # check the pipeline's output before paying for any compile
    check_local_batch(first, len(local_rows), seq_len)
    if restored is None:
        state = init_state(model_cfg, tx, layout, t.seed)
        if stage_sources:
            state = checkpoint_lib.init_from(cfg, layout, state, stage_sources)
    preemption.check_startup()

    # ---- compile -------------------------------------------------------------------
    compile_start = time.perf_counter()
    train_step = compile_train_step(cfg, mesh, layout, tx)
    eval_step = jax.jit(make_eval_step(layout.graphdef, loss_chunk(cfg, mesh, 1)),
                        in_shardings=(layout.params_sharding, batch_sharding(mesh)),
                        out_shardings=replicated(mesh))
    flops = flops_per_token(model_cfg, seq_len)
    peak = cfg.log.peak_flops or peak_flops(jax.devices()[0])
    preemption.check_startup()
    if is_main:
        print(f"model: {count_params(layout):,} parameters, {flops / 1e6:.1f} MFLOPs per "
              f"token; step compiled in {time.perf_counter() - compile_start:.1f} s; "
              f"{'resuming at' if start else 'starting at'} step {start}", flush=True)

    def run_eval(params) -> float | None:
        it = data_pipeline.make_eval_iterator(cfg, rows=local_rows)
        batches = (reorder_batch(b, mesh, cfg.mesh) for b in it)
        try:
            with tracing(cfg, mesh):
                return evaluate(eval_step, params, batches, cfg.eval.steps, mesh, rows)
        finally:
            it.close()  # its reading thread

    # ---- loop ----------------------------------------------------------------------
    writer = MetricsWriter(workdir, t.steps, start, enabled=is_main)
    stack.callback(writer.close)
    history: list[dict[str, Any]] = []
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start, t.steps):
        local = first if step == start else next(train_iter)
        batch = reorder_batch(contract(local), mesh, cfg.mesh)  # the context layout
        state, metrics = train_step(state, put_batch(batch, mesh, rows))
        writer.advance()
        window_steps += 1
        done = step + 1
        is_eval = cfg.eval.steps != 0 and (
            done == t.steps or (cfg.eval.every and done % cfg.eval.every == 0))
        if done % cfg.log.every == 0 or done in (start + 1, t.steps) or is_eval:
            metrics = jax.device_get(metrics)
            step_time = (time.perf_counter() - window_start) / window_steps
            row = {"loss": metrics["loss"], "lr": metrics["lr"],
                   "grad_norm": metrics["grad_norm"],
                   "tokens_per_s": rows * seq_len / step_time, "step_time_s": step_time,
                   "mfu": mfu(rows * seq_len / step_time, flops, peak, mesh.devices.size),
                   "nan_skipped": metrics["nan_skipped"]}
            memory = peak_memory_gb(jax.local_devices())
            if memory is not None:
                row["peak_memory_gb"] = memory
            if is_eval:
                row["val_loss"] = run_eval(state["params"])
            writer.write(done, row)
            history.append({"step": done, **{k: None if v is None else float(v)
                                             for k, v in row.items()}})
            if metrics["nan_streak"] >= t.max_nan_streak:
                raise NonFiniteLoss(
                    f"the loss or gradient was NaN or Inf in the last "
                    f"{int(metrics['nan_streak'])} steps (train.max_nan_streak="
                    f"{t.max_nan_streak}); those updates were skipped, so the "
                    "parameters are the last good ones. Lower "
                    "train.learning_rate or check the data.")
            window_start, window_steps = time.perf_counter(), 0
        stop = preemption.reached(done)
        saved = ((checkpoints.should_save(done) or stop)
                 and int(state["nan_streak"]) == 0)  # never mid-streak
        if saved:
            checkpoints.save(done, state, train_iter.get_state())
        if stop:
            if is_main:
                print(stopped_message(preemption.signal_name, done, saved, workdir),
                      flush=True)
            break
    return history
