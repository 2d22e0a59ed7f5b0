"""What the step-time benchmarks share: a worker process per method that answers tagged JSON lines
(``WorkerProcess`` / ``reply``), one prepared training step of a causal LM under each method (non-DP, dptrain,
Opacus), steps timed back to back, the rotating order of a round, and the peak-memory counters of a process (RSS, and
the bytes malloc has handed out)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # worker processes run from here, as ``python -m benchmarks.<name>``
_TAG = "@@ "  # marks protocol lines on a worker's stdout (libraries may print there too)


# ----------------------------------------------------------------------------------------------- worker processes
def module_command(module: str, *args: str) -> list:
    """The command that runs ``benchmarks.<module>`` in a fresh interpreter (with ``cwd=ROOT``)."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def reply(message: dict) -> None:
    """Worker side: send ``message`` to the parent's ``WorkerProcess.ask``."""
    print(_TAG + json.dumps(message), flush=True)


class WorkerProcess:
    """``python -m benchmarks.<module> *args`` in its own process, answering each ``ask`` with one ``reply``."""

    def __init__(self, module: str, *args: str, env: dict | None = None):
        self._stderr = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill up and block the worker
        self._proc = subprocess.Popen(module_command(module, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        self.error: str | None = None

    def ask(self, command: str | None = None) -> dict:
        """Send ``command`` (None: just read) and wait for the reply; a dead worker answers ``{"error": <its last
        stderr line>}``, now and for every later question."""
        if self.error is None:
            try:
                if command is not None:
                    self._proc.stdin.write(command + "\n")
                    self._proc.stdin.flush()
                for line in self._proc.stdout:
                    if line.startswith(_TAG):
                        return json.loads(line[len(_TAG):])
            except BrokenPipeError:
                pass
            self._proc.wait()
            self._stderr.seek(0)
            self.error = (self._stderr.read().strip().splitlines() or ["failed"])[-1][:200]
        return {"error": self.error}

    def close(self) -> None:
        """Wait for the worker to exit (its stdin closed) and drop its captured stderr."""
        try:
            self._proc.stdin.close()
        except BrokenPipeError:  # the worker died with a command still buffered
            pass
        self._proc.wait()
        self._stderr.close()


# ----------------------------------------------------------------------------------------------- one training step
def make_method(method: str, model, optimizer, loader):
    """``(model, optimizer, criterion)`` for ``method``: "nondp", "dptrain-<clipping>[-secure]" or "opacus-<mode>"
    (sigma = 1, C = 1, the loader's fixed batches); ``criterion`` is Opacus ghost clipping's loss wrapper, else None."""
    if method.startswith("dptrain"):
        import dptrain

        model, optimizer, _ = dptrain.PrivacyEngine(secure_mode=method.endswith("-secure")).make_private(
            module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=1.0, noise_multiplier=1.0,
            poisson_sampling=False, loss_reduction="mean", clipping=method.split("-")[1])
        return model, optimizer, None
    if method.startswith("opacus"):
        import warnings

        import torch
        from opacus import PrivacyEngine as OpacusEngine

        warnings.filterwarnings("ignore")
        mode = method.split("-")[1]
        criterion = torch.nn.CrossEntropyLoss()
        out = OpacusEngine().make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                          noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                          grad_sample_mode=mode)
        return out[0], out[1], out[2] if mode == "ghost" else None
    if method != "nondp":
        raise ValueError(f"method must be nondp, dptrain-<clipping> or opacus-<mode>, found {method!r}")
    return model, optimizer, None


def lm_step(model, optimizer, criterion, batch_ids, vocab: int, **model_kwargs):
    """A function running one training step on ``batch_ids`` (B, T): the mean over samples of each sample's mean
    next-token loss, backward, optimizer step."""
    import torch.nn.functional as F

    batch = batch_ids.shape[0]

    def step():
        logits = model(input_ids=batch_ids, **model_kwargs).logits[:, :-1]  # (B, T-1, V)
        targets = batch_ids[:, 1:]
        if criterion is not None:  # Opacus ghost clipping: its loss wrapper runs the second backward
            loss = criterion(logits.reshape(-1, vocab), targets.reshape(-1), shape=logits.shape)
        else:
            per_token = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none")
            loss = per_token.view(batch, -1).mean(1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def prepared_lm_step(method: str, model, optimizer, ids, batch: int, device: str = "cpu", **model_kwargs):
    """The training step of ``model`` under ``method`` on the first ``batch`` rows of ``ids`` (N, T), after two
    untimed steps (set-up: lazy buffers, first-call costs). The engines see ``ids`` in fixed batches of ``batch``."""
    from torch.utils.data import DataLoader, TensorDataset

    vocab = model.config.vocab_size
    loader = DataLoader(TensorDataset(ids), batch_size=batch)
    model, optimizer, criterion = make_method(method, model, optimizer, loader)
    step = lm_step(model, optimizer, criterion, ids[:batch].to(device), vocab, **model_kwargs)
    step()
    step()
    return step


# ----------------------------------------------------------------------------------------------- timing
def timed(fn):
    """``(fn(), seconds it took)``."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def time_steps(step, count: int, sync=None) -> list:
    """Seconds of each of ``count`` calls of ``step``, back to back as a training loop runs them (no pause);
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs inside each timing, after the step."""

    def synced_step():
        step()
        if sync is not None:
            sync()

    return [timed(synced_step)[1] for _ in range(count)]


def rotation(items: list, turn: int) -> list:
    """``items`` started at position ``turn`` (mod its length): over a round every item takes every place, so a
    slow or quick phase of a shared machine hits all of them alike."""
    shift = turn % len(items)
    return items[shift:] + items[:shift]


# ----------------------------------------------------------------------------------------------- memory
def proc_status_bytes(field: str) -> int:
    """Bytes of a memory field of this process's /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_rss_peak() -> None:
    """Restart this process's peak-RSS counter (Linux VmHWM) at the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_peak_mb() -> float:
    """This process's peak RSS since the last reset, MB."""
    return proc_status_bytes("VmHWM") / 2**20


@functools.lru_cache(maxsize=None)
def _mallinfo2():
    """glibc's ``mallinfo2`` (2.33 and later), returning its struct."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    function = ctypes.CDLL("libc.so.6").mallinfo2
    function.restype = MallInfo2
    return function


def heap_in_use_bytes() -> int:
    """Bytes glibc's malloc has handed out and not got back (heap chunks in use plus mmapped chunks), the CPU
    counterpart of ``torch.cuda.memory_allocated``: unlike RSS, not what the allocator keeps after a free."""
    info = _mallinfo2()()
    return info.uordblks + info.hblkhd


def heap_peak_mb(run, interval_s: float = 2e-4) -> float:
    """The largest ``heap_in_use_bytes`` (MB) seen while ``run()`` runs, sampled by a thread every ``interval_s``
    (torch ops release the GIL, so it samples inside them): peaks shorter than the interval can be missed, and the
    sampling steals time, so ``run`` must not be a timed step."""
    peak, done = [heap_in_use_bytes()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], heap_in_use_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], heap_in_use_bytes()) / 2**20
