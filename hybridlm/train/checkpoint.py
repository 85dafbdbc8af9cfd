"""Orbax checkpoints that resume the same run: state, data position and config together.

One checkpoint directory `<checkpoint.dir>/<step>/` (default `<workdir>/checkpoints/`) holds
  state/   parameters, optimizer state and counters (step, updates applied, NaN streak):
           Orbax arrays, each process writing its own shards, asynchronously
  data/    the data position in the global row stream (`position.json`, one for all
           processes, so N processes' checkpoint resumes on M)
  config/  the resolved config (JSON)
Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames on success, so a process killed
mid-save leaves no half checkpoint behind; a checkpoint that is complete on disk but damaged
(a truncated file) fails to restore, is reported, and the previous one is used instead.

A params-only export (`export_params`) is `<out>/params/` (Orbax) + `<out>/config.json` +
`<out>/export.json` (the step); `load_model` and `train.init_from` read both kinds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from hybridlm.config import ConfigError

log = logging.getLogger(__name__)

EXPORT_FORMAT = "hybridlm-params-v1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot continue this run; the message says what to do."""


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


def first_that_restores(sources: list[Source], restore: Callable[[Source], Any]
                        ) -> tuple[Source, Any]:
    """The newest source whose restore succeeds; damaged ones are skipped with a warning."""
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
class Checkpointer:
    """The `Checkpoints` protocol of train/trainer.py over an Orbax CheckpointManager.

    Every process takes part in every save and restore (each writes and reads its shards).
    """

    def __init__(self, cfg: mlc.ConfigDict, workdir: str | Path):
        c = cfg.checkpoint
        self.cfg, self.every, self.total_steps = cfg, c.every, cfg.train.steps
        self.directory = Path(c.dir or Path(workdir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=c.keep or None, keep_period=c.keep_every or None,
            enable_async_checkpointing=c.async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.last_saved: int | None = None

    # -- saving ------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        return step == self.total_steps or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: dict, data_state: Any) -> None:
        """Starts the save; with async_save the arrays are copied to host and written in
        the background while training goes on."""
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataSave(data_state),
            config=ocp.args.JsonSave(self.cfg.to_dict())))
        self.last_saved = step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restoring ---------------------------------------------------------------------
    def restore(self, layout) -> tuple[dict, Any] | None:
        """(state, data state) of the latest checkpoint that restores; None if none."""
        sources = [Source("checkpoint", self.directory / str(s), s)
                   for s in self.manager.all_steps()]
        if not sources:
            return None

        def restore(source: Source) -> tuple[dict, Any]:
            self._check_compatible(source)
            restored = self.manager.restore(source.step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(layout.abstract), data=DataRestore()))
            return restored.state, restored.data

        source, restored = first_that_restores(
            sorted(sources, key=lambda s: s.step, reverse=True), restore)
        print(f"resuming from {source.directory}", flush=True)
        return restored

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
