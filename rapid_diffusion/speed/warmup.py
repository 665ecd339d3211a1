"""Background warm-up: a domain whose level compiles serves at once on the eager pipeline and
swaps the optimised one in when it is ready.

The optimised pipeline is built on a copy of the loaded one, by one worker thread per device
(two compilations at once would only slow each other down and double the peak memory), and
swapped in under the model's lock, after its warm-up: a request runs either wholly on the
eager pipeline or wholly on the optimised one, never on a half-built one. While it builds, the
copy costs one more set of weights in memory.
"""

from __future__ import annotations

import atexit
import copy
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

STATES = ("eager", "compiling", "compiled", "failed")
FAILURE_MARKERS = ("failed", "; using level", "; plain diffusers")  # fallbacks logged by levels.py


@dataclass(frozen=True)
class Acceleration:
    """What a domain runs on: ``eager`` (plain), ``compiling`` (eager until the swap),
    ``compiled`` (the optimised pipeline serves), ``failed`` (stays eager; ``reason`` says why)."""

    state: str
    level: str
    applied: str = "none"
    reason: str = ""

    def as_dict(self) -> dict:
        return {"state": self.state, "level": self.level, "applied": self.applied, "reason": self.reason}


def outcome(level: str, applied: str, messages: list[str]) -> Acceleration:
    """The state after :func:`~rapid_diffusion.speed.levels.apply_optimization` logged ``messages``."""
    failures = [m for m in messages if any(marker in m for marker in FAILURE_MARKERS)]
    if applied == "none":
        state = "failed" if level != "none" and failures else "eager"
    else:
        state = "failed" if failures else "compiled"
    return Acceleration(state, level, applied, failures[-1] if failures else "")


class Warmer:
    """One daemon thread per device that runs optimisation jobs one after another.

    At interpreter exit, queued jobs are dropped and a running one is waited for: native
    compilers (OpenVINO's thread pool, inductor) abort the process if it finalises under them.
    """

    def __init__(self, name: str):
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._idle = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"warm-up {name}", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                with self._idle:
                    if not self._closing.is_set():
                        job()
            except Exception:  # a job reports its own failures; this keeps the worker alive
                log.exception("background warm-up failed")
            finally:
                self._jobs.task_done()

    def close(self) -> None:
        """Drop queued jobs and wait for the running one (called at exit)."""
        self._closing.set()
        with self._idle:
            pass

    def wait(self) -> None:
        """Block until every submitted job is done (tests, benchmarks, one-shot commands)."""
        self._jobs.join()


_warmers: dict[str, Warmer] = {}
_warmers_lock = threading.Lock()


@atexit.register
def _close_warmers() -> None:
    with _warmers_lock:
        warmers = list(_warmers.values())
    for warmer in warmers:
        warmer.close()


def warmer_for(device) -> Warmer:
    key = str(device)
    with _warmers_lock:
        if key not in _warmers:
            _warmers[key] = Warmer(key)
        return _warmers[key]


def build_optimised(model, optimise: Callable[[object, Callable[[str], None]], str], progress: Callable[[str], None]) -> None:
    """Copy ``model``'s eager pipeline, optimise the copy, then swap it in (if still loaded)."""
    with model.lock:
        if model.pipe is None:
            return
        pipe = copy.deepcopy(model.pipe)
    messages: list[str] = []

    def record(message: str) -> None:
        messages.append(message)
        progress(message)

    level = model.acceleration.level
    try:
        applied = optimise(pipe, record)
    except Exception as exc:  # any failure leaves the eager pipeline serving, with the reason shown
        record(f"optimisation failed ({type(exc).__name__}: {str(exc)[:200]})")
        applied = "none"
    result = outcome(level, applied, messages)
    with model.lock:
        if model.pipe is None:
            return
        if applied != "none":
            model.pipe = pipe
            model.optimization = applied
        model.acceleration = result
    progress(f"acceleration of {model.key}: {result.state} ({applied})")
