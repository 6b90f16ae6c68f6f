"""A small process pool that can kill one hung task.

Why not ``concurrent.futures.ProcessPoolExecutor`` or ``multiprocessing.Pool``: neither can stop a task that is
already running. A timed-out future stays "running", its worker stays busy forever, and the only remedy is to tear
down the whole pool. A verifier that hangs on one degenerate completion (sympy expanding ``9^{9^{9^{9^{9}}}}``, a
scorer that ``eval``s model text) must cost that one completion a 0.0 reward, never the run.

So: every worker owns a private pipe and runs one task at a time. The parent sends a task, notes its deadline, and
waits on all pipes and process sentinels at once. A reply before the deadline is the result; a worker past its
deadline is SIGKILLed and replaced; a worker that dies (segfault, ``os._exit``) is an error and is replaced. A
private pipe per worker (instead of one shared queue) is what makes killing safe: a worker killed while holding a
shared queue's lock would deadlock all the others.

Tasks run in the worker's main thread, so libraries that time themselves with ``signal.alarm`` (math-verify) work.
Workers start lazily, are reused across calls, and stop on ``close()``, on garbage collection or at exit.
"""

from __future__ import annotations

import importlib
import multiprocessing
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

_READY = "ready"
# Modules every pool asked to preload, so the (one, process-wide) fork server imports them all once, whichever
# pool starts it; pools are usually all built before the first one starts a worker.
_FORKSERVER_PRELOAD: dict[str, None] = {"__main__": None}  # "__main__" is the standard library's default


@dataclass
class TaskResult:
    # "ok" | "error" (fn raised, or the worker died) | "timeout" (killed at the deadline, or fn raised TimeoutError)
    status: str
    value: Any = None
    message: str = ""


def default_start_method() -> str:
    # "fork" would clone a parent that holds torch's thread pools (and maybe CUDA): unsafe. "forkserver" forks each
    # worker from a clean server process that imported the heavy modules once, so replacing a killed worker is cheap.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _worker_main(conn, preload: Sequence[str], initializer: Callable[[], Any] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us through close()
    for module in preload:
        importlib.import_module(module)
    if initializer is not None:
        initializer()
    conn.send(_READY)  # the first task's deadline starts only now: import time is not the task's fault
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        fn, args = task
        try:
            reply = TaskResult("ok", fn(*args))
        except TimeoutError as e:
            reply = TaskResult("timeout", message=f"{type(e).__name__}: {e}"[:500])
        except BaseException as e:  # noqa: BLE001 - a scorer may raise anything, SystemExit included
            reply = TaskResult("error", message=f"{type(e).__name__}: {e}"[:500])
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable return value; pickling fails before any byte is written
            conn.send(TaskResult("error", message=f"result could not be sent back: {type(e).__name__}: {e}"[:500]))


class _Worker:
    def __init__(self, ctx, preload: Sequence[str], initializer, startup_timeout_s: float):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, preload, initializer), name="simko-verifier", daemon=True
        )
        self.process.start()
        child_conn.close()  # keep no copy of the child's end, so that recv() raises EOFError when it dies
        self.ready = False
        self.task: int | None = None  # index of the task in flight
        self.deadline = time.monotonic() + startup_timeout_s  # start-up deadline, then the task's
        self.exitcode: int | None = None
        self.stopped = False

    @property
    def busy(self) -> bool:
        return self.task is not None or not self.ready

    def kill(self) -> int | None:
        """SIGKILL if still running, reap (no zombie), release the pipe. Returns the exit code. Idempotent."""
        if not self.stopped:
            self.stopped = True
            if self.process.is_alive():
                self.process.kill()
            self.process.join()
            self.exitcode = self.process.exitcode
            self.process.close()
            self.conn.close()
        return self.exitcode


def _stop_workers(workers: list[_Worker], grace_s: float = 1.0) -> None:
    """Ask every worker to exit, give them ``grace_s`` together, then kill what is left. Empties the list."""
    for w in workers:
        if not w.ready or w.task is not None:
            w.kill()  # still importing, or mid-task (an interrupted map): it would not read the request in time
            continue
        try:
            w.conn.send(None)
        except (OSError, ValueError):  # already dead, or already stopped
            pass
    deadline = time.monotonic() + grace_s
    for w in workers:
        if not w.stopped:
            w.process.join(max(0.0, deadline - time.monotonic()))
        w.kill()
    workers.clear()


class KillablePool:
    """Run ``fn(*args)`` for each args in a list, in worker processes, each call under a wall-clock deadline.

    Args:
        num_workers: worker processes (each runs one task at a time).
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``; ``"fork"`` is refused.
        preload: modules to import in each worker (and in the fork server) before it takes tasks.
        initializer: a picklable no-argument function each worker runs once before it takes tasks (a warm-up).
        startup_timeout_s: how long a new worker may take to get ready before ``map`` gives up with RuntimeError.

    Not thread-safe to share between callers at the same time: ``map`` holds a lock for its whole duration.
    """

    def __init__(
        self,
        num_workers: int = 2,
        start_method: str | None = None,
        preload: Sequence[str] = (),
        initializer: Callable[[], Any] | None = None,
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        start_method = start_method or default_start_method()
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method must be 'forkserver' or 'spawn' (fork is unsafe next to torch), got {start_method!r}"
            )
        self.num_workers = num_workers
        self.start_method = start_method
        self.preload = tuple(preload)
        _FORKSERVER_PRELOAD.update(dict.fromkeys(self.preload))
        self.initializer = initializer
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        # Runs on close(), when the pool is garbage-collected, or at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def start(self) -> None:
        """Start the workers now and wait until they are ready (``map`` does this lazily)."""
        with self._lock:
            self._run(None, [], timeout_s=0.0, until_ready=True)

    def map(self, fn: Callable[..., Any], args_list: Sequence[tuple], timeout_s: float) -> list[TaskResult]:
        """``[fn(*args) for args in args_list]`` as TaskResults, in order; each call gets ``timeout_s`` seconds.

        ``fn`` and the args must be picklable (a module-level function, not a lambda).
        """
        args_list = list(args_list)
        if not args_list:
            return []  # nothing to do: don't start workers for it
        with self._lock:
            try:
                return self._run(fn, args_list, timeout_s)
            except BaseException:
                # Interrupted (Ctrl-C, unpicklable task): busy workers would answer the next call with stale
                # results, so kill them; they are replaced on the next call.
                idle = []
                for w in self._workers:
                    if w.busy:
                        w.kill()
                    else:
                        idle.append(w)
                self._workers[:] = idle
                raise

    def close(self) -> None:
        """Stop all workers (no zombies left). A later ``map`` starts fresh ones."""
        with self._lock:
            self._finalizer()
            self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    def _run(self, fn, args_list: list[tuple], timeout_s: float, until_ready: bool = False) -> list[TaskResult]:
        results: list[TaskResult | None] = [None] * len(args_list)
        todo = deque(range(len(args_list)))
        while len(self._workers) < self.num_workers:
            self._workers.append(self._new_worker())
        while True:
            for slot in range(len(self._workers)):
                self._collect(slot, results)
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and todo:
                    task = todo.popleft()
                    try:
                        w.conn.send((fn, args_list[task]))
                    except OSError:  # it died while idle: retry the task elsewhere; _collect replaces it
                        todo.appendleft(task)
                        continue
                    w.task, w.deadline = task, now + timeout_s
            running = [w for w in self._workers if w.task is not None]
            starting = [w for w in self._workers if not w.ready]
            if not todo and not running and not (until_ready and starting):
                # Done. A replacement still starting finishes in the background; its "ready" waits in its pipe.
                return results  # type: ignore[return-value]
            watched = running + starting
            if not watched:
                continue  # a worker died idle just now: the next _collect replaces it
            soonest = min(w.deadline for w in watched)
            wait([w.conn for w in watched] + [w.process.sentinel for w in watched], timeout=max(0.0, soonest - now))

    def _collect(self, slot: int, results: list[TaskResult | None]) -> None:
        """Take a worker's reply if it has one; kill and replace it if it died or ran past its deadline."""
        w = self._workers[slot]
        try:
            if w.conn.poll():
                reply = w.conn.recv()
                if reply == _READY:
                    w.ready = True
                else:
                    results[w.task] = reply
                    w.task = None
                return
            failure = None if w.process.is_alive() else "error"
        except (EOFError, OSError):
            failure = "error"  # the pipe closed: the worker died
        if failure is None and w.busy and time.monotonic() > w.deadline:
            failure = "timeout"
        if failure is None:
            return
        exitcode = w.kill()
        if not w.ready:
            del self._workers[slot]
            why = "timed out" if failure == "timeout" else f"exit code {exitcode}"
            raise RuntimeError(
                f"a verifier worker failed to start ({why}); preload={self.preload}, "
                f"start_method={self.start_method!r}: see its traceback above"
            )
        if w.task is not None:
            message = "killed at the deadline" if failure == "timeout" else f"worker died with exit code {exitcode}"
            results[w.task] = TaskResult(failure, message=message)
        self._workers[slot] = self._new_worker()

    def _new_worker(self) -> _Worker:
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # Only takes effect if the fork server is not running yet; each worker imports `preload` itself anyway.
            ctx.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
        return _Worker(ctx, self.preload, self.initializer, self.startup_timeout_s)
