"""Sweeps: the context-length grid, the print/slurm launchers, and a real local sweep that is
interrupted, rerun (only the unfinished points run; the interrupted one resumes from its
checkpoint) and summarised."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridlm import cli, sweep, sweep_status
from hybridlm.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GRID = "configs/sweeps/context_length.py"


def test_the_grid_keeps_tokens_per_step_constant():
    points = sweep.load_sweep(f"{GRID}:variants=rope+rnope_swa,lengths=4096+16384+65536")
    assert [p["name"] for p in points] == ["rope_4096", "rope_16384", "rope_65536",
                                           "rnope_swa_4096", "rnope_swa_16384",
                                           "rnope_swa_65536"]
    for p in points:
        seq_len = int(p["name"].rsplit("_", 1)[1])
        assert f"seq_len={seq_len}" in p["config"]
        assert p["train.batch_size"] * seq_len == 1_048_576


def test_the_default_grid_is_the_papers():
    points = sweep.load_sweep(GRID)
    assert len(points) == 5 * 5
    assert {p["name"].rsplit("_", 1)[1] for p in points} == {"4096", "8192", "16384", "32768",
                                                             "65536"}


def test_print_writes_one_command_per_point(tmp_path, capsys):
    status = cli.main(["sweep", "--sweep", f"{GRID}:variants=rope,lengths=4096+8192",
                       "--launcher", "print", "--root", str(tmp_path),
                       "--config.log.every=5"])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"hybridlm train --config configs/paper.py:variant=rope,size=1b,seq_len={n},"
        f"window=4096 --workdir {tmp_path}/rope_{n} --config.train.batch_size={1048576 // n} "
        f"--config.train.steps=10000 --config.log.every=5" for n in (4096, 8192)]


def test_a_bad_point_is_named_before_anything_runs(tmp_path, capsys):
    status = cli.main(["sweep", "--sweep", f"{GRID}:variants=rope+nosuch,lengths=4096",
                       "--launcher", "local", "--root", str(tmp_path / "s")])
    assert status == 2
    err = capsys.readouterr().err
    assert "sweep point 'nosuch_4096'" in err and "nosuch" in err
    assert not (tmp_path / "s" / "rope_4096").exists(), "no point ran"


def test_slurm_writes_a_job_array_and_submits_it(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/submitted\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "s"
    assert sweep.run(f"{GRID}:variants=rope,lengths=4096+8192+16384", "slurm", root) == 0
    script = root / "sweep.sbatch"
    assert (tmp_path / "submitted").read_text().split() == [str(script)]
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and text.count("hybridlm train") == 3
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # array task 1 runs the second point (a stand-in `hybridlm` echoes its arguments)
    (bin_dir / "hybridlm").write_text("#!/bin/sh\necho \"$@\"\n")
    (bin_dir / "hybridlm").chmod(0o755)
    task = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                          env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"})
    assert task.returncode == 0, task.stderr
    assert task.stdout.split() == sweep.command(sweep.load_sweep(
        f"{GRID}:variants=rope,lengths=4096+8192+16384")[1], root)[1:]
    assert f"--workdir {root}/rope_8192" in task.stdout


def test_unknown_launcher_and_missing_action_are_user_errors(tmp_path, capsys):
    assert cli.main(["sweep", "--sweep", GRID, "--root", str(tmp_path)]) == 2
    assert "--launcher" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="choose local, slurm or print"):
        sweep.run(GRID, "ssh", tmp_path)


# ---- a real sweep ---------------------------------------------------------------------

SHARED = ["model.num_layers=1", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
          "model.head_dim=8", "model.mlp_dim=64", "model.vocab_size=300",
          "model.attention_impl=dense", "train.warmup_steps=2", "log.every=1", "eval.steps=0",
          "checkpoint.every=0"]
STEPS = 100


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def status_rows(out: str) -> dict[str, list[str]]:
    """`hybridlm sweep --status`'s table as point -> [state, step, loss, val_loss, eta]."""
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    return {row[0]: row[1:] for row in rows[1:]}


@pytest.mark.slow
def test_an_interrupted_sweep_reruns_only_what_is_left_and_summarises(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap", "shlex", "csv", "fractions", "glob", "heapq"):
        (corpus / f"{name}.py").write_text(Path(__import__(name).__file__).read_text())
    root = tmp_path / "sweep"
    spec = f"{GRID}:variants=rope,lengths=16+32+64,size=tiny,tokens_per_step=256,steps={STEPS}"
    argv = [sys.executable, "-m", "hybridlm.cli", "sweep", "--sweep", spec, "--launcher",
            "local", "--root", str(root),
            *[f"--config.{o}" for o in [*SHARED, f"data.source={corpus}",
                                        f"data.cache_dir={tmp_path / 'cache'}"]]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    names = ["rope_16", "rope_32", "rope_64"]  # one-layer models: the cheapest compiles

    # 1st run: SIGTERM to the sweep while the second point trains
    with open(tmp_path / "run1.log", "w") as log:
        first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not ((root / names[1] / "metrics.jsonl").exists()
                   and metrics(root / names[1])):
            assert first.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the second point never started training"
            time.sleep(0.05)
        live = sweep_status.status(spec, root)  # while the second point trains
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 1
    assert [live[n]["state"] for n in names] == ["done", "running", "pending"]
    assert live[names[2]]["estimated"] and live[names[2]]["eta_s"] > 0, \
        "a pending point's ETA comes from the others' speed"
    assert [r["step"] for r in metrics(root / names[0])][-1] == STEPS
    stopped_at = metrics(root / names[1])[-1]["step"]
    assert 0 < stopped_at < STEPS, "the signal must land mid-run"
    assert (root / names[1] / "checkpoints" / str(stopped_at)).is_dir()
    assert not (root / names[2]).exists()
    finished_before = (root / names[0] / "metrics.jsonl").read_bytes()

    # --status on the interrupted sweep: read from the workdirs, nothing runs
    assert cli.main(["sweep", "--sweep", spec, "--root", str(root), "--status"]) == 0
    out = capsys.readouterr().out
    assert "1 done, 0 running, 1 stopped, 0 failed, 1 pending" in out
    table = status_rows(out)
    last = metrics(root / names[0])[-1]
    assert table[names[0]][:3] == ["done", f"{STEPS}/{STEPS}", f"{last['loss']:.4g}"]
    assert table[names[1]][:2] == ["stopped", f"{stopped_at}/{STEPS}"]
    assert table[names[1]][2] == f"{metrics(root / names[1])[-1]['loss']:.4g}"
    assert table[names[2]][:3] == ["pending", f"0/{STEPS}", "-"]
    assert table[names[2]][4].startswith("~") and "remaining: ~" in out

    # 2nd run: the first point is skipped, the second resumes, the third runs; then summary
    rerun = subprocess.run([*argv, "--summarize"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    out = rerun.stdout
    assert f"[1/3] {names[0]}: trained, skipped" in out
    assert f"[2/3] {names[1]}: running" in out and f"resuming at step {stopped_at}" in out
    assert f"[3/3] {names[2]}: running" in out and out.count("starting at step 0") == 1
    assert (root / names[0] / "metrics.jsonl").read_bytes() == finished_before
    for name in names:
        assert [r["step"] for r in metrics(root / name)] == list(range(1, STEPS + 1))
    # the end of the sweep says what it made and what to run next
    assert "3 done, 0 running, 0 stopped, 0 failed, 0 pending" in out
    assert f"--root {root} --summarize --report {root / 'report.md'}" in out
    assert f"tensorboard --logdir {root}" in out and "hybridlm eval --workdir" in out

    with open(root / "summary.csv") as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert list(rows) == names
    for name in names:
        last = metrics(root / name)[-1]
        assert float(rows[name]["loss"]) == pytest.approx(last["loss"], rel=1e-12)
        assert int(rows[name]["step"]) == STEPS
    md = (root / "summary.md").read_text()
    assert all(f"| {name} |" in md for name in names)
    assert (root / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


AFTER_SWEEP = """
def get_sweep(arg=None):
    return [{"name": "a", "config": "configs/tiny.py", "train.steps": 3,
             "after": [["prepare", "--help"], ["prepare", "--help"]]}]
"""


def test_after_commands_run_once_on_a_trained_point(tmp_path, capfd):
    """A trained point (its metrics reached train.steps) gets its after-commands run, each
    once: the rerun skips them; print and slurm chain them behind the training."""
    spec = tmp_path / "after_sweep.py"
    spec.write_text(AFTER_SWEEP)
    root = tmp_path / "s"
    workdir = root / "a"
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"train": {"steps": 3}}))
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    assert sweep.run(str(spec), "local", root) == 0
    first = capfd.readouterr().out
    assert first.count("usage: hybridlm prepare") == 2 and "a: trained, skipped" in first
    assert sorted(p.name for p in (workdir / "after").iterdir()) == ["0.done", "1.done"]
    assert sweep.run(str(spec), "local", root) == 0
    assert "usage: hybridlm prepare" not in capfd.readouterr().out
    assert sweep.run(str(spec), "print", root) == 0
    line = capfd.readouterr().out.strip()
    assert line.startswith("hybridlm train --config configs/tiny.py")
    assert line.count(f"&& hybridlm prepare --help --workdir {workdir}") == 2
    with pytest.raises(ConfigError, match="no such point"):
        sweep.run(str(spec), "local", root, only="b")


STAGE_SWEEP = """
def get_sweep(arg=None):
    return [{"name": "a", "config": "configs/tiny.py", "train.steps": 3},
            {"name": "c", "config": "configs/tiny.py", "train.steps": 3},
            {"name": "a_ext", "config": "configs/tiny.py", "train.steps": 3,
             "after": [["prepare", "--help"]], "init_from": "a", "data.seq_len": 1024}]
"""


def _trained(workdir: Path) -> None:
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"train": {"steps": 3}}))
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")


def test_stages_chain_behind_their_point_and_chains_run_in_parallel(tmp_path, capfd):
    """A point with init_from starts from an earlier point's workdir and runs after it, in
    its chain; --jobs runs chains side by side; --only takes a chain's later stages along;
    slurm gets one array task per chain."""
    spec = tmp_path / "stage_sweep.py"
    spec.write_text(STAGE_SWEEP)
    root = tmp_path / "s"
    points = sweep.load_sweep(str(spec))
    assert [[p["name"] for p in c] for c in sweep.chains(points)] == [["a", "a_ext"], ["c"]]
    assert sweep.command(points[2], root)[-1] == f"--config.train.init_from={root / 'a'}"
    assert "init_from" not in " ".join(sweep.command(points[0], root))
    with pytest.raises(ConfigError, match="--only 'a_ext' starts from point 'a'"):
        sweep.run(str(spec), "local", root, only="a_ext")
    for name in ("a", "c", "a_ext"):
        _trained(root / name)
    assert sweep.run(str(spec), "local", root, jobs=2) == 0
    out = capfd.readouterr().out
    assert out.count("usage: hybridlm prepare") == 1 and (root / "a_ext/after/0.done").exists()
    assert out.index("a: trained, skipped") < out.index("a_ext: trained, skipped")
    assert sweep.run(str(spec), "local", root, only="a_ext") == 0  # its start is trained
    assert "[1/1] a_ext: trained, skipped" in capfd.readouterr().out
    assert sweep.run(str(spec), "print", root, only="a") == 0
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 2 and f"--workdir {root / 'a'} " in lines[0]
    assert f"--workdir {root / 'a_ext'} " in lines[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").chmod(0o755)
    os.environ["PATH"], path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}", os.environ["PATH"]
    try:
        assert sweep.run(str(spec), "slurm", root) == 0
    finally:
        os.environ["PATH"] = path
    text = (root / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-1" in text and "--launcher local --only a'" in text
    bad = tmp_path / "bad_sweep.py"
    bad.write_text(STAGE_SWEEP.replace('"init_from": "a"', '"init_from": "zz"'))
    with pytest.raises(ConfigError, match="starts from 'zz' .init_from., which is no earlier"):
        sweep.load_sweep(str(bad))


def fake_point(workdir: Path, steps: int, logged: int, attempt: dict | None = None) -> None:
    """A point's workdir as training leaves it: config.json, `logged` metrics rows."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(
        {"train": {"steps": steps, "batch_size": 4}, "data": {"seq_len": 16},
         "log": {"every": 1}}))
    (workdir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 - s / 10, "step_time_s": 2.0}) + "\n"
        for s in range(1, logged + 1)))
    if attempt is not None:
        (workdir / sweep.ATTEMPT).write_text(json.dumps(attempt))


def test_status_tells_failed_running_and_stopped_points_apart(tmp_path, capsys):
    """failed: the launcher saw status 1; running: its launcher (this process) is alive;
    stopped: the launcher is gone, or, unlaunched, metrics.jsonl went quiet."""
    spec = tmp_path / "four.py"
    spec.write_text("def get_sweep(arg=None):\n    return [" + ", ".join(
        f"{{'name': '{n}', 'config': 'configs/tiny.py'}}" for n in "abcd") + "]\n")
    here = {"host": socket.gethostname(), "time": time.time()}
    fake_point(tmp_path / "a", 10, 4, {**here, "state": "failed", "pid": 1, "returncode": 1})
    fake_point(tmp_path / "b", 10, 6, {**here, "state": "running", "pid": os.getpid()})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake_point(tmp_path / "c", 10, 2, {**here, "state": "running", "pid": dead.pid})
    fake_point(tmp_path / "d", 10, 3)  # started by hand or slurm: only the file's age tells
    old = time.time() - 2 * sweep_status.STALE_S
    os.utime(tmp_path / "d" / "metrics.jsonl", (old, old))
    assert cli.main(["sweep", "--sweep", str(spec), "--root", str(tmp_path), "--status"]) == 0
    table = status_rows(capsys.readouterr().out)
    assert table["a"][:3] == ["failed", "(status", "1)"] and table["a"][3] == "4/10"
    assert table["b"][:2] == ["running", "6/10"] and table["b"][-1] == "0:00:08"  # 4 x 2 s
    assert table["c"][:2] == ["stopped", "2/10"] and table["d"][:2] == ["stopped", "3/10"]
    os.utime(tmp_path / "d" / "metrics.jsonl")  # a line just now: running
    assert sweep_status.status(str(spec), tmp_path)["d"]["state"] == "running"
