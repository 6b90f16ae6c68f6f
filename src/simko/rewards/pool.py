"""Verifier worker processes: pebble's ``ProcessPool`` plus the few guarantees a trainer needs from it.

A verifier that hangs on one degenerate completion (sympy expanding ``9^{9^{9^{9^{9}}}}``, a scorer that ``eval``s
model text) must cost that completion a 0.0 reward, never the run. ``concurrent.futures`` cannot stop a running
task; pebble's ``ProcessPool.schedule(fn, args, timeout=...)`` can: it kills the worker of a task past its timeout
and starts a new one, and a worker that dies (segfault, ``os._exit``) fails only its own task. Tasks run in the
worker's main thread, so libraries that time themselves with ``signal.alarm`` work. ``KillablePool`` adds:

- ``map(fn, args_list, timeout_s, budget_s)``: one ``TaskResult`` per call ("ok" / "timeout" / "error"), in order,
  never an exception for a call that failed; and a wall-clock budget for the whole batch, after which the calls
  not finished score as "timeout" and their workers are killed (without it, a batch with many hangs takes
  hangs x timeout_s / workers). It keeps one call in flight per worker: pebble writes scheduled calls into its
  pipe at once, and a call cancelled there would still be taken later and its worker killed then (after a
  200-hang batch ran out of budget, the next batch of 10 quick calls took 85 s that way).
- Start method forkserver (spawn where there is none); ``fork`` is refused: it would clone a parent that holds
  torch's thread pools (and maybe CUDA). The fork server imports ``preload`` once, so replacing a killed worker
  is cheap. Workers import ``preload`` and run ``initializer`` before they take a task, and a task's timeout
  counts from when a worker takes it: start-up is never charged to a task, nor to a batch's budget when the
  batch begins.
- A check's child processes die with it. Each worker starts its own process group (``setsid``); when pebble stops
  a worker (its task timed out or was cancelled, the pool closes; ``Process.terminate``), the worker's whole
  group gets SIGKILL, and so does the group of a worker found dead: a check that starts ``sleep 1234`` and then
  hangs left one orphan per timed-out check before. Each worker also asks the kernel for SIGKILL when its parent
  dies (``PR_SET_PDEATHSIG``), since a kill aimed at the trainer's process group no longer reaches it. A process
  that leaves the worker's group itself (``setsid``, a daemon) is out of reach.
- Stopping a worker is immediate: pebble's ``terminate`` (SIGTERM, up to 3 s of waiting, then SIGKILL, one worker
  after the other in its manager thread) is SIGKILL to the group here. pebble's SIGTERM handler is Python code,
  which cannot run while a task is inside a C loop: measured (6 tasks of ``sum(range(10**13))``, timeout 0.5 s,
  2 workers), 20.1 s with it, 2.1 s with an immediate kill.
- Workers and the fork server are immune to SIGTERM and to SIGUSR1, SLURM's requeue signal (as pebble and
  multiprocessing make them to SIGINT): a scheduler's preemption signals every process of the job, and the trainer
  finishes its RL step before it stops (``simko.checkpointing.GracefulStop``); killed workers would fail that
  step's checks, whose rewards then go into the checkpoint. They are started with both blocked (a signal mask
  survives fork and exec, so the fork server is immune from its first instruction, not once it has imported its
  preloads: a SIGTERM in between killed it), and a worker then ignores them (so do the processes its check
  starts). Workers still die with the trainer (the parent-death signal, the fork server's pipe).
- Each call is pickled here and unpickled inside the task, so a call the worker cannot unpickle (a function in
  a ``__main__`` the worker cannot import) fails alone, as an error, instead of killing the worker between tasks.
- A main program read from standard input (``python - <<EOF``) has ``__main__.__file__ == "<stdin>"``, which
  multiprocessing would try to run as a file in every new worker (FileNotFoundError, exit code 1). While a
  worker starts, such an unreadable ``__file__`` is hidden, so the worker leaves ``__main__`` alone.
- A pool that cannot start (a preload import fails, the initializer raises) raises RuntimeError on first use;
  a pool that broke later (all workers died between tasks) is replaced on the next call.
- Workers stop on ``close()``, when the pool is garbage-collected, and at interpreter exit; they are reaped
  (no zombies). Stopping is bounded (``SHUTDOWN_DEADLINE_S``): the workers are killed at once, and pebble's join
  is given up at the deadline (Ctrl-C during a busy batch could leave it waiting for ever).

Cost against the hand-written pool this replaces (measured on the busy 2-core machine): a kill and its
replacement take ~0.3 s instead of ~0.2 s (pebble checks deadlines and replaces workers every 0.1 s), a batch of
400 math-verify checks the same (within noise), 512 checks of which 40 hang (timeout 5 s, 2 workers) 114.9 s
instead of 110.5 s without a batch budget (``benchmarks/verifiers.py``).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import multiprocessing.context
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pebble import ProcessExpired, ProcessPool

log = logging.getLogger(__name__)

# Modules every pool asked to preload, so the (one, process-wide) fork server imports them all once, whichever
# pool starts it; pools are usually all built before the first one starts a worker.
# "__main__" is the standard library's default; this module, because every worker runs its initializer and so
# imports it (with the simko.rewards package, torch included: 2-9 s on the 2-core machine) unless the fork server did.
_FORKSERVER_PRELOAD: dict[str, None] = {"__main__": None, __name__: None}


@dataclass
class TaskResult:
    # "ok" | "error" (fn raised, or the worker died) | "timeout" (killed at the deadline or at the batch budget,
    # or fn raised TimeoutError)
    status: str
    value: Any = None
    message: str = ""


def default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class KillablePool:
    """Run ``fn(*args)`` for each args in a list, in worker processes, each call under a wall-clock deadline.

    Args:
        num_workers: worker processes (each runs one task at a time).
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``; ``"fork"`` is refused.
        preload: modules to import in each worker (and in the fork server) before it takes tasks.
        initializer: a picklable no-argument function each worker runs once before it takes tasks (a warm-up).
        startup_timeout_s: how long a new pool may take to run its first tasks before ``map`` gives up with
            RuntimeError.

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
        if start_method not in _CONTEXTS:
            raise ValueError(
                f"start_method must be 'forkserver' or 'spawn' (fork is unsafe next to torch), got {start_method!r}"
            )
        self.num_workers = num_workers
        self.start_method = start_method
        self.preload = tuple(preload)
        _FORKSERVER_PRELOAD.update(dict.fromkeys(self.preload))
        self.initializer = initializer
        self.startup_timeout_s = startup_timeout_s
        self._pool: ProcessPool | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers ([] before the first call and after ``close``)."""
        if self._pool is None:
            return []
        # pebble keeps no public list of its workers: this is its worker manager's pid -> process table.
        return list(self._pool._pool_manager.worker_manager.workers)

    def start(self) -> None:
        """Start the workers now and wait until they run tasks (``map`` does this lazily)."""
        with self._lock:
            self._running_pool()

    def map(
        self, fn: Callable[..., Any], args_list: Sequence[tuple], timeout_s: float, budget_s: float | None = None
    ) -> list[TaskResult]:
        """``[fn(*args) for args in args_list]`` as TaskResults, in order.

        Each call gets ``timeout_s`` seconds from when a worker takes it. ``budget_s`` bounds the whole batch: calls
        not finished ``budget_s`` seconds after a worker took the first one are "timeout"s and their workers are
        killed (waiting for workers that are still starting, e.g. replacements of killed ones, is not charged).
        ``fn`` and the args must be picklable (a module-level function, not a lambda).
        """
        args_list = list(args_list)
        if not args_list:
            return []  # nothing to do: don't start workers for it
        with self._lock:
            pool = self._running_pool()
            results: list[TaskResult | None] = [None] * len(args_list)
            todo = deque(range(len(args_list)))
            # At most one call in flight per worker: pebble writes scheduled calls into its pipe at once, and a call
            # cancelled there (at the budget) would still be taken later, and its worker killed then.
            in_flight: dict[Future, int] = {}
            deadline = None
            try:
                while todo or in_flight:
                    while todo and len(in_flight) < self.num_workers:
                        index = todo.popleft()
                        in_flight[_schedule(pool, fn, args_list[index], timeout_s)] = index
                    if deadline is None and budget_s is not None:
                        _wait_until_taken(next(iter(in_flight)), self.startup_timeout_s)  # taken in order
                        deadline = time.monotonic() + budget_s
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    done, _ = wait(in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
                    if not done:
                        break  # out of budget
                    for future in done:
                        results[in_flight.pop(future)] = _result(future)
            finally:  # out of budget, or interrupted (Ctrl-C): nothing may keep running behind the caller's back
                for future in in_flight:
                    future.cancel()  # a running pebble task is cancelled by killing its worker
            if in_flight or todo:
                log.warning(
                    "verifier batch budget of %g s ran out: %d of %d checks not finished score 0.0 "
                    "(counted as timeouts; their workers are killed)",
                    budget_s, len(in_flight) + len(todo), len(args_list),
                )  # fmt: skip
            if any(r is not None and r.message.startswith("BrokenProcessPool") for r in results):
                self._discard()  # started again on the next call
            return [_budget_result(budget_s) if r is None else r for r in results]

    def close(self) -> None:
        """Stop all workers (no zombies left). A later ``map`` starts fresh ones."""
        with self._lock:
            self._discard()

    def _running_pool(self) -> ProcessPool:
        if self._pool is not None and self._pool.active:
            return self._pool
        self._discard()
        context = _CONTEXTS[self.start_method]()
        if self.start_method == "forkserver":
            # Only takes effect if the fork server is not running yet; each worker imports `preload` itself anyway.
            context.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
        pool = ProcessPool(
            self.num_workers, initializer=_start_worker, initargs=(self.preload, self.initializer), context=context
        )
        _kill_process_groups_with_workers(pool)
        self._pool = pool
        # Runs on close(), when this object is garbage-collected, or at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _shut_down, pool)
        probes = [pool.schedule(os.getpid) for _ in range(self.num_workers)]
        done, _ = wait(probes, timeout=self.startup_timeout_s)
        failure = next((f.exception() for f in done if f.exception() is not None), None)
        if failure is not None or len(done) < len(probes):
            self._discard()
            why = f"{type(failure).__name__}: {failure}" if failure else f"not ready after {self.startup_timeout_s} s"
            raise RuntimeError(
                f"a verifier worker failed to start ({why}); preload={self.preload}, "
                f"start_method={self.start_method!r}: see its traceback above"
            )
        return pool

    def _discard(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # stops and reaps the workers; runs at most once
        self._pool, self._finalizer = None, None


def _schedule(pool: ProcessPool, fn: Callable[..., Any], args: tuple, timeout_s: float) -> Future:
    try:
        payload = pickle.dumps((fn, tuple(args)))
    except Exception as e:  # this call can't be sent: it fails alone
        future: Future = Future()
        future.set_exception(e)
        return future
    return pool.schedule(_call_pickled, (payload,), timeout=timeout_s)


def _wait_until_taken(future: Future, timeout_s: float) -> None:
    """Return once a worker runs ``future``'s task (or it is done), or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (future.running() or future.done()) and time.monotonic() < deadline:
        time.sleep(0.005)


def _call_pickled(payload: bytes) -> Any:
    """In a worker: unpickle one call and run it (so an unpicklable call is this task's error, not the worker's)."""
    fn, args = pickle.loads(payload)
    return fn(*args)


def _result(future: Future) -> TaskResult:
    error = future.exception()
    if error is None:
        return TaskResult("ok", future.result())
    if isinstance(error, TimeoutError):  # pebble's deadline, or fn raised TimeoutError itself
        message = "killed at the deadline" if error.args[:1] == ("Task timeout",) else f"TimeoutError: {error}"
        return TaskResult("timeout", message=message[:500])
    if isinstance(error, ProcessExpired):
        return TaskResult("error", message=f"worker died with exit code {error.exitcode}")
    return TaskResult("error", message=f"{type(error).__name__}: {error}"[:500])


# The signals a scheduler sends every process of a job to stop it (simko.stopping.stopping_on_signals): SIGTERM, and
# SLURM's requeue signal (SIGUSR1 by default; `sbatch --signal`, sent to every process of the job's steps).
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR1})


def _budget_result(budget_s: float | None) -> TaskResult:
    return TaskResult("timeout", message=f"not finished within the batch budget of {budget_s:g} s")


def _start_worker(preload: Sequence[str], initializer: Callable[[], Any] | None) -> None:
    """pebble's worker initializer: its own process group, SIGKILL when its parent dies, the stop signals ignored
    (see the module docstring); then warm up."""
    os.setsid()
    _die_with_parent()
    for signum in STOP_SIGNALS:  # one pending since the worker started is dropped here
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by _stop_signals_blocked since its start
    for module in preload:
        importlib.import_module(module)
    if initializer is not None:
        initializer()


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when its parent exits (``prctl(PR_SET_PDEATHSIG)``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def kill_process_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (a worker and whatever it started), if there is one.

    Safe after the worker was reaped: Linux does not reuse a pid while a process group of that id has members, and
    a pid that led no group (a worker killed before its ``setsid``) names no group.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_process_groups_with_workers(pool: ProcessPool) -> None:
    """Make ``pool`` kill the process group of a worker it finds dead (what the worker started may live on).

    pebble has no hook for this, so its worker manager's ``inspect_workers`` (which drops dead workers) is wrapped on
    this pool's instance. Workers pebble stops are killed with their group by ``terminate`` (:class:`_GroupKill`).
    """
    manager = pool._pool_manager.worker_manager
    inspect_workers = manager.inspect_workers

    def inspect() -> tuple:
        before = set(manager.workers)
        expired = inspect_workers()
        for pid in before - set(manager.workers):
            kill_process_group(pid)
        return expired

    manager.inspect_workers = inspect


# How long closing a pool may wait for pebble's threads. Ctrl-C while the pool worked left the main thread in
# pool.join() for good (2 times in 39), waiting for a pebble thread that never ended.
SHUTDOWN_DEADLINE_S = 10.0


def _shut_down(pool: ProcessPool) -> None:
    """Stop the pool within ``SHUTDOWN_DEADLINE_S``: no task is waited for, every worker's process group is killed,
    and pebble's own join (which reaps the workers) runs in a thread that is given up at the deadline."""
    pool.stop()  # pebble's loops stop at their next turn, so no new worker is started after this one
    manager = pool._pool_manager.worker_manager
    for pid in list(manager.workers):
        kill_process_group(pid)
    joiner = threading.Thread(target=pool.join, name="simko-pool-join", daemon=True)
    joiner.start()
    joiner.join(SHUTDOWN_DEADLINE_S)
    workers = list(manager.workers.values())
    for worker in workers:  # a worker pebble started while it stopped, if any
        kill_process_group(worker.pid)
    if joiner.is_alive():
        log.warning(
            "a verifier pool did not stop within %g s; its workers were killed, pebble's threads are left behind",
            SHUTDOWN_DEADLINE_S,
        )
        for worker in workers:
            worker.join(timeout=1.0)  # reap (no zombie)


# --- starting workers next to a __main__ they cannot import ---------------------------------------------------

_MAIN_LOCK = threading.Lock()


def main_is_importable() -> bool:
    """True if a new worker process can import this program's ``__main__`` (a script file or ``python -m``).

    False for a program read from standard input, ``python -c`` and interactive sessions (notebooks): functions
    defined there cannot be sent to a worker process.
    """
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    return path is not None and os.path.isfile(os.path.join(multiprocessing.process.ORIGINAL_DIR or "", path))


@contextmanager
def _unreadable_main_path_hidden() -> Iterator[None]:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or main_is_importable():
        yield
        return
    with _MAIN_LOCK:  # several pools may start workers at once, from their pebble threads
        del main.__file__
        try:
            yield
        finally:
            main.__file__ = path


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """:data:`STOP_SIGNALS` blocked in the calling thread while a worker (and, the first time, the fork server) is
    started: the new process inherits the mask, so it can't die of a stop signal sent to every process of the job.
    One for this process meanwhile stays pending and is delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _GroupKill:
    """``terminate()`` (how pebble stops a worker) is SIGKILL to the worker's process group: the worker and what its
    check started, at once (see the module docstring)."""

    def terminate(self) -> None:
        if self.pid is not None:
            kill_process_group(self.pid)
        self.kill()  # a worker killed before its initializer's setsid leads no group yet


class _ForkServerProcess(_GroupKill, multiprocessing.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        with _unreadable_main_path_hidden(), _stop_signals_blocked():
            return multiprocessing.context.ForkServerProcess._Popen(process_obj)


class _SpawnProcess(_GroupKill, multiprocessing.context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj):
        with _unreadable_main_path_hidden(), _stop_signals_blocked():
            return multiprocessing.context.SpawnProcess._Popen(process_obj)


class _ForkServerContext(multiprocessing.context.ForkServerContext):
    Process = _ForkServerProcess


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = _SpawnProcess


_CONTEXTS = {"forkserver": _ForkServerContext, "spawn": _SpawnContext}
