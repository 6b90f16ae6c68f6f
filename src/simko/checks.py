"""Start-up checks of a composed config: every bad value fails before anything slow, naming its key.

``simko.train`` and ``simko.eval`` call these while they build a run, in this order:

1. :func:`check_train_config` / :func:`check_eval_config` on the config alone: missing values (``???``), the
   sampling knobs (temperature > 0, top-p in (0, 1], sample counts), the types of the loss knobs;
2. the loss and the data are built next (:func:`build_loss`, :func:`build_data`: files read, rows checked), still
   before the model;
3. :func:`check_against_model` once the model exists: the loss's top-K against the vocabulary, every prompt of the
   file sources against the model's context (procedural prompts as they are made);
4. :func:`check_world_size` once the trainer knows the number of processes, in the launching process before DDP
   starts its workers.

Each raises :class:`ConfigError` (a ``ValueError``) whose message starts with the key, e.g.
``rollout.top_p=1.5: must be in (0, 1] ...``. The entry points report any of :data:`CONFIG_ERRORS` raised while a
run is built with :func:`exit_with_config_error`: one line on stderr, no traceback, exit status 2.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A bad config value or bad input, found at start; the message names the key (or the file and row)."""


# Errors a bad config or bad input raises while a run is being built (a ConfigError and a CheckpointError are
# ValueErrors): reported as one message, no traceback.
CONFIG_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, InstantiationException)


def exit_with_config_error(err: BaseException) -> None:
    """Print ``error: <message>`` to stderr and exit with status 2."""
    message = str(err).strip() or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- config alone ------------------------------------------------------------------------------------------------


def check_train_config(cfg: DictConfig) -> None:
    """Everything ``simko.train`` can check before building anything."""
    check_missing(cfg)
    rollout = cfg.get("rollout") or {}
    _positive_number(rollout, "rollout", "temperature")
    _top_p(rollout, "rollout", "top_p")
    _integer(rollout, "rollout", "group_size", minimum=2)
    _integer(rollout, "rollout", "max_new_tokens", minimum=1)
    _integer(rollout, "rollout", "max_prompt_tokens", minimum=1, optional=True)
    module = cfg.get("module") or {}
    _positive_number(module, "module", "val_temperature")
    _top_p(module, "module", "val_top_p")
    _integer(module, "module", "val_samples", minimum=1)
    _sampling_filters(module, rollout)
    _lora(cfg.get("model") or {})
    if cfg.get("loss") is not None:
        check_loss_knobs(cfg.loss)


def check_eval_config(cfg: DictConfig) -> None:
    """Everything ``simko.eval`` can check before building anything."""
    check_missing(cfg)
    ev = cfg.eval
    _positive_number(ev, "eval", "temperature")
    _top_p(ev, "eval", "top_p")
    n = _integer(ev, "eval", "n", minimum=1)
    _integer(ev, "eval", "max_new_tokens", minimum=1)
    _integer(ev, "eval", "limit", minimum=1, optional=True)
    _integer(ev, "eval", "micro_batch_size", minimum=1)
    _integer(ev, "eval", "diagnostics_top_k", minimum=0)
    tau = ev.get("diagnostics_tau")
    if not _is_number(tau) or not 0 < tau < 1:
        raise ConfigError(f"eval.diagnostics_tau={tau!r}: must be a number in (0, 1) (an entropy quantile).")
    _integer(ev, "eval", "bootstrap_resamples", minimum=100, optional=True)  # intervals of pass@k and cover@tau
    _integer(ev, "eval", "bootstrap_seed", minimum=0, optional=True)
    taus = ev.get("cover_taus")
    if taus is not None and (
        not isinstance(taus, (Sequence, ListConfig)) or isinstance(taus, str) or not taus
        or any(not _is_number(t) or not 0 <= t <= 1 for t in taus)
    ):  # fmt: skip
        raise ConfigError(f"eval.cover_taus={taus!r}: must be a non-empty list of thresholds in [0, 1], or null.")
    ks = ev.get("ks")
    if ks is not None:
        if not isinstance(ks, (Sequence, ListConfig)) or isinstance(ks, str) or not ks:
            raise ConfigError(f"eval.ks={ks!r}: must be a non-empty list of integers, or null for 1, 2, 4, ..., n.")
        bad = [k for k in ks if not _is_integer(k) or not 1 <= k <= n]
        if bad:
            raise ConfigError(f"eval.ks={list(ks)}: every k must be an integer in [1, eval.n={n}]; not {bad}.")


def check_missing(cfg: DictConfig) -> None:
    """Mandatory values left as ``???`` (e.g. ``data=jsonl`` without ``data.train_source.path``)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        overrides = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"{', '.join(missing)}: mandatory, but ??? in the config; set it: {overrides}")


def check_loss_knobs(loss_cfg: DictConfig) -> None:
    """The type of every ``loss.*`` knob against the loss constructor's annotations (``loss.tau=abc`` is refused).

    Value ranges are the loss's own checks (its constructor names the knob); unknown knobs are refused by Hydra
    (``loss.x=1``) or by the constructor (``+loss.x=1``).
    """
    name = loss_cfg.get("name")
    knobs = _loss_knob_types(name)
    for key, value in loss_cfg.items():
        if key in ("_target_", "name") or key not in knobs:
            continue
        hint = knobs[key]
        if not _matches(value, hint):
            kind = type(value).__name__
            raise ConfigError(f"loss.{key}={value!r}: expected {_describe(hint)} (loss {name!r}), got a {kind}.")


# --- after the data and the model ----------------------------------------------------------------------------------


def build_data(cfg: DictConfig) -> Any:
    """The datamodule of ``cfg.data``, built before the model: a bad path or a bad row fails in seconds."""
    try:
        return instantiate(cfg.data)
    except InstantiationException as error:  # Hydra wraps the source's own error; keep that, and the key
        key = re.search(r"full_key: (\S+)", str(error))
        raise ConfigError(f"{key.group(1) if key else 'data'}: {error.__cause__ or error}") from None
    except (ValueError, TypeError, KeyError, FileNotFoundError) as error:
        raise ConfigError(f"data: {error}") from None


def build_loss(cfg: DictConfig) -> Any:
    """The loss of ``cfg.loss``; a refusal by its constructor is reported with the knobs it names (``loss.alpha=2``)."""
    try:
        return instantiate(cfg.loss)
    except InstantiationException as error:
        cause = error.__cause__ or error
        message = str(cause)
        named = [
            f"loss.{key}={value!r}"
            for key, value in cfg.loss.items()
            if key not in ("_target_", "name") and re.search(rf"\b{re.escape(str(key))}\b", message)
        ]
        where = ", ".join(named) or f"loss (loss.name={cfg.loss.get('name')!r})"
        raise ConfigError(f"{where}: {message}") from None


def check_against_model(policy: Any, datamodule: Any, loss: Any = None, max_prompt_tokens: int | None = None) -> None:
    """The checks that need the model: the loss's top-K against the vocabulary, prompts against the context.

    Call after ``datamodule.set_tokenizer(tokenizer)``. ``max_prompt_tokens``: the length prompts are cut to
    (``rollout.max_prompt_tokens`` of ``simko.train``); None: prompts are not cut, so none may exceed the context.
    """
    vocab = policy.get_output_embeddings().weight.shape[0]
    top_k = int(getattr(loss, "top_k", 0) or 0)
    if top_k > vocab:
        raise ConfigError(
            f"loss.k={top_k}: the loss uses the top {top_k} tokens of each position, but the model's vocabulary has "
            f"{vocab} tokens; choose loss.k <= {vocab}."
        )
    context, attribute = model_context(policy)
    if context is None:
        return
    if max_prompt_tokens is not None:
        if max_prompt_tokens > context:
            raise ConfigError(
                f"rollout.max_prompt_tokens={max_prompt_tokens}: longer than the model's context "
                f"({attribute}={context})."
            )
        return  # longer prompts are cut to max_prompt_tokens
    reason = (
        f"the model's context ({attribute}={context}); prompts are cut only where rollout.max_prompt_tokens is set "
        "(simko.train)"
    )
    try:
        datamodule.limit_prompt_tokens(context, reason)
    except ValueError as error:
        raise ConfigError(f"data: {error}") from None


def check_world_size(datamodule: Any, world_size: int) -> None:
    """prompts_per_step and the val set must split evenly over the processes; checked before they start."""
    try:
        datamodule.check_world_size(world_size)
    except ValueError as error:
        raise ConfigError(f"data: {error}") from None


def model_context(policy: Any) -> tuple[int | None, str]:
    """The longest sequence the model's config declares (``max_position_embeddings`` and its aliases)."""
    config = getattr(policy, "config", None)
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value, attribute
    return None, ""


# --- helpers -------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


def _lora(model: Any) -> None:
    from simko.models.lora import check_lora_config

    try:
        check_lora_config(model.get("lora"))
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _sampling_filters(module: Any, rollout: Any) -> None:
    from simko.sampling_filters import check_filter_config

    try:
        check_filter_config(module, rollout.get("max_new_tokens"))
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _positive_number(group: Any, prefix: str, key: str) -> None:
    if key not in group:
        return
    value = group[key]
    if not _is_number(value) or not value > 0:
        raise ConfigError(
            f"{prefix}.{key}={value!r}: must be a number > 0 (the sampling temperature; 1.0 samples the policy as it "
            "is, 0 would be greedy decoding, which sampling cannot do)."
        )


def _top_p(group: Any, prefix: str, key: str) -> None:
    if key not in group:
        return
    value = group[key]
    if not _is_number(value) or not 0 < value <= 1:
        raise ConfigError(
            f"{prefix}.{key}={value!r}: must be a number in (0, 1] (nucleus sampling; 1.0 turns it off: top-p > 1 "
            "would silently act as 1, top-p 0 would sample greedily)."
        )


def _integer(group: Any, prefix: str, key: str, minimum: int, optional: bool = False) -> int | None:
    if key not in group:
        return None
    value = group[key]
    if value is None and optional:
        return None
    if not _is_integer(value) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise ConfigError(f"{prefix}.{key}={value!r}: must be {allowed}.")
    return int(value)


def _loss_knob_types(name: Any) -> dict[str, Any]:
    """Keyword -> annotation of every constructor in the loss's class hierarchy."""
    from simko.losses import LOSSES

    cls = LOSSES.get(name, None) if isinstance(name, str) else None
    if cls is None:
        return {}  # build_loss names an unknown loss
    knobs: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            hints = typing.get_type_hints(init)
        except (NameError, TypeError):
            hints = {}
        for key, parameter in inspect.signature(init).parameters.items():
            if key != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                knobs[key] = hints.get(key, typing.Any)
    return knobs


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _matches(value: Any, hint: Any) -> bool:
    args = _union_args(hint)
    if args is not None:
        return any(_matches(value, arg) for arg in args)
    origin = typing.get_origin(hint) or hint
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_integer(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is dict:
        return isinstance(value, (Mapping, DictConfig))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    return True  # anything else: the constructor decides


def _describe(hint: Any) -> str:
    args = _union_args(hint)
    if args is not None:
        return " or ".join(_describe(arg) for arg in args)
    names = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    origin = typing.get_origin(hint) or hint
    return names.get(hint) or {dict: "a mapping", list: "a list", tuple: "a list"}.get(origin, str(hint))
