"""Stopping a ``PrivateLMTrainer`` run cleanly: Ctrl-C (SIGINT) or SIGTERM asks to stop at the end of the current
step, the ranks agree on it once per step, and the run then writes its SECRET checkpoint at that step boundary and
raises ``TrainingInterrupted``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Dict, Iterator

import torch

from dptrain import distributed

logger = logging.getLogger(__name__)

__all__ = ["TrainingInterrupted", "stop_requests", "stop_agreed", "interrupted_error"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training; the message says what was saved and how to continue."""


@contextlib.contextmanager
def stop_requests(world: int) -> Iterator[Dict[str, bool]]:
    """While training, Ctrl-C (SIGINT) and SIGTERM ask to stop at the end of the current step, so that the
    checkpoint is written at a step boundary. Single process: a second Ctrl-C quits at once, without saving.
    (Under torchrun the launcher forwards Ctrl-C to every rank, so repeats are ignored there.) Only in the main
    thread, and only where the default handlers are installed. Yields ``{"requested": bool}``."""
    stop = {"requested": False}
    mine = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if mine else {}
    ours = {sig for sig, h in previous.items() if h in (signal.default_int_handler, signal.SIG_DFL)}

    def handler(signum, frame):
        if stop["requested"] and world == 1 and signum == signal.SIGINT:
            raise TrainingInterrupted("interrupted again: quit without saving (the last periodic checkpoint, if any, "
                                      "is still there)")
        if not stop["requested"]:
            logger.warning("stopping at the end of this step to write the checkpoint%s",
                           " (Ctrl-C again to quit without saving)" if world == 1 else "")
        stop["requested"] = True

    for sig in ours:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig in ours:
            signal.signal(sig, previous[sig])


def stop_agreed(stop: Dict[str, bool], device: torch.device) -> bool:
    """Whether any rank was asked to stop (single process: this one); a collective under torchrun."""
    if distributed.rank_and_world()[1] == 1:
        return stop["requested"]
    flag = torch.tensor([1.0 if stop["requested"] else 0.0], device=device)  # (1,)
    return bool(distributed.all_reduce_sum([flag])[0].item() > 0)


def interrupted_error(step: int, total_steps: int, checkpoint_path) -> TrainingInterrupted:
    """The error a stopped run raises: where it stopped, and what was saved (nothing without ``checkpoint_path``)."""
    return TrainingInterrupted(
        f"interrupted after step {step}/{total_steps}: " + (
            f"checkpoint saved to {checkpoint_path} (SECRET); continue with the same command plus --resume"
            if checkpoint_path is not None else "no output folder, nothing saved"))
