"""The verifier layer: answer extraction, math/exact verifiers, the killable pool, the registry and score_batch.

Worker pools are module-scoped fixtures (start-up is the expensive part); hangs use timeout_s=1.
"""

import ctypes
import gc
import operator
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from simko.faults import start_a_child_and_hang
from simko.rewards import (
    FINAL_ANSWER_WINDOW,
    VERIFIERS,
    ExactMatchVerifier,
    FunctionVerifier,
    KillablePool,
    MathVerifier,
    Verifier,
    build_verifier,
    check_verifier_names,
    extract_boxed,
    extract_final_answer,
    final_answer,
    final_answer_text,
    register_verifier,
    score_batch,
)
from simko.rewards.extract import has_box_command, last_answer_tag

REPO = Path(__file__).resolve().parents[1]

HANG = r"\boxed{9^{9^{9^{9^{9}}}}}"  # sympy evaluates the power tower in C: no signal stops it, only a kill


def _gone(pid: int) -> bool:
    """True once the process is dead and reaped (a zombie still counts as there)."""
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return False


def _wait_gone(pids, timeout_s=5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


# A user scorer, registered the way a user would (module level, so worker processes can import it).
@register_verifier("test_misbehaving")
def misbehaving_reward(completions, answers):
    answer = answers[0]
    if answer == "crash":
        os._exit(3)
    if answer == "hang":
        time.sleep(60)
    if answer == "raise":
        raise RuntimeError("scorer bug")
    if answer == "nan":
        return [float("nan")]
    return [float(completions[0] == answer)]


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def slow_start() -> None:
    time.sleep(2.0)


@register_verifier("test_length", isolated=False)
def length_reward(completions, answers):
    return [float(len(c) == int(a)) for c, a in zip(completions, answers)]


@pytest.fixture(scope="module")
def math_verifier():
    v = MathVerifier(timeout_s=5.0, num_workers=2)
    yield v
    v.close()


@pytest.fixture(scope="module")
def pool():
    p = KillablePool(num_workers=2)
    yield p
    p.close()


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{ 2 }", "2"),  # the last box, stripped
        (r"\fbox{x^{2}}", "x^{2}"),
        (r"\boxed {\{1,2\}}", r"\{1,2\}"),  # escaped braces are not nesting
        (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"\boxed{5} and then \boxed{\frac{1", "5"),  # an unclosed (cut-off) box is skipped
        (r"\boxed{\frac{1", None),
        ("no box here", None),
        ("", None),
        (r"\boxed{}", ""),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"<answer>no</answer> \boxed{yes}", "yes"),
        ("think <answer>a</answer> more <answer> b </answer>", "b"),
        ("Reasoning...\nFinal Answer: 42\n", "42"),
        ("  just this  ", "just this"),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_boxed_nesting_and_the_answer_window():
    assert extract_boxed(r"\boxed{a \boxed{b}}") == "b"  # the box opened last
    assert extract_boxed(r"\boxed{a} } \boxed{b") == "a"  # a stray "}" closes nothing
    assert extract_boxed("\\boxed{" * 20_000 + r"\boxed{42}") == "42"
    # Only the last FINAL_ANSWER_WINDOW characters are read: a box before them is not the final answer.
    assert extract_boxed(r"\boxed{7}" + "x" * (FINAL_ANSWER_WINDOW - 10)) == "7"
    assert extract_boxed(r"\boxed{7}" + "x" * FINAL_ANSWER_WINDOW) is None


# Degenerate completions a policy can write, 100k+ characters each. Extraction and the in-process verifiers run in
# the trainer's process, outside any timeout: each must stay linear. The old extract_boxed took 1.4 s on 14k
# characters of unclosed boxes and grew quadratically (~70 s here); the knights_knaves claim regex took 12 s on a
# name followed by 20k spaces.
ADVERSARIAL = {
    "unclosed boxes": "\\boxed{" * 15_000,
    "open braces": "\\boxed{" + "{" * 100_000,
    "closed braces": "\\boxed{" + "{}" * 50_000,
    "unclosed tags": "<answer>" * 12_500,
    "answer lines": "Answer " * 15_000,
    "long box then spaces": "\\boxed{" + "1" * 100_000 + "}" + " " * 100_000,
    "name then spaces": "<answer>Emma" + " " * 100_000 + "x</answer>",
    "paragraph breaks": "\n " * 50_000 + "Emma is a",
}
KK_GOLD_ONE = '{"roles": {"Emma": "knight"}}'


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_completions_are_scored_in_linear_time(name):
    text = ADVERSARIAL[name]
    VERIFIERS.names()  # the registry's one package scan (it imports torch once) is no check's time
    checks = [
        lambda: extract_boxed(text),
        lambda: has_box_command(text),
        lambda: last_answer_tag(text),
        lambda: extract_final_answer(text),
        lambda: final_answer_text(text, multiline=True),
        lambda: build_verifier("exact")(text, "5"),
        lambda: build_verifier("countdown")(text, '{"numbers": [1, 2], "target": 3}'),
        lambda: build_verifier("knights_knaves")(text, KK_GOLD_ONE),
        lambda: build_verifier("mini_sudoku")(text, '{"puzzle": [[0, 0], [0, 0]]}'),
        lambda: MathVerifier(require_boxed=True)(text, "5"),  # decided before any worker is needed
    ]
    for i, check in enumerate(checks):
        start = time.perf_counter()
        check()
        elapsed = time.perf_counter() - start
        assert elapsed < 0.5, f"check {i} took {elapsed:.2f} s on {name!r}"


# ---------------------------------------------------------------- MathVerifier

MATH_CASES = [
    (r"\boxed{\frac12}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"So the point is \boxed{(1,2)}.", "(1,2)", 1.0),
    (r"\boxed{(2,1)}", "(1,2)", 0.0),  # ordered pair
    (r"\boxed{10.0}", "10", 1.0),
    (r"\boxed{11}", "10", 0.0),
    (r"\boxed{1234}", "1,234", 1.0),  # GSM8K-style gold
    (r"\boxed{1,234}", "1234", 1.0),
    (r"\boxed{\left( 3, \pi/2 \right)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\boxed{\dfrac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
    (r"\boxed{x = 3}", "3", 1.0),
    (r"\boxed{5\%}", "5", 1.0),
    (r"\boxed{\text{(C)}}", "C", 1.0),
    (r"The answer is $7$.", "7", 1.0),  # no box: math-verify's own extraction
    (r"first \boxed{3}, final \boxed{4}", "3", 0.0),  # the last box counts
    (r"\boxed{4}", r"so it is \boxed{4}", 1.0),  # gold given as a solution: its last box
    ("", "5", 0.0),
    (r"\boxed{\frac{1}{2", "0.5", 0.0),  # unbalanced: cut off mid-answer, no fallback
    (r"}}}{{{\boxed{}", "5", 0.0),
    ("\\boxed{☃𝔘\u0000\ufffd}", "5", 0.0),  # garbage unicode
    ("ðŸ¤” \x00\x1b[31m", "5", 0.0),
    (r"\boxed{3}", "", 0.0),  # empty gold: an error, counted
    # an empty box is the instruction's placeholder, not an answer: what follows it is read (was 0.0)
    (r"The answer is \boxed{} 8.", "8", 1.0),
    (r"so \boxed{5} and then \boxed{ }", "5", 1.0),  # the last box with something in it
    (r"\boxed{} then \boxed{1", "1", 0.0),  # still an unclosed box: no fallback
]


def test_math_verifier_cases(math_verifier):
    errors_before = math_verifier.num_errors
    scores = math_verifier.score([c for c, _, _ in MATH_CASES], [a for _, a, _ in MATH_CASES])
    assert scores == [s for _, _, s in MATH_CASES], [
        (c, a, got) for (c, a, s), got in zip(MATH_CASES, scores) if s != got
    ]
    assert math_verifier.num_timeouts == 0
    assert math_verifier.num_errors == errors_before + 1  # the empty gold


def test_math_final_answer_skips_empty_boxes(math_verifier):
    assert math_verifier.final_answer(r"The answer is \boxed{} 8.") is None  # the fallback reads the text
    assert math_verifier.final_answer(r"\boxed{5} \fbox{  }") == "5"
    assert math_verifier.final_answer(r"\boxed{\{\}}") == r"\{\}"  # escaped braces are content


def test_math_verifier_call_and_empty(math_verifier):
    assert math_verifier(r"\boxed{\frac{4}{2}}", "2") == 1.0
    assert isinstance(math_verifier("nothing", "2"), float)
    assert math_verifier.score([], []) == []
    assert math_verifier(r"\boxed{46}", 46) == 1.0  # a numeric gold (int dataset column)
    errors = math_verifier.num_errors
    assert math_verifier.score([None, r"\boxed{1}"], ["1", "1"]) == [0.0, 1.0]  # a bad item costs only itself
    assert math_verifier.num_errors == errors + 1
    math_verifier.start()  # already running: returns at once
    with pytest.raises(ValueError):
        math_verifier.score(["a"], [])


def test_math_require_boxed_never_starts_workers():
    v = MathVerifier(require_boxed=True)
    assert v.score(["The answer is $7$.", r"\boxed{7}"], ["7", "7"]) == [0.0, 1.0]
    assert v.pool.pids == []  # both decided without math-verify: no worker was started
    v.close()


def test_math_hang_is_killed_and_pool_recovers(math_verifier, monkeypatch):
    monkeypatch.setattr(math_verifier, "timeout_s", 1.0)
    timeouts_before = math_verifier.num_timeouts
    pids_before = set(math_verifier.pool.pids)
    start = time.monotonic()
    # Two hangs on two workers run side by side: ~1 s in all, not one timeout after the other.
    scores = math_verifier.score([HANG, r"\boxed{2.0}", HANG, r"\boxed{\sqrt{4}}"], ["1", "2", "1", "2"])
    elapsed = time.monotonic() - start
    assert scores == [0.0, 1.0, 0.0, 1.0]
    assert math_verifier.num_timeouts == timeouts_before + 2
    # Bounded by the deadline plus worker respawn (seconds on a loaded 2-core machine), never by the hang itself.
    assert elapsed < 1.0 + 7.0, elapsed
    killed = pids_before - set(math_verifier.pool.pids)
    assert killed and not _wait_gone(killed)  # the stuck workers are dead and reaped
    assert math_verifier(r"\boxed{0.25}", r"\frac14") == 1.0  # replacements work


def test_math_batch_budget_bounds_a_batch_of_hangs(math_verifier, monkeypatch):
    # Without a budget, 6 hangs on 2 workers with a 5 s timeout take 15 s: hangs x timeout_s / workers.
    monkeypatch.setattr(math_verifier, "batch_timeout_s", 1.5)
    timeouts_before = math_verifier.num_timeouts
    start = time.monotonic()
    scores = math_verifier.score([HANG] * 6, ["1"] * 6)
    elapsed = time.monotonic() - start
    assert scores == [0.0] * 6 and math_verifier.num_timeouts == timeouts_before + 6
    assert elapsed < 1.5 + 2.0, elapsed
    assert math_verifier(r"\boxed{0.25}", r"\frac14") == 1.0  # the killed workers were replaced


def test_batch_budget_scores_the_rest_zero_and_kills_hung_workers():
    with build_verifier("test_misbehaving", timeout_s=60.0, batch_timeout_s=2.0, num_workers=2) as v:
        v.start()
        pids = v.pool.pids
        start = time.monotonic()
        scores = v.score(["a", "y", "y", "y", "y", "c"], ["a", "hang", "hang", "hang", "hang", "c"])
        elapsed = time.monotonic() - start
        assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # "c" waited behind the hangs: out of budget too
        assert (v.num_timeouts, v.num_errors) == (5, 0)
        assert elapsed < 2.0 + 2.0, elapsed
        assert not _wait_gone(pids)  # the workers stuck in the hangs are killed and reaped
        assert v("q", "q") == 1.0  # and replaced


def test_a_batch_after_the_budget_ran_out_is_not_delayed():
    # Calls cancelled at the budget must not wait in the pool's pipe: each would cost a worker kill when taken
    # (200 of them delayed the next batch by 85 s).
    with build_verifier("test_misbehaving", timeout_s=60.0, batch_timeout_s=1.0, num_workers=2) as v:
        assert v.score(["y"] * 50, ["hang"] * 50) == [0.0] * 50
        start = time.monotonic()
        assert v.score(["a", "b"], ["a", "b"]) == [1.0, 1.0]
        assert time.monotonic() - start < 5.0


def test_batch_timeout_must_be_positive():
    with pytest.raises(ValueError, match="batch_timeout_s"):
        MathVerifier(batch_timeout_s=0)
    assert FunctionVerifier(misbehaving_reward, batch_timeout_s=None).batch_timeout_s is None


# ---------------------------------------------------------------- KillablePool


def test_pool_results_errors_timeouts_crashes(pool):
    results = pool.map(operator.truediv, [(1, 2), (1, 0), (3, 4)], timeout_s=5.0)
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[0].value == 0.5 and "ZeroDivisionError" in results[1].message

    start = time.monotonic()
    results = pool.map(time.sleep, [(30,), (0,)], timeout_s=0.5)
    assert [r.status for r in results] == ["timeout", "ok"]
    assert time.monotonic() - start < 3.0

    results = pool.map(os._exit, [(3,)], timeout_s=5.0)
    assert results[0].status == "error" and "exit code 3" in results[0].message
    results = pool.map(ctypes.string_at, [(0,)], timeout_s=5.0)  # a segfault
    assert results[0].status == "error" and "exit code -11" in results[0].message
    assert pool.map(in_main_thread, [()], timeout_s=5.0)[0].value is True  # signal.alarm works there
    assert [r.value for r in pool.map(operator.add, [(1, 2), (3, 4)], timeout_s=5.0)] == [3, 7]


def test_worker_start_up_is_not_charged_to_the_first_task():
    p = KillablePool(num_workers=1, initializer=slow_start)
    try:
        assert p.map(operator.add, [(1, 2)], timeout_s=0.5, budget_s=0.5)[0].value == 3
    finally:
        p.close()


def test_pool_rejects_fork():
    with pytest.raises(ValueError, match="fork"):
        KillablePool(start_method="fork")


def test_pool_close_leaves_no_processes():
    p = KillablePool(num_workers=2)
    assert p.map(operator.mul, [(2, 3)], timeout_s=5.0)[0].value == 6
    pids = p.pids
    assert len(pids) == 2
    p.close()
    assert not _wait_gone(pids)
    assert not [c for c in psutil.Process().children(recursive=True) if c.status() == psutil.STATUS_ZOMBIE]
    assert p.map(operator.mul, [(2, 4)], timeout_s=5.0)[0].value == 8  # usable again after close
    p.close()


def test_workers_stop_at_interpreter_exit():
    code = (
        "import operator\n"
        "from simko.rewards import KillablePool\n"
        "if __name__ == '__main__':\n"
        "    p = KillablePool(num_workers=2)\n"
        "    p.map(operator.add, [(1, 2)], timeout_s=5.0)\n"
        "    print(*p.pids)\n"  # exits without close()
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2 and not _wait_gone(pids)


def test_shutdown_is_bounded_when_pebble_does_not_stop(tmp_path):
    """Ctrl-C while the pool worked hung for good 2 times in 39: the main thread waited in ``_shut_down`` ->
    ``pool.join()`` for a pebble thread that never ended. Simulated: pebble's join never returns. The pool still
    closes within its deadline, and its workers are dead."""
    code = (
        "import operator, threading, time\n"
        "import pebble\n"
        "from simko.rewards import KillablePool\n"
        "from simko.rewards import pool as pool_module\n"
        "pebble.ProcessPool.join = lambda self, timeout=None: threading.Event().wait()\n"
        "if __name__ == '__main__':\n"
        "    p = KillablePool(num_workers=2)\n"
        "    p.map(operator.add, [(1, 2)], timeout_s=5.0)\n"
        "    print(*p.pids, flush=True)\n"
        "    t = time.monotonic()\n"
        "    p.close()\n"
        "    print(round(time.monotonic() - t, 2), flush=True)\n"
    )
    script = tmp_path / "hang.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    pids, seconds = out.stdout.splitlines()
    from simko.rewards.pool import SHUTDOWN_DEADLINE_S

    assert float(seconds) < SHUTDOWN_DEADLINE_S + 2.0
    assert not _wait_gone([int(p) for p in pids.split()])


def test_workers_stop_when_the_pool_is_garbage_collected():
    p = KillablePool(num_workers=2)
    assert p.map(operator.add, [(1, 2)], timeout_s=5.0)[0].value == 3
    pids = p.pids
    del p
    gc.collect()
    assert len(pids) == 2 and not _wait_gone(pids)


def sleepers(seconds: str, within_s: float = 5.0) -> list[psutil.Process]:
    """The ``sleep <seconds>`` processes still there after up to ``within_s`` seconds (pebble stops workers from
    its manager thread, every 0.1 s)."""
    deadline = time.monotonic() + within_s
    while True:
        found = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_a_checks_child_processes_die_with_it():
    """A check that starts ``sleep`` and then hangs left one orphan per timed-out check (16 after one step): the
    worker's whole process group is killed when its check times out, when the worker dies, and when the pool
    closes."""
    seconds = f"1234.{os.getpid()}"  # this test's own sleepers
    p = KillablePool(num_workers=2, preload=["simko.faults"])
    try:
        results = p.map(start_a_child_and_hang, [(seconds, "hang")] * 4, timeout_s=1.0)
        assert [r.status for r in results] == ["timeout"] * 4
        results = p.map(start_a_child_and_hang, [(seconds, "die")] * 2, timeout_s=5.0)
        assert [r.status for r in results] == ["error"] * 2
        assert sleepers(seconds) == []
        p.map(start_a_child_and_hang, [(seconds, "hang")] * 2, timeout_s=60.0, budget_s=1.0)  # out of budget
        assert sleepers(seconds) == []
        budget_pids = p.pids
        p._pool.schedule(start_a_child_and_hang, (seconds, "hang"))  # running when the pool closes
        deadline = time.monotonic() + 30
        while not sleepers(seconds, within_s=0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleepers(seconds, within_s=0), "the check did not start its child"
    finally:
        p.close()
    assert sleepers(seconds) == [] and not _wait_gone(budget_pids)


def sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_checks_survive_a_sigterm_to_every_process_of_the_job(signum):
    """A scheduler's preemption sends SIGTERM (SLURM's requeue: SIGUSR1) to every process of the job, and the trainer
    finishes its RL step before it stops (GracefulStop): the verifier workers and the fork server must not die of it,
    or that step's checks fail and its rewards (then checkpointed) are not the uninterrupted run's."""
    p = KillablePool(num_workers=2)
    try:
        assert p.map(operator.add, [(1, 2)], timeout_s=30.0)[0].value == 3
        procs = [psutil.Process(pid) for pid in p.pids]
        server = {parent.pid for w in procs if (parent := w.parent()) is not None and parent.pid != os.getpid()}
        results: list = []
        batch = threading.Thread(target=lambda: results.extend(p.map(sleep_then, [(1.0, i) for i in range(6)], 30.0)))
        batch.start()
        time.sleep(0.5)
        for pid in [*p.pids, *server]:
            os.kill(pid, signum)
        batch.join(60)
        assert [(r.status, r.value) for r in results] == [("ok", i) for i in range(6)]
        assert p.map(sleep_then, [(0.0, 7)], timeout_s=0.5)[0].value == 7
        assert p.map(time.sleep, [(30,)], timeout_s=0.5)[0].status == "timeout"  # a replacement worker: forked
        assert p.map(operator.add, [(2, 2)], timeout_s=30.0)[0].value == 4
    finally:
        p.close()


def test_a_pool_starts_while_every_process_gets_sigterm(tmp_path):
    """SIGTERM to every process of the job while a pool starts (its fork server still importing its preloads) and
    works: the fork server and the workers are born immune, so the pool starts and scores (the fork server died of
    it, and the RL step in progress failed with BrokenProcessPool)."""
    code = (
        "import operator, threading, time, os, signal\n"
        "import psutil\n"
        "from simko.rewards import KillablePool\n"
        "def work(p, out):\n"
        "    try:\n"
        "        out.extend(r.value for r in p.map(operator.add, [(1, 2), (3, 4)] * 4, timeout_s=60.0))\n"
        "    except Exception as e:\n"
        "        out.append(repr(e))\n"
        "if __name__ == '__main__':\n"
        # torch as a preload: a fork server that takes seconds to start (importing simko.rewards is fast, it
        # imports no torch), so the signals reach it, its resource tracker and the workers while the pool starts
        "    p, out = KillablePool(num_workers=2, preload=('torch',)), []\n"
        "    worker = threading.Thread(target=work, args=(p, out))\n"
        "    worker.start()\n"
        "    sent = set()\n"
        "    while worker.is_alive():\n"
        "        for child in psutil.Process().children(recursive=True):\n"
        "            try:\n"
        "                child.send_signal(signal.SIGTERM)\n"
        "                sent.add(child.pid)\n"
        "            except psutil.Error:\n"
        "                pass\n"
        "        time.sleep(0.01)\n"
        "    print(len(sent), out, flush=True)\n"
        "    p.close()\n"
    )
    script = tmp_path / "start.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sent, values = out.stdout.split(" ", 1)
    assert int(sent) >= 3, out.stdout  # the fork server, its resource tracker, the workers
    assert values.strip() == str([3, 7] * 4), out.stdout + out.stderr[-3000:]


def test_unpicklable_call_fails_alone(pool):
    results = pool.map(operator.add, [(1, 2), (lambda: 0, 1), (3, 4)], timeout_s=5.0)
    assert [r.status for r in results] == ["ok", "error", "ok"]


# A main program read from standard input (`python - <<EOF`) and an interactive one (`python -i`, like a notebook):
# the workers must start without trying to re-run __main__, and a verifier function defined in such a __main__
# is refused at once, saying what to do. Statements are flat (no blocks) so the interactive reader takes them too.
STDIN_SCRIPT = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
from simko.rewards import FunctionVerifier, MathVerifier, build_verifier
import examples.my_verifiers
v = MathVerifier(timeout_s=5.0, num_workers=1)
print("math", v.score([r"\\boxed{{\\frac12}}", r"\\boxed{{3}}"], ["0.5", "4"]))
v.close()
d = build_verifier("digits", num_workers=1)
print("digits", d.score(["46", "47"], ["46", "46"]))
d.close()
def mine(completions, answers): return [1.0]

try: FunctionVerifier(mine)
except TypeError as e: print("refused:", e)

"""


@pytest.mark.parametrize("args", [["-"], ["-i", "-q"]], ids=["stdin", "interactive"])
def test_verifiers_work_when_main_is_read_from_stdin(args):
    out = subprocess.run(
        [sys.executable, *args], input=STDIN_SCRIPT, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert "math [1.0, 0.0]" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "digits [1.0, 0.5]" in out.stdout  # a function of a user module runs in the workers
    assert "refused: verifier function 'mine' is defined in __main__" in out.stdout
    assert "Move it into a module file" in out.stdout


# ---------------------------------------------------------------- ExactMatchVerifier


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("46", "46.0", 1.0),
        (r"so \boxed{46}", "46", 1.0),
        ("<answer> 1/2 </answer>", "0.5", 1.0),
        ("Answer: 1,234.", "1234", 1.0),
        ("**Answer:** Knight", "knight", 1.0),
        ("  Alice is a   knight ", "alice is a knight", 1.0),
        ("0.333", "1/3", 0.0),  # exact comparison, no tolerance
        ("The answer is 5", "5", 0.0),  # no box, tag or 'answer:': the whole text is compared
        ("", "5", 0.0),
        ("5", "", 0.0),
        ("1" * 200, "1" * 200, 1.0),  # long digit strings compare as strings (no giant Fraction)
        ("1e3", "1000", 0.0),  # no exponent notation
    ],
)
def test_exact_match(completion, answer, expected):
    assert ExactMatchVerifier()(completion, answer) == expected


def test_exact_match_options_and_errors():
    assert ExactMatchVerifier(case_sensitive=True)("Knight", "knight") == 0.0
    assert ExactMatchVerifier(numeric=False)("46", "46.0") == 0.0
    v = ExactMatchVerifier()
    assert v.score(["x", None], ["x", "x"]) == [1.0, 0.0]  # a bad item costs itself, not the batch
    assert (v.num_errors, v.num_timeouts) == (1, 0)


# ---------------------------------------------------------------- registry, function verifiers


def test_registry_builds_and_errors():
    assert {"math", "exact"} <= set(VERIFIERS)
    v = build_verifier("exact", case_sensitive=True)
    assert isinstance(v, ExactMatchVerifier) and v.case_sensitive and v.name == "exact"
    with pytest.raises(ValueError, match="unknown verifier 'nope'; available: .*exact.*math"):
        build_verifier("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_verifier("math")(MathVerifier)
    with pytest.raises(TypeError, match="subclass"):
        register_verifier("test_not_a_verifier")(dict)
    with pytest.raises(TypeError, match="module level"):
        FunctionVerifier(lambda c, a: [1.0] * len(c))


def test_registered_class_plugin():
    @register_verifier("test_always_one")
    class AlwaysOne(Verifier):
        def _score(self, completions, answers):
            return [1.0] * len(completions)

    try:
        assert build_verifier("test_always_one").score(["a", "b"], ["x", "y"]) == [1.0, 1.0]
    finally:
        VERIFIERS.unregister("test_always_one")


def test_function_verifier_isolates_crash_hang_raise():
    with build_verifier("test_misbehaving", timeout_s=1.0, num_workers=2) as v:
        assert isinstance(v, FunctionVerifier)
        pids = v.pool.pids
        scores = v.score(["a", "x", "b", "y", "z", "c"], ["a", "crash", "raise", "hang", "nan", "c"])
        assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert (v.num_errors, v.num_timeouts) == (3, 1)  # crash, raise, nan / hang
        assert v("q", "q") == 1.0  # the pool recovered
        pids = v.pool.pids
    assert not _wait_gone(pids)  # the context manager closed it


def test_in_process_function_verifier():
    v = build_verifier("test_length")
    assert v.score(["abc", "ab"], ["3", "3"]) == [1.0, 0.0]
    assert v.score(["abc", "ab"], ["3", "not a number"]) == [0.0, 0.0]  # the function raised: batch scores 0.0
    assert v.num_errors == 2


def test_score_batch_mixes_verifiers_and_keeps_order(math_verifier):
    completions = [r"\boxed{\frac12}", "46.0", "abc", r"\boxed{3}", "x", "abcd"]
    answers = ["0.5", "46", "3", "4", "y", "4"]
    names = ["math", "exact", "test_length", "math", "exact", "test_length"]
    scores = score_batch(completions, answers, names, verifiers={"math": math_verifier})
    assert scores == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert score_batch(["7", "8"], ["7", "7"], "exact") == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown verifier"):
        score_batch(["a"], ["a"], ["nope"])
    with pytest.raises(ValueError):
        score_batch(["a"], ["a", "b"], ["exact"])


class ReturnsWhatItIsTold(Verifier):
    """A verifier whose ``_score`` returns ``self.values`` (the first n of them, or all)."""

    name = "test_told"

    def __init__(self, values) -> None:
        super().__init__()
        self.values = values

    def _score(self, completions, answers):
        return self.values


@pytest.mark.parametrize("values", [[1.0, 1.0], [1.0, 1.0, 1.0, 1.0], None, 3.0])
def test_a_verifier_that_returns_the_wrong_number_of_rewards_is_an_error_naming_it(values):
    """``_score`` returning 2 scores for 3 completions gave [1.0, 1.0, 0.0] (the rest pre-filled), extra values were
    dropped: now an error naming the verifier, directly and through score_batch."""
    from simko.rewards.base import VerifierError

    verifier = ReturnsWhatItIsTold(values)
    with pytest.raises(VerifierError, match=r"verifier 'test_told' .*for 3 completions"):
        verifier.score(["a", "b", "c"], ["a", "b", "c"])
    with pytest.raises(VerifierError, match=r"verifier 'test_told' .*for 3 completions"):
        score_batch(["a", "b", "c"], ["a", "b", "c"], "mine", verifiers={"mine": verifier})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0", 1e39, -1e16, [1.0], object()])
def test_bad_reward_values_count_as_failed_checks_naming_the_verifier(bad, caplog):
    """NaN, a string, a list, or a finite value too large for float32 statistics (1e39 became inf and the run died
    with "non-finite loss", the verifier unnamed) score 0.0 and count in num_errors, as a raising function does."""
    verifier = ReturnsWhatItIsTold([1.0, bad, None])
    verifier.name = "test_bad_values"
    with caplog.at_level("WARNING"):
        assert verifier.score(["a", "b", "c"], ["a", "b", "c"]) == [1.0, 0.0, 0.0]  # None: not applicable, 0.0
    assert (verifier.num_errors, verifier.num_timeouts) == (1, 0)
    assert "test_bad_values" in caplog.text and "bad score value" in caplog.text
    assert score_batch(["a", "b", "c"], ["a", "b", "c"], "v", verifiers={"v": verifier}) == [1.0, 0.0, 0.0]


def test_score_batch_refuses_bad_values_of_an_object_that_is_no_verifier():
    """An instance in module.verifiers that does not subclass Verifier (no counters): its bad output is an error
    naming it."""
    from simko.rewards.base import VerifierError

    class Plain:
        def score(self, completions, answers):
            return [float("nan")] * len(completions)

    with pytest.raises(VerifierError, match=r"verifier 'plain' .*nan"):
        score_batch(["a"], ["a"], "plain", verifiers={"plain": Plain()})


def test_final_answer_is_what_each_verifier_compares(math_verifier):
    text = "<answer>(1) Emma is a knight</answer>\nso \\boxed{7}\nanswer: 8"
    assert final_answer(text, "exact") == "7"  # box first
    assert final_answer(text, "knights_knaves") == "(1) Emma is a knight"  # tag first
    assert final_answer(text, "countdown") == "(1) Emma is a knight"
    assert final_answer(text, "math", {"math": math_verifier}) == "7"
    assert final_answer("The answer is $7$.", "math") is None  # no box: math-verify's own extraction, in a worker
    assert final_answer("x\n\nrow 1\nrow 2", "mini_sudoku") == "row 1\nrow 2"
    assert final_answer("x\n\n3 + 4", "countdown") == "3 + 4"
    with pytest.raises(ValueError, match="unknown verifier"):
        final_answer("x", "nope")


def test_check_verifier_names_says_how_to_plug_in_a_verifier():
    check_verifier_names(["math", "exact", "mine"], {"mine": ExactMatchVerifier()})
    with pytest.raises(ValueError, match=r"unknown verifier\(s\) \['my_task'\].*imports=\[my_pkg.my_verifiers\]"):
        check_verifier_names(["math", "my_task"])


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan")])
def test_pool_verifiers_refuse_a_timeout_that_is_not_positive(timeout_s):
    # NaN passed the old `timeout_s <= 0` check and gave checks that never time out.
    for build in (lambda: MathVerifier(timeout_s=timeout_s), lambda: FunctionVerifier(len, timeout_s=timeout_s)):
        with pytest.raises(ValueError, match="timeout_s must be > 0"):
            build()
    with pytest.raises(ValueError, match="batch_timeout_s must be > 0"):
        MathVerifier(batch_timeout_s=timeout_s)
