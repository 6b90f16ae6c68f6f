"""Verifiers by name: the plug-in point for users, and ``score_batch``, which the trainer calls.

Add a verifier without touching the trainer:

    from simko.rewards import register_verifier

    @register_verifier("countdown")            # a plain function: wrapped into the verifier API,
    def countdown_score(completions, answers):   # run one item at a time in killable worker processes
        return [...]                             # one float per completion

    @register_verifier("my_task")              # or a Verifier subclass implementing _score()
    class MyVerifier(Verifier): ...

Then name it in a dataset's ``verifier`` column / the config, and ``build_verifier(name, **kwargs)`` builds it.
From the command line, list the module that registers it under the config's top-level ``imports`` key
(``python -m simko.train imports=[my_pkg.my_verifiers] ...``): it is imported before anything is built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence

from simko.registry import Registry
from simko.rewards.base import Verifier, checked_scores
from simko.rewards.function import FunctionVerifier


def _verifier_entry(obj, isolated: bool = True) -> Callable[..., Verifier]:
    """What the registry stores: a Verifier subclass as it is, a function wrapped into a FunctionVerifier."""
    if isinstance(obj, type):
        if not issubclass(obj, Verifier):
            raise TypeError(f"{obj.__name__} must subclass simko.rewards.Verifier (or register a function)")
        return obj
    if callable(obj):
        return functools.partial(FunctionVerifier, obj, isolated=isolated)
    raise TypeError(f"can't register {obj!r} as a verifier: expected a Verifier subclass or a function")


# The verifiers by name: every module of simko.rewards registers its own (math, exact, countdown, ...).
VERIFIERS: Registry[Callable[..., Verifier]] = Registry("verifier", ("simko.rewards",), prepare=_verifier_entry)


def register_verifier(name: str, *, isolated: bool = True) -> Callable:
    """Register a ``Verifier`` subclass, or a function ``f(completions, answers) -> list[float]``, as ``name``.

    ``isolated`` applies to functions only: True runs each item in a killable worker process with a timeout
    (``f`` must be a module-level function), False calls ``f`` on the whole batch in-process (see FunctionVerifier).
    The decorated object is returned unchanged.
    """
    return VERIFIERS.register(name, isolated=isolated)


def build_verifier(name: str, **kwargs) -> Verifier:
    """A new verifier registered as ``name``, built with ``kwargs`` (e.g. ``timeout_s=5.0, num_workers=2``)."""
    verifier = VERIFIERS.build(name, **kwargs)
    verifier.name = name
    return verifier


# Verifiers built with default arguments by score_batch when the caller passes none; reused across calls (the
# worker pools are the expensive part) and closed by their pools' finalizers at exit.
_SHARED: dict[str, Verifier] = {}


def score_batch(
    completions: Sequence[str],
    answers: Sequence[str],
    verifier_names: Sequence[str] | str,
    verifiers: Mapping[str, Verifier] | None = None,
) -> list[float]:
    """Score a batch that may mix tasks: item i is checked by the verifier named ``verifier_names[i]``.

    Items are grouped by name so each verifier sees one batched call; scores come back in the original order.
    ``verifiers`` maps names to already-built instances (the trainer builds them from its config); a name it lacks
    gets a shared instance built with default arguments. A single name applies to every item.
    """
    if isinstance(verifier_names, str):
        verifier_names = [verifier_names] * len(completions)
    if not len(completions) == len(answers) == len(verifier_names):
        raise ValueError(
            f"{len(completions)} completions, {len(answers)} answers, {len(verifier_names)} verifier names"
        )
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(verifier_names):
        groups.setdefault(name, []).append(i)
    check_verifier_names(groups, verifiers)  # before scoring anything
    scores = [0.0] * len(completions)
    for name, items in groups.items():
        verifier = verifiers[name] if verifiers and name in verifiers else shared_verifier(name)
        group_scores = verifier.score([completions[i] for i in items], [answers[i] for i in items])
        for i, score in zip(items, checked_scores(group_scores, len(items), name), strict=True):
            scores[i] = score
    return scores


def check_verifier_names(names: Iterable[str], verifiers: Mapping[str, Verifier] | None = None) -> None:
    """Raise ValueError unless every name is a registered verifier or a key of ``verifiers``.

    The trainer calls it at start with the verifier names of the first train batch and of the val set, so a typo in
    a dataset column, or a user verifier whose module was not imported, fails before the first step.
    """
    registered = VERIFIERS.names()
    unknown = sorted(set(names) - set(registered) - set(verifiers or {}))
    if unknown:
        known = sorted(set(registered) | set(verifiers or {}))
        raise ValueError(
            f"unknown verifier(s) {unknown} named by the data; known verifiers: {', '.join(known)}. A verifier of "
            "your own must be registered before the run starts: list the module that registers it under the "
            "config key `imports` (e.g. imports=[my_pkg.my_verifiers]), or give an instance in module.verifiers"
        )


def final_answer(completion: str, verifier_name: str, verifiers: Mapping[str, Verifier] | None = None) -> str | None:
    """The final answer of ``completion`` as the verifier ``verifier_name`` reads it (what it compares; None: none).

    ``verifiers`` as in ``score_batch``: an instance there is asked, else the shared default instance.
    """
    verifier = verifiers[verifier_name] if verifiers and verifier_name in verifiers else None
    if verifier is None:
        check_verifier_names([verifier_name])
        verifier = shared_verifier(verifier_name)
    return verifier.final_answer(completion)


def shared_verifier(name: str) -> Verifier:
    """The process-wide instance of verifier ``name`` with default arguments (built on first use)."""
    if name not in _SHARED:
        _SHARED[name] = build_verifier(name)
    return _SHARED[name]


def close_shared_verifiers() -> None:
    for verifier in _SHARED.values():
        verifier.close()
    _SHARED.clear()


def failure_counts(verifiers: Mapping[str, Verifier] | None = None) -> dict[str, int]:
    """Total timeouts and errors so far of the given verifiers and of the shared ones (for logging)."""
    seen = {id(v): v for v in [*(verifiers or {}).values(), *_SHARED.values()]}.values()
    return {"timeouts": sum(v.num_timeouts for v in seen), "errors": sum(v.num_errors for v in seen)}
