"""The errors a user sees, in one leaf module that every layer imports (and that imports
nothing), so that each class exists once: `hybridlm <command>` turns them into one line on
stderr and an exit status, never a traceback.

    ConfigError      a mistake in the config or the flags           exit 2
    UserError        any other mistake the user can fix            exit 2
    CheckpointError  the checkpoints cannot continue this run       exit 2
    RunStopped       the run stopped on a condition the message     exit 1
                     explains (NaN streak, a failed save)
    Interrupted      Ctrl-C or SIGTERM before the first step       exit 128 + signal
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a config: the message names the field and what to do."""


class UserError(Exception):
    """A mistake the user can fix (a missing path, a busy workdir); the message says how."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot continue this run; the message says what to do."""


class RunStopped(RuntimeError):
    """Training stopped on a condition that is not a mistake (the loss diverged, a save
    failed); the message says what was kept and how to go on."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before training began: nothing was trained or saved; exit
    128 + the signal's number, as a shell reports a program a signal stopped."""

    def __init__(self, signal_name: str, signum: int):
        super().__init__(f"{signal_name} during start-up: stopped before the first step; "
                         "nothing was trained or saved")
        self.signum = signum
