"""SIGTERM / SIGINT stop the run after the current step, with a checkpoint of that step.

One process: a signal handler sets a flag that the loop reads after every step; during
start-up (restore, compile) the trainer reads it between phases and stops with Interrupted,
before anything is trained. Several processes must stop at the same step (a save is
collective): there JAX's preemption service (started by `jax.distributed.initialize`)
catches SIGTERM on any process and `reached_preemption_sync_point` agrees on the step;
SIGINT is forwarded to it as SIGTERM.

A second SIGINT means "now": the process leaves at once (exit 130) without saving, even in
the middle of a compile. (Python runs signal handlers only between bytecodes of the main
thread, which an XLA compile holds for minutes; so a thread woken through
`signal.set_wakeup_fd` answers instead.) Raising KeyboardInterrupt, as Python does by
default, unwound through XLA compiles and Orbax threads, and an interpreter shutting down
under those crashed (exit 139).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

from hybridlm.errors import Interrupted


class Preemption:
    """`p = Preemption().install()`; after each step `if p.reached(step)`: save and stop;
    between start-up phases `p.check_startup()`; `p.uninstall()` at the end."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.signum = 0
        self._previous: dict[int, object] = {}
        self._multi = jax.process_count() > 1
        self._wakeup: tuple[socket.socket, socket.socket, int] | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name, self.signum = signal.Signals(signum).name, signum
        if self._multi:  # JAX's preemption service owns SIGTERM: tell it
            signal.raise_signal(signal.SIGTERM)

    @staticmethod
    def _watch(reader: socket.socket) -> None:
        """Woken by each signal as it arrives: say what happens; quit on a second SIGINT."""
        interrupts = 0
        while data := reader.recv(16):
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                interrupts += signum == signal.SIGINT
                if interrupts >= 2:
                    print("hybridlm: SIGINT again: quitting now, without saving",
                          file=sys.stderr, flush=True)
                    sys.stdout.flush()
                    os._exit(128 + signal.SIGINT)
                print(f"hybridlm: {signal.Signals(signum).name}: stopping at the end of this "
                      "step or start-up phase (Ctrl-C again quits at once, without saving)",
                      file=sys.stderr, flush=True)
        reader.close()

    def install(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            signums = [signal.SIGINT] if self._multi else [signal.SIGTERM, signal.SIGINT]
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            old = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._wakeup = (reader, writer, old)
            threading.Thread(target=self._watch, args=(reader,), name="hybridlm-signals",
                             daemon=True).start()
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._wakeup is not None:
            reader, writer, old = self._wakeup
            signal.set_wakeup_fd(old)
            writer.close()  # the watcher reads EOF and ends
            self._wakeup = None

    def check_startup(self) -> None:
        """Raise Interrupted if a signal came during start-up (one process; several
        processes stop together at their first step instead)."""
        if self.signal_name is not None and not self._multi:
            raise Interrupted(self.signal_name, self.signum)

    def reached(self, step: int) -> bool:
        """True at the step where every process stops (call it after every step)."""
        if not self._multi:
            return self.signal_name is not None
        if multihost_utils.reached_preemption_sync_point(step):
            self.signal_name = self.signal_name or "SIGTERM"
            return True
        return False
