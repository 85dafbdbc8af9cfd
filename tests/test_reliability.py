"""A run that cannot be bricked (issue 23): one class per error and one exit path, the
workdir lock, history that is never overwritten, no TPU probe without a TPU, launch/local.sh
when a process dies, `prepare --out` that leaves nothing behind; and the user's mistakes in
fresh processes, each one line on stderr and exit status 2, never a traceback.

Checkpoint fallback, concurrent runs, the history refusal and a full disk with real training
subprocesses: tests/test_checkpoint_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import util
from pathlib import Path

import pytest

from hybridlm import cli, config, errors, platforms
from hybridlm.train import checkpoint, metrics
from hybridlm.train import workdir as workdir_lib

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/paper.py:variant=rnope_swa,window=5", "--config.model.d_model=32",
        "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
        "--config.model.head_dim=8", "--config.model.mlp_dim=64",
        "--config.model.vocab_size=300", "--config.model.attention_impl=dense",
        "--config.data.seq_len=16", "--config.train.batch_size=8", "--config.train.steps=4"]


def one_line_error(capsys, code: int) -> str:
    """The one line on stderr (besides progress bars) of a mistake."""
    err = "\n".join(line for line in capsys.readouterr().err.splitlines()
                    if line.strip() and not line.lstrip("\r").startswith("prepare "))
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("hybridlm: error: ")
    return err


# ---- one class per error -------------------------------------------------------------
def test_each_error_class_exists_once_in_the_leaf_module():
    assert config.ConfigError is errors.ConfigError  # configs/*.py import it from config
    assert checkpoint.CheckpointError is errors.CheckpointError
    assert cli.UserError is errors.UserError
    from hybridlm.train.trainer import NonFiniteLoss

    assert issubclass(NonFiniteLoss, errors.RunStopped)


# ---- the user's mistakes, in process (the same exit path as the CLI) --------------------
def test_mistakes_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "bad.py").write_text("def get_config(arg=None)\n    return None\n")
    (tmp_path / "sweep.py").write_text("def get_sweep(arg=None):\n    return [\n")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/config.json").write_text('{"model_type": "cohere2",\n')
    (tmp_path / "file").write_text("x")
    (tmp_path / "one").mkdir()
    (tmp_path / "one/doc.txt").write_text("the only document of this corpus")
    missing = str(tmp_path / "none")
    cases = [
        (["train", "--config", str(tmp_path / "bad.py")], "bad.py:1: syntax error"),
        (["sweep", "--sweep", str(tmp_path / "sweep.py"), "--launcher", "print"],
         "sweep.py:2: syntax error: '[' was never closed"),
        (["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "o")],
         "config.json is not valid JSON"),
        (["prepare", "--out", str(tmp_path / "file")], "is not a directory"),
        (["generate", "--workdir", missing, "--prompt", "hi"], f"--workdir {missing} does not"),
        (["eval", "--workdir", missing, "--task", "ppl"], "does not exist"),
        (["analyze", "--workdir", missing], "does not exist"),
        (["train", *TINY, "--workdir", str(tmp_path / "file")], "is a file, not a directory"),
        (["train", *TINY, "--workdir", str(tmp_path / "file/sub")], "cannot be created"),
        (["train", *TINY, f"--config.data.source={tmp_path / 'one'}", "--config.eval.steps=1",
          f"--config.data.cache_dir={tmp_path / 'cache'}", "--workdir", str(tmp_path / "w")],
         "has no validation documents (1 documents, val_fraction 0.02, min_doc_tokens 0); "
         "raise data.val_fraction, or train without validation with eval.steps=0"),
    ]
    for argv, message in cases:
        assert message in one_line_error(capsys, cli.main(argv)), argv


# ---- JAX and libtpu ---------------------------------------------------------------------
def test_without_a_tpu_jax_platforms_names_the_platforms_that_can_exist():
    assert platforms.platforms_without_tpu([], has_kfd=False) == "cpu"
    assert platforms.platforms_without_tpu(["xla_cuda12"], has_kfd=False) == "cuda,cpu"
    assert platforms.platforms_without_tpu(["xla_rocm7", "xla_cuda13"], True) == "rocm,cuda,cpu"
    assert platforms.platforms_without_tpu(["some_vendor"], has_kfd=False) is None
    for asked in ({"JAX_PLATFORMS": ""}, {"TPU_ACCELERATOR_TYPE": "v5p-8"},
                  {"JAX_FORCE_TPU_INIT": "1"}):
        env = dict(asked)
        assert platforms.skip_absent_tpu(env) is None and env == asked, "the user's choice"
    env: dict[str, str] = {}
    chosen = platforms.skip_absent_tpu(env)
    if util.find_spec("libtpu") is None or platforms.tpu_may_be_here(env):
        assert chosen is None and env == {}
    else:  # this machine: libtpu installed (the tpu extra), no TPU
        assert chosen is not None and chosen.endswith("cpu") and env["JAX_PLATFORMS"] == chosen


# ---- the workdir: lock and history --------------------------------------------------------
def test_the_workdir_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path, capsys):
    first = workdir_lib.WorkdirLock.acquire(tmp_path)
    with pytest.raises(errors.UserError, match=rf"in use by another run \(pid {os.getpid()} "):
        workdir_lib.WorkdirLock.acquire(tmp_path)
    first.release()
    assert (tmp_path / ".lock").read_text() == "", "a clean exit clears the record"
    workdir_lib.WorkdirLock.acquire(tmp_path).release()
    assert "taking over" not in capsys.readouterr().out
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / ".lock").write_text(json.dumps(  # what a SIGKILLed holder leaves
        {"host": os.uname().nodename, "pid": int(dead), "started": "then", "command": "x"}))
    workdir_lib.WorkdirLock.acquire(tmp_path).release()
    assert f"taking over the lock of {tmp_path} from pid {dead}" in capsys.readouterr().out


def test_a_run_that_would_not_resume_refuses_and_restart_moves_the_old_run_aside(tmp_path,
                                                                                 capsys):
    from tests.train_helpers import tiny_config

    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    (run / "config.json").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    checkpoints = run / "checkpoints"
    for overrides in (["checkpoint.enabled=False"], []):  # no checkpoint to resume either
        with pytest.raises(errors.UserError, match="--restart to move the old run aside"):
            workdir_lib.claim(tiny_config(*overrides), run, checkpoints)
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == \
            {**before, ".lock": b""}, "nothing changed"
    lock = workdir_lib.claim(tiny_config(), run, checkpoints, restart=True)
    lock.release()
    [old] = tmp_path.glob("run.old-*")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before
    assert (old / "tb").is_dir()

    # the same config, killed before its first checkpoint (step 100): an attempt that
    # resumes at step 0, not another run (an unattended restart must not be stuck)
    cfg = tiny_config("train.steps=300", "checkpoint.every=100")
    config.save(cfg, run / "config.json")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 99, "loss": 4}\n')
    workdir_lib.claim(cfg, run, checkpoints).release()
    assert "stopped before its first checkpoint; starting over from step 0" in \
        capsys.readouterr().out
    (run / "metrics.jsonl").write_text('{"step": 100, "loss": 4.0}\n')  # checkpoints deleted
    with pytest.raises(errors.UserError, match="no checkpoint to resume from"):
        workdir_lib.claim(cfg, run, checkpoints)


def test_a_resume_sets_the_rows_after_its_checkpoint_aside_not_away(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(rows) + '{"step": 7, "lo')  # the last line cut by a kill
    metrics.set_aside_rows_after(path, 4)
    assert path.read_text() == "".join(rows[:4])
    assert (tmp_path / "metrics.superseded.jsonl").read_text() == \
        "".join(rows[4:]) + '{"step": 7, "lo\n'


def test_no_start_without_disk_space_for_one_checkpoint(tmp_path, capsys):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(errors.UserError, match=r"MiB free, and one checkpoint of this model "
                       r"takes about .* MiB: free some space, or point --config.checkpoint.dir"):
        workdir_lib.check_disk_space(tmp_path / "checkpoints", free, keep=3)
    workdir_lib.check_disk_space(tmp_path / "checkpoints", free // 3, keep=3)
    assert "checkpoint.keep=3 keeps 4 at a time" in capsys.readouterr().out


# ---- prepare --out ----------------------------------------------------------------------
def test_a_failed_prepare_out_leaves_no_temporary_folder(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"text": "a document"}\n{"text": \n')  # line 2 bad
    out = tmp_path / "prepared"
    out.mkdir()
    code = cli.main(["prepare", "--source", f"jsonl:{tmp_path / 'c.jsonl'}", "--out", str(out),
                     "--quiet", f"--config.data.cache_dir={tmp_path / 'cache'}"])
    assert "c.jsonl:2" in one_line_error(capsys, code)
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == {"c.jsonl", "prepared"}
    assert out.is_dir() and not any(out.iterdir()), "the user's empty directory stays"


# ---- launch/local.sh --------------------------------------------------------------------
FAKE = """
import os, signal, sys, time
i = int(sys.argv[sys.argv.index("--process_id") + 1])
workdir = sys.argv[sys.argv.index("--workdir") + 1]
open(os.path.join(workdir, f"pid{i}"), "w").write(str(os.getpid()))
if i == 1:
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as process 0 waiting in a collective
time.sleep(120)
"""


def test_local_sh_stops_the_others_at_once_when_a_process_is_killed(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE)
    env = {**os.environ, "HYBRIDLM": f"{sys.executable} {tmp_path / 'fake.py'}"}
    start = time.monotonic()
    result = subprocess.run(["bash", "launch/local.sh", "2", "--workdir", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGKILL, result.stderr
    assert "process 1 was killed by SIGKILL (status 137); stopping the others now" \
        in result.stderr
    assert "Killed" not in result.stderr.replace("killed by", "")
    assert time.monotonic() - start < 30, "not the heartbeat timeout"
    pid0 = int((tmp_path / "pid0").read_text())
    assert not Path(f"/proc/{pid0}").exists() or \
        Path(f"/proc/{pid0}/stat").read_text().split()[2] == "Z"


# ---- fresh processes: the re-executed entry point, racy exits, Ctrl-C -------------------
def hybridlm(*args: str, module: str = "hybridlm", **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                              "JAX_PLATFORMS")}
    environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", **env)
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_mistakes_in_fresh_processes_end_in_one_line(tmp_path):
    """Without GLIBC_TUNABLES the entry point re-executes itself (once the cause of a
    `__main__.UserError` traceback); without JAX_PLATFORMS nothing of libtpu may show (the
    tpu extra is installed); a bad data.source, five times over (it was followed, 1 run in
    3, by an Orbax thread's traceback at exit)."""
    missing = str(tmp_path / "none")
    probes = [(hybridlm("generate", "--workdir", missing, "--prompt", "hi"),
               f"--workdir {missing} does not exist")]
    probes += [(hybridlm("train", *TINY, "--config.data.source=/nonexistent", "--workdir",
                         str(tmp_path / f"s{i}")), "data.source 'text:/nonexistent': no such")
               for i in range(5)]
    for proc, message in probes:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        assert err.count("\n") == 1 and message in err, err[-2000:]
        assert "Traceback" not in err and "TPU" not in out + err, out + err


@pytest.mark.slow
def test_ctrl_c_twice_during_start_up_quits_at_once_without_a_traceback(tmp_path):
    proc = hybridlm("train", *TINY, "--workdir", str(tmp_path / "w"))
    for line in proc.stdout:  # the compile follows the mesh: still starting up
        if line.startswith("mesh:"):
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    # the second Ctrl-C quits at once; unless the first already ended start-up between two
    # of its phases, before the second came
    assert ("SIGINT again: quitting now, without saving" in err
            or "SIGINT during start-up: stopped before the first step" in err), err
    assert "Traceback" not in err and "step 1/" not in out, out + err
