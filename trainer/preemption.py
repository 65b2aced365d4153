"""Preemption and time limits: on SIGTERM or SIGUSR1 every rank stops after one agreed step, the
run saves that step and exits with EXIT_CODE, and `train.resume=auto` continues from it.

Who sends what: Slurm sends SIGUSR1 to slurm/train.sbatch's batch shell before the time limit
(`--signal=B:USR1@120`), which passes it on as SIGTERM to torchrun and the ranks; Slurm sends
SIGTERM itself when it preempts or cancels a job; torchrun's agent, told to stop (SIGTERM), passes
the signal to its workers and waits for them. A signal sent to the workers alone (one rank, say)
works the same, and then torchrun --max-restarts restarts them on exit code 75. The handler only
notes the signal; the loop acts on it between steps.

Ranks may get the signal at different times (one node before another, one rank only), so they
agree on the step to stop at, without a host sync in any step:

    each step, every rank:  flags (1 per signal this rank got) -> all-reduce sum -> counts   # collective
                            copied back without blocking (trainer/step.py's ReadBack)
    counts issued after step t are read after step t+1: every rank reads the same counts at the same
    step, so all stop after step t+1 (the first check is read at once, so a signal during start-up
    stops the run before its first step).

On one process there is nothing to agree on: the run stops after the step the signal came in.
At the agreed step the loop settles its deferred steps, checkpoints every part (an async save
committed), closes loggers and the process group, and `Preempted` ends the process with EXIT_CODE.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch

from trainer.parallel.base import Strategy
from trainer.step import ReadBack

log = logging.getLogger("trainer")

# EX_TEMPFAIL (sysexits.h): "a temporary failure; try again". Distinct from the trainer's own codes
# (1 a crash, 2 a config error, 3 a TrainingError) and from death by a signal (128 + n). torchrun
# --max-restarts restarts the workers on it (like on any non-zero exit), slurm/train.sbatch requeues
# the job after a USR1; either way train.resume=auto continues from the checkpoint.
EXIT_CODE = 75


class Preempted(SystemExit):
    """The run stopped for a signal after saving its checkpoint: the process exits with EXIT_CODE."""


@dataclass
class Stop:
    """The agreed stop: which signals arrived (name -> ranks that got it), after which step."""

    signals: dict[str, int]
    step: int
    world_size: int

    def describe(self) -> str:
        names = "/".join(self.signals)
        if self.world_size == 1:
            return names
        ranks = max(self.signals.values())
        return f"{names} (on {ranks} of {self.world_size} ranks)"


class Preemption:
    """Handlers for the signals that stop a run (train.preemption_signals) and the per-step
    agreement on when to stop. `install` before building the run, `agreed` once per step on every
    rank, `restore` at the end."""

    def __init__(self, signals: Sequence[str]) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.received: dict[signal.Signals, None] = {}  # in order of arrival, noted by the handler
        self.reported: set[signal.Signals] = set()
        self.previous: dict[signal.Signals, object] = {}
        self.pending: ReadBack | None = None  # the counts issued at the last check

    def install(self) -> Preemption:
        """Take over the signals (only the main thread may; elsewhere, e.g. a benchmark's thread,
        the signals keep their handlers)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def restore(self) -> None:
        """Give the signals back the handlers they had before `install`."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received.setdefault(signal.Signals(signum), None)  # nothing else here: the loop acts on it

    def agreed(self, strategy: Strategy, step: int) -> Stop | None:
        """Whether every rank stops now, after `step`. Call it on every rank before every step
        (collective on several ranks: one all-reduce of a few numbers, read back a step later)."""
        if not self.signals:  # train.preemption_signals=[]: nothing to agree on
            return None
        self._report(strategy, step)
        local = [1.0 if sig in self.received else 0.0 for sig in self.signals]
        if strategy.world_size == 1:
            counts = local
        else:
            flags = torch.zeros(len(self.signals), device=strategy.device)
            for index, got in enumerate(local):
                if got:
                    flags[index] = got  # a fill on the device: no copy from the host
            issued = ReadBack(strategy.all_reduce_sum(flags, world=True))  # collective
            # The first check is read at once (host sync, before any step); later ones a step after
            # they were issued, when the copy is long done unless the device runs a step behind.
            counts = (self.pending or issued).values()
            self.pending = issued
        if not any(counts):
            return None
        arrived = {sig.name: int(count) for sig, count in zip(self.signals, counts, strict=True) if count}
        return Stop(arrived, step, strategy.world_size)

    def _report(self, strategy: Strategy, step: int) -> None:
        """Log each signal this rank got, once, at the first check after it came."""
        for sig in self.received:
            if sig in self.reported:
                continue
            self.reported.add(sig)
            where = f" on rank {strategy.rank}" if strategy.world_size > 1 else ""
            when = "after a step every rank agrees on, within two" if strategy.world_size > 1 else "after this step"
            log.warning(
                f"{sig.name}{where} after step {step}: stopping {when}, to save a checkpoint and exit with "
                f"code {EXIT_CODE} for a restart / requeue"
            )

    def exit(self, stop: Stop, saved: tuple[Path, bool] | None, first_step: int) -> Preempted:
        """Log what the run did and give back the handlers; the Preempted to raise (exit code 75).
        saved: the checkpoint of the step and whether it was written now (None: at step 0, none)."""
        self.restore()
        before = " before the first step" if stop.step < first_step else ""
        if saved is None:
            what, then = "nothing trained, nothing saved", "starts from step 0"
        else:
            path, now = saved
            what = f"saved step {stop.step} to {path}" if now else f"step {stop.step} is saved in {path}"
            then = "continues"
        log.warning(
            f"{stop.describe()}{before}: {what}, exiting with code {EXIT_CODE} for requeue; train.resume=auto {then}"
        )
        return Preempted(EXIT_CODE)

    def finished(self, step: int) -> None:
        """At the end of a run that was not stopped: a signal that came during its last step or
        its end (final checkpoint, weights) changes nothing, the run is complete (exit code 0)."""
        self.restore()
        if self.received:
            names = "/".join(sig.name for sig in self.received)
            log.warning(f"{names} came at the end of the run: step {step}, the last, is saved; the run is complete")
