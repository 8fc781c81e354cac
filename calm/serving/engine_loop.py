"""The engine thread: the one thread that owns the Scheduler (which is not thread-safe).

HTTP handlers, on the asyncio loop, `submit` requests and `cancel` them through a thread-safe command
queue; the engine thread adds them to the scheduler, runs `step()` while any request is live, and hands
each request's token events to its own asyncio queue (loop.call_soon_threadsafe). Admission is bounded:
at most max_batch running plus max_queue waiting, beyond that `submit` raises QueueFull (a 429).

A request whose exit plan (measure and layers) differs from the batch's waits here until the batch's
exiting rows have left, instead of failing. If a step raises, every live request gets the error and the
scheduler is built afresh, so one failure never stops the server."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from calm.engine.scheduler import Request, Scheduler
from calm.errors import PolicyError

logger = logging.getLogger("calm")


class QueueFull(Exception):
    """The server holds as many requests as --max-batch and --max-queue allow."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass(frozen=True)
class Update:
    """What one step gave one request: new tokens, their exit layers, and why it ended (None: it goes on).
    speculative: the tokens came from a speculative cycle, which verified `drafted` drafts for it. error: the
    request failed (finish_reason "error")."""

    tokens: tuple[int, ...]
    exit_layers: tuple[int, ...]
    finish_reason: str | None = None
    speculative: bool = False
    error: str | None = None
    drafted: int = 0


@dataclass(eq=False)
class Job:
    """One submitted request, as both threads see it."""

    request: Request
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue[Update] = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    scheduler_id: int | None = None  # engine thread only
    started: bool = False  # engine thread only: its prefill token was sent
    cancelled: bool = False

    def send(self, update: Update) -> None:
        """From the engine thread: hand an update to the request's asyncio queue."""
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, update)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


class EngineLoop:
    """Owns the scheduler in a thread of its own. make_scheduler builds it (again after a failure)."""

    def __init__(self, make_scheduler: Callable[[], Scheduler], max_batch: int, max_queue: int) -> None:
        self.make_scheduler, self.capacity = make_scheduler, max_batch + max_queue
        self.scheduler = make_scheduler()
        self.commands: queue.SimpleQueue[tuple[str, Job | None]] = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}  # scheduler id -> job (engine thread only)
        self.deferred: list[Job] = []  # jobs whose exit plan waits for the batch's (engine thread only)
        self.lock = threading.Lock()
        self.in_flight = 0  # submitted and not yet ended
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="calm-engine", daemon=True)

    # ---- the asyncio side --------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(request, loop)
        with self.lock:
            if self.closed:
                raise ShuttingDown("the server is shutting down")
            if self.in_flight >= self.capacity:
                raise QueueFull(f"the server holds {self.in_flight} requests, its limit (--max-batch + --max-queue)")
            self.in_flight += 1
            self.commands.put(("add", job))  # under the lock: never after "stop"
        return job

    def cancel(self, job: Job) -> None:
        """Drop a request (its client left, or a stop string ended it): its slot is free at the next step."""
        job.cancelled = True
        self.commands.put(("cancel", job))

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left and end the thread."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.commands.put(("stop", None))
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stats(self) -> dict:
        """The scheduler's counters (prefill and step time, steps, speculative cycles, mean live rows) and
        its cache's write column: read from another thread, so a snapshot that may be one step old."""
        scheduler = self.scheduler
        return {"scheduler": scheduler.stats.to_dict(), "cache_columns": int(scheduler.batch.cache.length)}

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self._take_commands(block=not self.scheduler.busy and not self.deferred):
                break
            self._add_deferred()
            if self.scheduler.busy:
                self._step()
        self._end_all("the server is shutting down")

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False once told to stop."""
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, job = command
            if kind == "stop":
                return False
            assert job is not None
            self._add(job) if kind == "add" else self._cancel(job)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, job: Job) -> None:
        if job.cancelled:
            self._release()
            return
        try:
            job.scheduler_id = self.scheduler.add(job.request)
        except PolicyError:
            self.deferred.append(job)  # another exit plan runs: wait until it is gone
            return
        except Exception as exc:  # checked before submit; anything left is the server's fault
            logger.exception("adding a request failed")
            self._end(job, Update((), (), "error", error=f"{type(exc).__name__}: {exc}"))
            return
        self.jobs[job.scheduler_id] = job

    def _add_deferred(self) -> None:
        waiting, self.deferred = self.deferred, []
        for job in waiting:
            self._add(job)

    def _cancel(self, job: Job) -> None:
        if job in self.deferred:
            self.deferred.remove(job)
            self._release()
        elif job.scheduler_id is not None and self.jobs.pop(job.scheduler_id, None) is not None:
            self.scheduler.cancel(job.scheduler_id)
            self._release()
        # else: not added yet (its add, seeing `cancelled`, releases it) or already ended

    def _step(self) -> None:
        before = self.scheduler.stats.speculative_steps
        try:
            events = self.scheduler.step()
        except Exception as exc:
            logger.exception("a scheduler step failed; its requests end with an error")
            self.scheduler = self.make_scheduler()
            self._end_all(f"the engine failed: {type(exc).__name__}: {exc}")
            return
        self.steps += 1
        speculative = self.scheduler.stats.speculative_steps > before
        for event in events:
            job = self.jobs.get(event.request_id)
            if job is None:
                continue
            # a request's first event is its prefill token, never drafted
            update = Update(
                event.tokens, event.exit_layers, event.finish_reason, speculative and job.started, drafted=event.drafted
            )
            job.started = True
            if event.finish_reason is None:
                job.send(update)
            else:
                self.scheduler.finished(event.request_id)  # forget it
                del self.jobs[event.request_id]
                self._end(job, update)

    def _end(self, job: Job, update: Update) -> None:
        job.send(update)
        self._release()

    def _end_all(self, message: str) -> None:
        for job in [*self.jobs.values(), *self.deferred]:
            self._end(job, Update((), (), "error", error=message))
        self.jobs, self.deferred = {}, []

    def _release(self) -> None:
        with self.lock:
            self.in_flight -= 1
