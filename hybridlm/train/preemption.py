"""SIGTERM / SIGINT stop the run after the current step, with a checkpoint of that step.

One process: a signal handler sets a flag that the loop reads after every step. Several
processes must stop at the same step (a save is collective): there JAX's preemption service
(started by `jax.distributed.initialize`) catches SIGTERM on any process and
`reached_preemption_sync_point` agrees on the step; SIGINT is forwarded to it as SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils


class Preemption:
    """`p = Preemption().install()`; after each step `if p.reached(step)`: save and stop;
    `p.uninstall()` at the end."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._multi = jax.process_count() > 1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        if self._multi:  # JAX's preemption service owns SIGTERM: tell it
            signal.raise_signal(signal.SIGTERM)

    def install(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            signums = [signal.SIGINT] if self._multi else [signal.SIGTERM, signal.SIGINT]
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def reached(self, step: int) -> bool:
        """True at the step where every process stops (call it after every step)."""
        if not self._multi:
            return self.signal_name is not None
        if multihost_utils.reached_preemption_sync_point(step):
            self.signal_name = self.signal_name or "SIGTERM"
            return True
        return False
