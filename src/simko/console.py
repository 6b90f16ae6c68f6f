"""The console: library noise silenced where its cause is in a library, progress bars that leave log lines readable.

- :func:`quiet_library_warnings`: one filter per known library warning, each with its cause beside it.
- :func:`progress_bar` / :func:`track`: a ``rich`` bar for loops outside the Lightning trainer (warm start,
  ``simko.eval``).
- :func:`log_lines_above_live_display`: while a ``rich`` live display (any progress bar) runs in a terminal, log
  records are printed above it instead of through it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_warnings() -> None:
    """Silence warnings whose cause is in a library and that a user can do nothing about. Idempotent."""
    # lightning 2.6.6's CombinedLoader flattens its iterables with torch.utils._pytree.LeafSpec(), which torch 2.13
    # deprecates (a FutureWarning at the first fit/validate of every run). Nothing in simko uses LeafSpec.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # FSDP2's pre-forward hook passes each wrapped block's inputs through an autograd Function that returns them as
    # views, and transformers returns the first block's input as hidden_states[0]; FSDP2 then warns (once per rank)
    # that an in-place op on that view would skip its hook. simko reads only hidden_states[-1] (not a view) and
    # slices it out of place. Measured on Qwen2 with transformers 5.19 / torch 2.13: only hidden_states[0] is a view.
    warnings.filterwarnings(
        "ignore",
        message=r"FSDP2-wrapped module \(.*\) returned a view tensor",
        category=UserWarning,
        module=r"torch\.distributed\.fsdp\._fully_shard\._fsdp_state",
    )
    # Lightning 2.6 prints an advertisement for its hosted logger ("💡 Tip: ... litlogger") whenever a Trainer is
    # built without it.
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages("💡 Tip:"))


@contextmanager
def log_lines_above_live_display() -> Iterator[None]:
    """Route console log handlers through ``sys.stdout`` / ``sys.stderr`` as they are now.

    Call it right after a ``rich`` live display has started: in a terminal, rich replaces ``sys.stdout`` and
    ``sys.stderr`` by proxies that print above the display, but Hydra's console handler kept the original stream
    and would write through the bar. File handlers are left alone; outside a terminal nothing changes.
    """
    swapped = []
    for logger in _loggers_with_handlers():
        for handler in logger.handlers:
            if type(handler) is not logging.StreamHandler:  # FileHandler is a subclass: keep it
                continue
            if handler.stream is sys.__stdout__ and sys.stdout is not sys.__stdout__:
                swapped.append((handler, handler.setStream(sys.stdout)))
            elif handler.stream is sys.__stderr__ and sys.stderr is not sys.__stderr__:
                swapped.append((handler, handler.setStream(sys.stderr)))
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)


def _loggers_with_handlers() -> list[logging.Logger]:
    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return [lg for lg in loggers if lg.handlers]


@contextmanager
def progress_bar(description: str, total: int, transient: bool = False) -> Iterator[Callable[..., None]]:
    """A ``rich`` bar ``description ━━━ 12/300 0:00:03 ETA 0:01:10 <info>``; yields ``advance(n=1, info="")``.

    Outside a terminal it prints its final state once, when it closes (or nothing when ``transient``).
    """
    progress = Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=transient,
    )
    with progress, log_lines_above_live_display():
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            progress.update(task, advance=n, info=info)

        yield advance


def track(
    items: Iterable,
    description: str,
    total: int | None = None,
    info: Callable[[], str] | None = None,
    transient: bool = False,
) -> Iterator:
    """Iterate ``items`` under :func:`progress_bar`; after each item the bar shows ``info()`` (e.g. the loss)."""
    total = len(items) if total is None else total
    with progress_bar(description, total, transient=transient) as advance:
        for item in items:
            yield item
            advance(info=info() if info is not None else "")


def progress_bar_enabled(trainer_cfg, callbacks: list) -> bool:
    """``Trainer(enable_progress_bar=...)``: True only when a progress-bar callback is configured (and
    ``trainer.enable_progress_bar`` is not false). Lightning adds its own TQDM bar otherwise, so
    ``callbacks.progress=null`` alone would not turn the bar off."""
    from lightning.pytorch.callbacks import ProgressBar

    wanted = trainer_cfg.get("enable_progress_bar", True) if trainer_cfg is not None else True
    return bool(wanted) and any(isinstance(c, ProgressBar) for c in callbacks)
