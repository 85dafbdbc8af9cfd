"""The install extras for accelerators (`pip install 'hybridlm[cuda12]'` and the like): each
names a build that JAX publishes for the jax version we pin, checked two ways.

1. Offline, from metadata: the extra is `jax[<extra>]==V` with V the pinned version (inside
   our `jax` range, and the version CI installs), and jax V's own metadata declares that extra
   with its plugin (or libtpu) at V.
2. Against the registry (slow; fails when pypi.org cannot be reached, never skips): pip resolves the
   CUDA plugins that jax V's extras ask for to wheels for this Python at V, with
   `--dry-run --no-deps` (~16 MB fetched). The full resolve, NVIDIA libraries included, takes
   a minute or more here (pip fetches whole wheels to read them), so CI does not run it;
   docs/launching.md has its result.
"""

import json
import socket
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ACCELERATOR_EXTRAS = ("tpu", "cuda12", "cuda13")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pinned_jax() -> str:
    """The one jax version every accelerator extra pins."""
    extras = project()["optional-dependencies"]
    versions = set()
    for name in ACCELERATOR_EXTRAS:
        (requirement,) = (Requirement(r) for r in extras[name])
        assert requirement.name == "jax" and requirement.extras == {name}, requirement
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{name}: pin jax exactly, got {requirement}"
        versions.add(spec.version)
    assert len(versions) == 1, f"the accelerator extras pin different jax versions: {versions}"
    return versions.pop()


def jax_extra_requirements(extra: str) -> list[Requirement]:
    """What the installed jax's metadata lists for `jax[extra]`."""
    out = []
    for text in metadata.requires("jax"):
        requirement = Requirement(text)
        if requirement.marker and requirement.marker.evaluate({"extra": extra}):
            out.append(requirement)
    return out


def test_accelerator_extras_pin_builds_that_jax_publishes():
    version = pinned_jax()
    (core,) = (Requirement(r) for r in project()["dependencies"] if r.startswith("jax"))
    assert version in core.specifier, f"jax=={version} is outside the dependency {core}"
    if metadata.version("jax") != version:
        pytest.skip(f"installed jax {metadata.version('jax')} is not the pinned {version}")
    for extra in ACCELERATOR_EXTRAS:
        requirements = {r.name: r for r in jax_extra_requirements(extra)}
        assert version in requirements["jaxlib"].specifier, (extra, requirements["jaxlib"])
        if extra == "tpu":
            assert "libtpu" in requirements
        else:
            plugin = requirements[f"jax-{extra}-plugin"]
            assert plugin.extras == {"with-cuda"}, plugin  # the CUDA libraries come as wheels
            assert version in plugin.specifier, plugin


def registry_reachable() -> bool:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=5):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_accelerator_extras_resolve_on_the_registry():
    version = pinned_jax()
    if metadata.version("jax") != version:
        pytest.skip(f"installed jax {metadata.version('jax')} is not the pinned {version}")
    assert registry_reachable(), ("pypi.org is not reachable: this check needs the registry "
                                  "(deselect it with -m 'not slow' on an offline machine)")
    wanted = {}  # what cannot be installed here (jaxlib and libtpu are: CI installs [tpu])
    for extra in ("cuda12", "cuda13"):
        for requirement in jax_extra_requirements(extra):
            requirement.marker = None  # `extra == "cuda12"` would exclude it from pip's view
            if requirement.name.endswith("-plugin"):
                wanted[canonicalize_name(requirement.name)] = requirement
    # --isolated: PyPI as a user sees it, not this machine's pip configuration
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--no-deps",
         "--ignore-installed", "--quiet", "--report", "-", *map(str, wanted.values())],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(result.stdout)["install"]}
    for name, requirement in wanted.items():
        assert name in resolved and resolved[name] in requirement.specifier, (name, resolved)
    for extra in ("cuda12", "cuda13"):
        assert resolved[f"jax-{extra}-plugin"] == version
