"""PromptDataModule: which prompts each RL step trains on, rendered for the policy's tokenizer.

RL steps here are not passes over a dataset: step ``s`` consumes ``prompts_per_step`` prompts (global,
across all ranks), the trainer samples G rollouts per prompt, scores them and takes one optimiser step.
The batch of step ``s`` is a pure function of (seed, s, rank, world_size):

* file sources are walked through seeded per-epoch permutations: global position ``p = s * P + j``
  reads row ``permutation(seed, epoch=p // len)[p % len]``;
* procedural sources (with an ``example(index)`` method) read ``example(s * P + j)``;
* rank ``r`` of ``W`` takes the contiguous slice ``[r * P/W, (r + 1) * P/W)`` of the global batch, so a
  prompt (and the group of rollouts made from it) never spans ranks;
* the extra generation rounds of dynamic sampling read a stream of their own, keyed by (seed, s, round)
  (``refill_examples``), so they leave the main stream as it is.

So resuming needs one number, the next step to train (see ``state_dict``), and changing the number of
GPUs keeps the global sequence of prompts unchanged.

The sources are built (files read and checked) when the datamodule is, before any model exists; the tokenizer
comes later (``set_tokenizer``), and ``limit_prompt_tokens`` then checks every prompt of the file sources against
the model's context at once, and procedural prompts as they are made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, Protocol

import jinja2
import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, IterableDataset


class FileLikeSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, Any]: ...


class ProceduralSource(Protocol):
    def example(self, index: int) -> dict[str, Any]: ...


Source = FileLikeSource | ProceduralSource


def render_prompt(
    example: dict[str, Any],
    tokenizer: Any,
    template: str,
    use_chat_template: bool | None = None,
) -> str:
    """The text fed to the model for ``example``.

    ``template`` is a ``str.format`` pattern over the example's fields, e.g.
    ``"{question}\\nPlease reason step by step, and put your final answer within \\\\boxed{{}}."``
    (literal braces doubled) or ``"{question}="``. The result is then wrapped as one user message with
    the tokenizer's chat template (``add_generation_prompt=True``) when ``use_chat_template`` is True, or
    when it is None (auto) and the tokenizer has a chat template.
    """
    try:
        text = template.format(**example)
    except (KeyError, IndexError) as error:
        raise ValueError(
            f"prompt_template {template!r} uses a field the example lacks ({error}); "
            f"example fields: {sorted(example)}. Write literal braces as '{{{{' and '}}}}'."
        ) from None
    has_chat_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_chat_template
    if not use_chat_template:
        return text
    if not has_chat_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template.")
    messages = [{"role": "user", "content": text}]
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as error:  # a syntax error, or the sandbox refusing what the template does
        raise ValueError(
            f"the chat template of the tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}"
            f" failed ({type(error).__name__}: {error}). Chat templates run in jinja's sandbox, which refuses "
            "templates that reach into Python objects; fix its chat_template (tokenizer_config.json / "
            "chat_template.jinja) or set data.use_chat_template=false"
        ) from None


class _TrainSteps(IterableDataset):
    """Endless stream of ``{"step": s, "examples": [...]}``, starting at the datamodule's ``next_step``.

    The start step is read when iteration begins (not when the dataloader is built), so a
    ``load_state_dict`` that happens in between is honoured.
    """

    def __init__(self, datamodule: PromptDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = self.datamodule.next_step
        while True:
            yield {"step": step, "examples": self.datamodule.examples_for_step(step)}
            step += 1


class _FixedBatches(IterableDataset):
    """A finite list of ready-made batches.

    Iterable on purpose: Lightning would wrap a map-style dataset in a DistributedSampler under DDP and
    shard the already rank-sharded validation set a second time.
    """

    def __init__(self, batches: list[list[dict[str, Any]]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return iter(self.batches)


class PromptDataModule(pl.LightningDataModule):
    """Rendered prompt batches for RL training and a fixed held-out prompt set for validation.

    Args:
        train_source: a file source (``len`` + ``[i]``) or a procedural one (``example(i)``).
        val_source: optional held-out source; its first ``val_prompts`` examples form the val set.
        prompts_per_step: GLOBAL number of prompts per RL step (all ranks together); must be divisible
            by the world size.
        val_prompts: size of the val set (None = the whole file source).
        prompt_template: ``str.format`` pattern over example fields (see ``render_prompt``).
        use_chat_template: wrap in the tokenizer's chat template; None = when it has one.
        seed: seed of the per-epoch permutations of file sources.
        tokenizer: the policy's tokenizer; usually set later with ``set_tokenizer`` (the data is built first).
        val_batch_size: prompts per validation batch on each rank (None = prompts_per_step / world).
    """

    def __init__(
        self,
        train_source: Source,
        val_source: Source | None = None,
        prompts_per_step: int = 8,
        val_prompts: int | None = 64,
        prompt_template: str = "{question}",
        use_chat_template: bool | None = None,
        seed: int = 0,
        tokenizer: Any = None,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}.")
        if val_source is not None and val_prompts is None and _is_procedural(val_source):
            raise ValueError("val_prompts must be set for a procedural val_source (it has no length).")
        self.train_source = train_source
        self.val_source = val_source
        self.prompts_per_step = prompts_per_step
        self.val_prompts = val_prompts
        self.prompt_template = prompt_template
        self.use_chat_template = use_chat_template
        self.seed = seed
        self.tokenizer = tokenizer
        self.val_batch_size = val_batch_size
        self.next_step = 0
        self._permutations: dict[int, np.ndarray] = {}
        # Set by limit_prompt_tokens: (max tokens, why) for prompts made on the fly (procedural sources).
        self._prompt_limit: tuple[int, str] | None = None

    def set_tokenizer(self, tokenizer: Any) -> None:
        """The policy's tokenizer, which renders prompts (chat template) from here on."""
        self.tokenizer = tokenizer

    def limit_prompt_tokens(self, max_tokens: int, reason: str) -> None:
        """Refuse any prompt longer than ``max_tokens`` tokens, naming the example and ``reason``.

        File sources are checked entirely now (every train row and the val set); examples of procedural
        sources are checked when they are rendered, before anything is generated from them.
        """
        self._prompt_limit = (int(max_tokens), reason)
        if not _is_procedural(self.train_source):
            examples = [self.train_source[i] for i in range(len(self.train_source))]
            self._check_prompt_lengths([self._render(e) for e in examples], f"train_source {self.train_source!r}")
        if self.val_source is not None and not _is_procedural(self.val_source):
            examples = [self.val_source[i] for i in range(self._val_count())]
            self._check_prompt_lengths([self._render(e) for e in examples], f"val_source {self.val_source!r}")

    def _check_prompt_lengths(self, examples: list[dict[str, Any]], where: str) -> None:
        if self._prompt_limit is None or not examples:
            return
        max_tokens, reason = self._prompt_limit
        # verbose=False: no "longer than the specified maximum" warning from transformers; the error below says it.
        ids = self.tokenizer([e["prompt"] for e in examples], add_special_tokens=False, verbose=False)["input_ids"]
        for example, tokens in zip(examples, ids, strict=True):
            if len(tokens) > max_tokens:
                raise ValueError(
                    f"the prompt of example {example.get('id')!r} ({where}) has {len(tokens)} tokens, more than "
                    f"{reason}. Drop or shorten such rows, or shorten prompt_template."
                )

    def check_world_size(self, world_size: int) -> None:
        """Fail now (in the launching process, before DDP starts its workers) if the batches cannot be sharded."""
        self._prompts_per_rank(world_size)
        if self.val_source is not None and self._val_count() % world_size:
            raise ValueError(self._val_share_error(self._val_count(), world_size))

    # --- distributed layout ------------------------------------------------------------------------

    def rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _prompts_per_rank(self, world_size: int) -> int:
        if self.prompts_per_step % world_size:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} is the global number of prompts per step and "
                f"must be divisible by the world size ({world_size} processes); choose a multiple of "
                f"{world_size}."
            )
        return self.prompts_per_step // world_size

    # --- training ----------------------------------------------------------------------------------

    def examples_for_step(self, step: int, rank: int | None = None, world_size: int | None = None) -> list[dict]:
        """Rendered examples of RL step ``step`` for one rank (default: this process's rank)."""
        if rank is None or world_size is None:
            rank, world_size = self.rank_and_world_size()
        per_rank = self._prompts_per_rank(world_size)
        first = step * self.prompts_per_step + rank * per_rank
        examples = [self._render(self._train_example(p)) for p in range(first, first + per_rank)]
        if _is_procedural(self.train_source):  # file rows were all checked by limit_prompt_tokens
            self._check_prompt_lengths(examples, f"train_source, RL step {step}")
        return examples

    def refill_examples(
        self, step: int, round_: int, rank: int | None = None, world_size: int | None = None
    ) -> list[dict]:
        """Rendered examples of extra generation round ``round_`` (>= 1) of RL step ``step`` for one rank (dynamic
        sampling, :mod:`simko.sampling_filters`), as many as :meth:`examples_for_step` gives it.

        A stream of its own, keyed by (seed, step, round): ``prompts_per_step`` distinct rows of a file source drawn
        by a generator seeded with them (rows may repeat across rounds and steps, and may also be in the main
        stream's batch), or, for a procedural source, examples at hashed indices. The main stream is untouched, and
        the prompts of a round do not depend on how many rounds earlier steps drew, so a resumed run refills as the
        uninterrupted run did. Rank ``r`` takes its contiguous slice, as in the main stream.
        """
        if round_ < 1:
            raise ValueError(f"refill rounds count from 1, got {round_}")
        if rank is None or world_size is None:
            rank, world_size = self.rank_and_world_size()
        per_rank = self._prompts_per_rank(world_size)
        positions = range(rank * per_rank, (rank + 1) * per_rank)
        source = self.train_source
        if _is_procedural(source):
            examples = [dict(source.example(_refill_index(self.seed, step, round_, j))) for j in positions]
        else:
            rng = np.random.default_rng([self.seed, step, round_, _REFILL_STREAM])
            rows = rng.choice(len(source), size=self.prompts_per_step, replace=self.prompts_per_step > len(source))
            examples = [dict(source[int(rows[j])]) for j in positions]
        examples = [self._render(example) for example in examples]
        if _is_procedural(source):  # file rows were all checked by limit_prompt_tokens
            self._check_prompt_lengths(examples, f"train_source, RL step {step} refill round {round_}")
        return examples

    def _train_example(self, position: int) -> dict[str, Any]:
        """The example at a global position of the endless training stream."""
        source = self.train_source
        if _is_procedural(source):
            return dict(source.example(position))
        epoch, offset = divmod(position, len(source))
        return dict(source[int(self._permutation(epoch)[offset])])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:  # a step spans at most two epochs when P <= len
                self._permutations.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(len(self.train_source))
        return self._permutations[epoch]

    def _render(self, example: dict[str, Any]) -> dict[str, Any]:
        example["prompt"] = render_prompt(example, self.tokenizer, self.prompt_template, self.use_chat_template)
        return example

    def train_dataloader(self) -> DataLoader:
        self._prompts_per_rank(self.rank_and_world_size()[1])  # fail at start, not at the first batch
        # batch_size=None: the dataset already yields whole step batches; num_workers=0 keeps a single
        # copy of the datamodule (and its next_step) in this process.
        return DataLoader(_TrainSteps(self), batch_size=None, num_workers=0)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning fetches one batch ahead, so the dataloader has already produced step s + 1 while
        # step s trains: counting yielded batches would make a checkpoint skip a step on resume. This
        # hook runs on the batch that is about to be trained, so "next = this step + 1" is exact when
        # a checkpoint is written after it. Validation batches (lists) pass through untouched.
        # (If the LightningModule overrides this hook too, Lightning still calls this one and warns.)
        if isinstance(batch, dict) and "step" in batch:
            self.next_step = int(batch["step"]) + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_step = int(state_dict["next_step"])

    # --- validation --------------------------------------------------------------------------------

    def val_examples(self, rank: int | None = None, world_size: int | None = None) -> list[dict]:
        """This rank's contiguous share of the fixed held-out set, rendered."""
        if self.val_source is None:
            return []
        if rank is None or world_size is None:
            rank, world_size = self.rank_and_world_size()
        source = self.val_source
        count = self._val_count()
        examples = [dict(source.example(i)) if _is_procedural(source) else source[i] for i in range(count)]
        if len(examples) % world_size:
            raise ValueError(self._val_share_error(len(examples), world_size))
        share = len(examples) // world_size
        rendered = [self._render(example) for example in examples[rank * share : (rank + 1) * share]]
        if _is_procedural(source):  # file rows were all checked by limit_prompt_tokens
            self._check_prompt_lengths(rendered, "val_source")
        return rendered

    def _val_count(self) -> int:
        if _is_procedural(self.val_source):
            return self.val_prompts
        return len(self.val_source) if self.val_prompts is None else min(self.val_prompts, len(self.val_source))

    @staticmethod
    def _val_share_error(count: int, world_size: int) -> str:
        # Equal shares keep every rank running the same number of validation steps, so collective ops (metric
        # sync) cannot hang on one rank.
        return (
            f"the val set has {count} prompts, not divisible by the world size ({world_size}); "
            f"set val_prompts to a multiple of {world_size}."
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        rank, world_size = self.rank_and_world_size()
        examples = self.val_examples(rank, world_size)
        batch_size = self.val_batch_size or self._prompts_per_rank(world_size)
        batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        return DataLoader(_FixedBatches(batches), batch_size=None, num_workers=0)


def _is_procedural(source: Source) -> bool:
    return callable(getattr(source, "example", None))


_REFILL_STREAM = 0x5EED  # the last seed word of the refill stream's generator (the main stream's has two words)


def _refill_index(seed: int, step: int, round_: int, position: int) -> int:
    """The procedural-source index of a refill prompt: a 62-bit hash of (seed, step, round, position)."""
    digest = hashlib.blake2b(f"refill/{seed}/{step}/{round_}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2
