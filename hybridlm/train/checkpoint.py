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

A params-only export (`export_params`) is `<out>/params/` (Orbax) + `<out>/config.json` +
`<out>/export.json` (the step); `load_model` and `train.init_from` read both kinds.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from hybridlm import config as config_lib
from hybridlm.errors import CheckpointError, ConfigError, RunStopped
from hybridlm.parallel import distributed

EXPORT_FORMAT = "hybridlm-params-v1"


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


# ---- configs ------------------------------------------------------------------------------
def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'a.b: old -> new' for every field that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def param_shapes(model_cfg: dict) -> dict[str, tuple[int, ...]]:
    """'path/to/param' -> shape of the model a model config builds (allocates nothing)."""
    from hybridlm.train.state import abstract_model

    _, meta = abstract_model(model_cfg)
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(meta))[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
            for path, leaf in flat}


def shape_changes(old_model: dict, new_model: dict) -> list[str]:
    """The parameters whose shape differs (or that exist in one model only)."""
    old, new = param_shapes(old_model), param_shapes(new_model)
    return [f"{k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# ---- finding what a path holds ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """Weights on disk: a training checkpoint (`<step>/state/`) or an export (`params/`)."""

    kind: str  # "checkpoint" | "export"
    directory: Path  # the step directory, or the export directory
    step: int

    @property
    def config(self) -> mlc.ConfigDict:
        if self.kind == "export":
            return config_lib.from_json((self.directory / "config.json").read_text())
        return mlc.ConfigDict(read_json_item(self.directory / "config"))


def read_json_item(item_dir: Path) -> dict:
    """The dict an `ocp.args.JsonSave` wrote into `item_dir` (Orbax names the file
    `metadata`); read directly, so that no collective runs."""
    return json.loads((item_dir / "metadata").read_text())


def checkpoint_steps(directory: Path) -> list[int]:
    """Complete checkpoint steps in a checkpoints directory, newest first."""
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()),
                  reverse=True)


def checkpoints_dir(workdir: Path) -> Path:
    """Where a workdir's checkpoints are: checkpoint.dir of its config.json, else the default."""
    saved = workdir / "config.json"
    if saved.is_file():
        custom = json.loads(saved.read_text()).get("checkpoint", {}).get("dir", "")
        if custom:
            return Path(custom)
    return workdir / "checkpoints"


def find_sources(path: Path, step: int | None = None) -> list[Source]:
    """Candidates, newest first, for a workdir, a checkpoints dir, a step dir or an export."""
    path = Path(path).absolute()
    if (path / "export.json").is_file():
        saved = json.loads((path / "export.json").read_text())["step"]
        if step is not None and step != saved:
            raise ConfigError(f"{path} is an export of step {saved}, not step {step}")
        return [Source("export", path, saved)]
    if (path / "state").is_dir() and path.name.isdigit():
        return [Source("checkpoint", path, int(path.name))]
    directory = path if checkpoint_steps(path) else checkpoints_dir(path)
    steps = checkpoint_steps(directory)
    if not steps:
        raise ConfigError(f"{path} holds no checkpoint: give a run's workdir, its checkpoints "
                          "directory, one checkpoint step directory, or a directory written by "
                          "`hybridlm export`")
    if step is not None:
        if step not in steps:
            raise ConfigError(f"{directory} has no checkpoint of step {step} (steps: "
                              f"{sorted(steps)})")
        steps = [step]
    return [Source("checkpoint", directory / str(s), s) for s in steps]


def ignore_abandoned_io() -> None:
    """A restore or a background save that fails leaves Orbax's other reads or writes in
    flight. As each one ends, its callback finds Orbax's event loop closed ("Event loop is
    closed": 95 tracebacks for one truncated file), or asyncio reports its error as never
    retrieved (an emptied file; a full disk, at exit). They are harmless, and the failure
    itself is reported once: from the first restore or save on, this process drops exactly
    those kinds of report (asyncio runs here only inside Orbax)."""
    asyncio_log = logging.getLogger("asyncio")
    if _never_retrieved not in asyncio_log.filters:
        asyncio_log.addFilter(_never_retrieved)
    previous = sys.unraisablehook
    if getattr(previous, "hybridlm", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.hybridlm = True
    sys.unraisablehook = hook


def _never_retrieved(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(("Future exception was never retrieved",
                                               "Task exception was never retrieved"))


def first_that_restores(sources: list[Source], restore: Callable[[Source], Any]
                        ) -> tuple[Source, Any]:
    """The newest source whose restore succeeds; damaged ones are skipped with a warning."""
    ignore_abandoned_io()
    errors = []
    for source in sources:
        try:
            return source, restore(source)
        except (CheckpointError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001  (a damaged checkpoint fails in many ways)
            first_line = (str(e).splitlines() or [""])[0][:300]
            errors.append(f"{source.directory}: {type(e).__name__}: {first_line}")
            print(f"warning: checkpoint {source.directory} does not restore "
                  f"({type(e).__name__}: {first_line}); trying the one before", flush=True)
    raise CheckpointError("no checkpoint restores:\n  " + "\n  ".join(errors))


# ---- parameters alone: load_model, export_params, init_from ----------------------------
def restore_params(source: Source, abstract_params: Any) -> Any:
    """The parameters of `source`, placed and typed as `abstract_params` says."""
    if source.kind == "export":
        item, directory = abstract_params, source.directory / "params"
    else:
        item, directory = {"params": abstract_params}, source.directory / "state"
    restored = restore_tree(directory, item)
    return restored if source.kind == "export" else restored["params"]


def restore_tree(directory: Path, item: Any) -> Any:
    """The subtree `item` (ShapeDtypeStructs with shardings) of an Orbax pytree on disk."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))


def load_model(path: Path, step: int | None = None,
               mesh_for: Callable[[mlc.ConfigDict], Mesh] | None = None
               ) -> tuple[mlc.ConfigDict, nnx.Module, int]:
    """(resolved config, model with restored float32 params, step).

    `path`: a run workdir (its latest complete checkpoint, or `step`), a checkpoints or
    step directory, or a params-only export directory. Parameters land on the first local
    device, or, with `mesh_for(config) -> Mesh`, straight in their shards on that mesh (the
    same logical-axis rules as training): no device ever holds the whole model.
    """
    from hybridlm.parallel import param_shardings
    from hybridlm.train.state import abstract_model

    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore(source: Source) -> tuple[mlc.ConfigDict, nnx.Module]:
        cfg = source.config
        graphdef, meta = abstract_model(config_lib.model_dict(cfg), cfg.train.seed)
        shardings = (jax.tree.map(lambda _: single, nnx.to_pure_dict(meta)) if mesh_for is None
                     else param_shardings(meta, mesh_for(cfg)))
        abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                                                   sharding=sh),
                                nnx.to_pure_dict(meta), shardings)
        return cfg, nnx.merge(graphdef, restore_params(source, abstract))

    source, (cfg, model) = first_that_restores(find_sources(Path(path), step), restore)
    return cfg, model, source.step


def export_params(cfg: mlc.ConfigDict, params: Any, out: Path, step: int = 0) -> None:
    """Params-only export: `out/params/` (Orbax) + `out/config.json` + `out/export.json`.

    Every process calls it (each writes its own shards); `out` must not exist yet.
    """
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export directory {out} exists and is not empty; choose another")
    params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / "params", params)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        config_lib.save(cfg, out / "config.json")
        (out / "export.json").write_text(json.dumps({"format": EXPORT_FORMAT,
                                                     "step": int(step)}) + "\n")


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

