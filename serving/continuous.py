"""A thread that drives a :class:`~vpsde.runtime.scheduler.StepScheduler` for a server: requests are handed in from
any thread with a reply callback, the loop ticks while there is work, and each request's callback gets its samples
(its log-likelihoods, for a likelihood bundle) or its one-line error as soon as its last row finishes.
Transport-free: the Triton model (``triton_model.py``) passes callbacks that send Triton responses."""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from vpsde.runtime.errors import VpsdeError
from vpsde.runtime.request import Request
from vpsde.runtime.scheduler import Job, StepScheduler

CANCEL_POLL_S = 0.1
"""How often the loop asks whether its requests' clients went away."""

REPORT_S = 0.1
"""How often, at most, the loop reports its status while it has work (and once as it falls idle)."""

Reply = Callable[[np.ndarray | None, str | None], None]
"""reply(result, None) or reply(None, one-line error); the result is :class:`Job`'s (samples float32
[num, *sample_shape], or log p float64 [num])."""


class ContinuousLoop:
    """Owns ``scheduler`` on one background thread (the scheduler is not thread-safe; only this thread ticks it)."""

    def __init__(self, scheduler: StepScheduler, on_tick: Callable[[dict[str, int]], None] = lambda status: None) -> None:
        """``on_tick(status())`` is called from the loop's thread when the status changed, at most every
        :data:`REPORT_S` while there is work and once as the loop falls idle (metrics)."""
        self.scheduler, self.on_tick = scheduler, on_tick
        self._inbox: list[tuple[Request, np.ndarray | None, Reply, Callable[[], bool]]] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vpsde-continuous", daemon=True)
        self._thread.start()

    def submit(self, request: Request, reply: Reply, cancelled: Callable[[], bool] = lambda: False,
               data: np.ndarray | None = None) -> None:
        """Queue ``request`` (checked; a likelihood bundle's with its checked ``data``, as
        :meth:`StepScheduler.submit`); ``reply`` is called once, from the loop's thread; ``cancelled()`` is polled
        every :data:`CANCEL_POLL_S` (a client that went away frees its rows)."""
        with self._wake:
            self._inbox.append((request, data, reply, cancelled))
            self._wake.notify()

    def status(self) -> dict[str, int]:
        """Rows in flight and rows waiting (a snapshot)."""
        return {"slots": self.scheduler.slots, "busy": self.scheduler.busy, "queued": self.scheduler.queued}

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=60)
        self.scheduler.close()

    def _run(self) -> None:
        sched = self.scheduler
        next_poll = next_report = 0.0
        reported: dict[str, int] | None = None
        while True:
            with self._wake:
                while not self._inbox and sched.idle and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                arrived, self._inbox = self._inbox, []
            for request, data, reply, cancelled in arrived:
                try:
                    sched.submit(request, tag=(reply, cancelled), data=data)
                except VpsdeError as e:  # a full queue (or data that does not fit): this request only
                    _send(reply, None, str(e))
            if time.monotonic() >= next_poll:  # asking the server costs a round trip per request: not every tick
                next_poll = time.monotonic() + CANCEL_POLL_S
                for job in list(sched.jobs):
                    if not job.done and job.tag[1]():
                        sched.cancel(job)
                        _send(job.tag[0], None, "request cancelled by the client")
            try:
                finished = sched.tick()
            except Exception as e:  # noqa: BLE001 - a backend failure fails what is in flight, not the server
                finished = self._fail_all(f"{type(e).__name__}: {e}")
            for job in finished:
                self._reply(job)
            status = self.status()  # reported when it changed, at most every REPORT_S while busy (a gauge costs IPC)
            if status != reported and (sched.idle or time.monotonic() >= next_report):
                self.on_tick(status)
                reported, next_report = status, time.monotonic() + REPORT_S

    def _reply(self, job: Job) -> None:
        if job.error is not None:
            _send(job.tag[0], None, str(job.error))
        else:
            _send(job.tag[0], job.result, None)

    def _fail_all(self, message: str) -> list[Job]:
        failed = [j for j in self.scheduler.jobs if not j.done]
        for job in failed:
            job.error = VpsdeError(message)
            self.scheduler.cancel(job)
        return failed


def _send(reply: Reply, samples: np.ndarray | None, message: str | None) -> None:
    """Call ``reply``; a transport that fails (a client gone mid-send) fails that response only, not the loop."""
    try:
        reply(samples, message)
    except Exception as e:  # noqa: BLE001
        print(f"vpsde: a response could not be sent: {type(e).__name__}: {e}", flush=True)
