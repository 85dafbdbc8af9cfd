"""Orbax checkpoints that resume the same run: state, data position and config together.

One checkpoint directory `<checkpoint.dir>/<step>/` (default `<workdir>/checkpoints/`) holds
  state/   parameters, optimizer state and counters (step, updates applied, NaN streak):
           Orbax arrays, each process writing its own shards, asynchronously
  data/    the data position in the global row stream (`position.json`, one for all
           processes, so N processes' checkpoint resumes on M)
  config/  the resolved config (JSON)
Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames on success, so a process killed
mid-save leaves no half checkpoint behind; a checkpoint that is complete on disk but damaged
(a truncated file) fails to restore: the trainer moves it aside to `<step>.bad-<time>` (Orbax
lists only `<step>`) once an older one restores, and saves that step again (docs/checkpoints.md).

Finding and reading saved runs and exports (for eval, interop and the CLI as well) is
hybridlm/runs.py; this module is the trainer's own: its manager and train.init_from.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import orbax.checkpoint as ocp

from hybridlm import config as config_lib
from hybridlm.errors import CheckpointError, ConfigError, RunStopped
from hybridlm.parallel import distributed
from hybridlm.runs import (
    Source,
    checkpoint_steps,
    config_differences,
    find_sources,
    first_that_restores,
    ignore_abandoned_io,
    restore_params,
    restore_tree,
    shape_changes,
)


# ---- the data position: one JSON file, the same for every process ----------------------
class DataStateHandler(ocp.CheckpointHandler):
    """The data pipeline's position in the global row stream (`data/position.json`).

    Every process holds the same position (the stream is global), so process 0 writes it
    and every process reads it: a checkpoint written by N processes resumes on M.
    """

    FILE = "position.json"

    def save(self, directory, args: DataSave) -> None:
        if jax.process_index() == 0:
            (directory / self.FILE).write_text(json.dumps(args.state))

    def restore(self, directory, args: DataRestore | None = None) -> Any:
        path = directory / self.FILE
        if not path.exists():
            old = sorted(p.name for p in directory.glob("process_*-of-*.json"))
            if old:
                raise CheckpointError(
                    f"{directory} holds per-process data iterator states ({', '.join(old)}) "
                    "from before batches became global; this version cannot continue that "
                    "data stream. Resume it with the hybridlm that wrote it, or continue its "
                    "weights and optimizer state in a new workdir with --config.train.init_from="
                    f"{directory.parent} --config.train.init_from_opt_state=True (the data "
                    "stream and step count start again)")
            raise CheckpointError(f"{path} is missing (the checkpoint is incomplete)")
        return json.loads(path.read_text())

    def metadata(self, directory) -> None:
        return None

    def finalize(self, directory) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    pass



def stage_sources(cfg: mlc.ConfigDict) -> list[Source]:
    """What train.init_from points at, newest first, checked against this config's model
    shapes (abstractly: nothing is read or compiled)."""
    t = cfg.train
    sources = find_sources(Path(t.init_from).expanduser())
    if t.init_from_opt_state and sources[0].kind == "export":
        raise ConfigError(f"train.init_from_opt_state=True needs a training checkpoint; "
                          f"{sources[0].directory} is a params-only export")
    changed = shape_changes(config_lib.model_dict(sources[0].config), config_lib.model_dict(cfg))
    if changed:
        raise ConfigError(f"train.init_from={t.init_from}: its parameters have other shapes "
                          "than this config's model (" + "; ".join(changed[:6]) + "). A new "
                          "stage may change data.seq_len, RoPE theta or windows, not shapes.")
    return sources


def init_from(cfg: mlc.ConfigDict, layout, state: dict, sources: list[Source]) -> dict:
    """`state` with its params (and, with train.init_from_opt_state, its optimizer state)
    replaced by those of the newest source that restores: the start of a new stage."""
    keys = ("params", "opt_state") if cfg.train.init_from_opt_state else ("params",)

    def restore(source: Source) -> dict:
        if source.kind == "export":
            return {"params": restore_params(source, layout.abstract["params"])}
        return restore_tree(source.directory / "state", {k: layout.abstract[k] for k in keys})

    source, restored = first_that_restores(sources, restore)
    print(f"new stage: {' and '.join(keys)} from {source.directory} (step {source.step})",
          flush=True)
    return {**state, **restored}


# ---- the trainer's checkpoint manager -----------------------------------------------------
def directory_of(cfg: mlc.ConfigDict, workdir: str | Path) -> Path:
    """Where a run saves its checkpoints: checkpoint.dir, else <workdir>/checkpoints."""
    return Path(cfg.checkpoint.dir or Path(workdir) / "checkpoints").absolute()


def state_bytes(layout) -> int:
    """Bytes of the whole training state (all processes): what one checkpoint stores."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layout.abstract))


def _reason(error: BaseException) -> str:
    """One line for an error; the OS's words alone when they are in it (a full disk)."""
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        if os.strerror(code) in str(error):
            return f"{os.strerror(code)}; {type(error).__name__} from Orbax"
    line = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {line[:300]}{'...' if len(line) > 300 else ''}"


class OrbaxErrors(logging.Filter):
    """Orbax logs each failure of a background save several times, with tracebacks, from
    its threads (hundreds of lines for one full disk) and then raises it: keep those records
    off the console while the trainer reports the failure itself, in one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)

    def __enter__(self) -> OrbaxErrors:
        logging.getLogger("absl").addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("absl").removeFilter(self)


class Checkpointer:
    """The `Checkpoints` protocol of train/trainer.py over an Orbax CheckpointManager.

    Every process takes part in every save and restore (each writes and reads its shards).
    A save that fails (a full disk) stops the run with RunStopped, naming the last complete
    checkpoint, which Orbax never deletes before the next one is complete.
    """

    def __init__(self, cfg: mlc.ConfigDict, workdir: str | Path):
        c = cfg.checkpoint
        self.cfg, self.every, self.total_steps = cfg, c.every, cfg.train.steps
        self.directory = directory_of(cfg, workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=c.keep or None, keep_period=c.keep_every or None,
            enable_async_checkpointing=c.async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.last_saved: int | None = None
        self._pending: int | None = None  # the step of a save still being written
        self._failed = False
        self._quiet = OrbaxErrors().__enter__()
        ignore_abandoned_io()

    # -- saving ------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether to save after `step`; first raises RunStopped if a save in the background
        has failed since (checked every step with one process; several processes find out
        together, at the next save)."""
        if (self._pending is not None and jax.process_count() == 1
                and not self.manager.is_saving_in_progress()):
            self._finish_save()
        return step == self.total_steps or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: dict, data_state: Any) -> None:
        """Starts the save; with async_save the arrays are copied to host and written in
        the background while training goes on."""
        self._finish_save()
        self._pending = step
        try:
            self.manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=DataSave(data_state),
                config=ocp.args.JsonSave(self.cfg.to_dict())))
        except Exception as e:  # noqa: BLE001  (a full disk fails in many ways)
            raise self._stopped(e) from None
        self.last_saved = step

    def _finish_save(self) -> None:
        """Wait for the save in flight; RunStopped if it failed."""
        if self._pending is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._stopped(e) from None
        self._pending = None

    def _stopped(self, error: BaseException) -> RunStopped:
        self._failed = True
        complete = checkpoint_steps(self.directory)
        kept = (f"the last complete checkpoint, {self.directory / str(complete[0])}, is intact"
                if complete else "no checkpoint is complete yet")
        return RunStopped(
            f"saving the checkpoint of step {self._pending} into {self.directory} failed "
            f"({_reason(error)}); {kept}. Free some space (one checkpoint takes about "
            f"{self._bytes_hint()}) and run the same command again to resume.")

    def _bytes_hint(self) -> str:
        sizes = [sum(f.stat().st_size for f in (self.directory / str(s)).rglob("*")
                     if f.is_file()) for s in checkpoint_steps(self.directory)[:1]]
        return f"{sizes[0] / 2**20:,.1f} MiB" if sizes else "as much as the model's state"

    def close(self) -> None:
        """Wait for the last save (RunStopped if it failed) and release Orbax's threads."""
        try:
            if not self._failed:
                self._finish_save()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001  (the failure is already being reported)
                if not self._failed:
                    raise
            finally:
                if not self._failed:  # after a failure, Orbax's threads may still report it
                    self._quiet.__exit__()

    # -- restoring ---------------------------------------------------------------------
    def restore(self, layout) -> tuple[dict, Any] | None:
        """(state, data state) of the newest checkpoint that restores; None if none.

        Checkpoints newer than that one do not restore (damaged on disk): they are moved
        aside to `<step>.bad-<time>`, so that this run saves those steps again. If none
        restores, nothing is moved and CheckpointError says why (a fault that is not the
        checkpoints' own, such as a changed library, must not throw them all away).
        """
        failed: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            source = Source("checkpoint", self.directory / str(step), step)
            restored, error = None, None
            try:
                self._check_compatible(source)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(layout.abstract), data=DataRestore()))
            except (CheckpointError, ConfigError):
                raise
            except Exception as e:  # noqa: BLE001  (a damaged checkpoint fails in many ways)
                error = _reason(e)
            if not distributed.all_processes(error is None):
                failed.append((step, error or "another process could not restore it"))
                print(f"warning: checkpoint {source.directory} does not restore "
                      f"({failed[-1][1]}); trying the one before", flush=True)
                continue
            if failed:
                self._move_aside([s for s, _ in failed])
            print(f"resuming from {source.directory}", flush=True)
            return restored.state, restored.data
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores, so nothing was moved: "
                + "; ".join(f"step {s}: {e}" for s, e in failed) + ". If they are damaged, "
                "start over with --restart (it moves the old run aside), or use another "
                "--workdir")
        return None

    def _move_aside(self, steps: list[int]) -> None:
        """Rename damaged steps to `<step>.bad-<time>` (process 0; the others wait)."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                target = self.directory / f"{step}.bad-{stamp}"
                (self.directory / str(step)).rename(target)
                print(f"moved the checkpoint of step {step}, which does not restore, aside "
                      f"to {target}; this run saves step {step} again", flush=True)
        distributed.barrier("hybridlm: damaged checkpoints moved aside")
        self.manager.reload()

    def _check_compatible(self, source: Source) -> None:
        """List what changed since the checkpoint; refuse changes of parameter shapes."""
        saved = source.config.to_dict()
        diffs = [d for d in config_differences(saved, self.cfg.to_dict())
                 if not d.startswith("train.init_from")]
        if diffs:
            print(f"config changed since checkpoint {source.step}:\n  " + "\n  ".join(diffs),
                  flush=True)
        changed = shape_changes(config_lib.model_dict(mlc.ConfigDict(saved)),
                                config_lib.model_dict(self.cfg))
        if changed:
            fields = [d.split(":")[0] for d in diffs if d.startswith("model.")]
            raise CheckpointError(
                f"this config changes parameter shapes against the checkpoint at "
                f"{source.directory} ({', '.join(fields) or 'model fields'}: "
                f"{'; '.join(changed[:4])}), so it cannot resume this run: set those fields "
                "back. To continue these weights with another sequence length, RoPE theta or "
                "window (same shapes), start a new stage in a new workdir with "
                f"--config.train.init_from={source.directory}; a model of other shapes must "
                "start from scratch.")

