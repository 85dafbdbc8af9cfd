"""Saved runs on disk: finding, reading and exporting what a run or an export holds.

What eval, interop, infer and the CLI need to read weights, and what the trainer needs to
resume or start a stage, without the trainer's own Orbax manager (train/checkpoint.py):

  <workdir>/checkpoints/<step>/{state,data,config}   a training checkpoint (or checkpoint.dir)
  <out>/params/ + config.json + export.json         a params-only export (`export_params`)

`find_sources` lists what a path holds, newest first; `first_that_restores` skips the
damaged ones; `load_model` places restored parameters on one device or straight in their
shards on a mesh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
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
from hybridlm.errors import CheckpointError, ConfigError
from hybridlm.model import abstract_model

EXPORT_FORMAT = "hybridlm-params-v1"


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
