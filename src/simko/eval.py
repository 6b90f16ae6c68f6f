"""Evaluate a checkpoint or a base model: pass@k from n samples per problem, to n = 1024 and beyond.

    python -m simko.eval ckpt_path=logs/train/runs/.../checkpoints/last.ckpt data=arithmetic eval.n=64
    python -m simko.eval model=smollm2-135m data=gsm8k eval.n=16 eval.limit=50 eval.max_new_tokens=512
    python -m simko.eval ... eval.n=1024 eval.shard=0/4 hydra.run.dir=logs/eval/runs/e1024_0   # shard 0 of 4
    python -m simko.eval_merge logs/eval/runs/e1024_{0,1,2,3} --out logs/eval/runs/e1024

For every problem of the data config's held-out set (``val_source``) it samples ``eval.n`` completions in one
generate call (the paper's protocol by default: temperature 0.6, top-p 0.95), seeded by the problem's index in the
held-out set, scores them with the examples' verifiers in the killable process pool, and appends the problem's
record to ``problems.jsonl`` before the next problem (``simko.eval_store``): memory holds one problem's n samples,
a rerun into the same ``hydra.run.dir`` resumes after the last recorded problem (the same config only), and
``eval.shard=I/N`` evaluates the I-th of N ranges of problems, merged by ``python -m simko.eval_merge`` into what
the unsharded run writes. A run of all the problems writes into its run folder:

- ``pass_at_k.json``  mean unbiased pass@k for ``eval.ks`` (default 1, 2, 4, ..., n) with 95 % bootstrap intervals
                      over problems (``simko.metrics.uncertainty``), cover@tau with its intervals
                      (``simko.metrics.cover``), mean@n, maj@n, diagnostics, solution diversity
                      (``simko.metrics.diversity``)
- ``per_problem.csv`` problem id, c (correct), n, gold answer, the extracted answers, the prompt and one sample
  completion (the first of the n, with ``sample_correct``)
- ``pass_at_k.png``   the pass@k curve on a log-k axis

It also records the probability-concentration diagnostics (mean p(rank k) of the model on its own samples).
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from simko.config import check_torch_extensions  # noqa: E402

check_torch_extensions()  # a torchvision built for another torch: the fix, before `import lightning` fails

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from simko.atomic import atomic_write  # noqa: E402
from simko.checkpointing import CheckpointError, policy_state_dict, read_checkpoint  # noqa: E402
from simko.checks import (  # noqa: E402
    ConfigError,
    build_data,
    check_against_model,
    check_eval_config,
    exit_with_config_error,
)
from simko.config import check_config_dir, import_modules  # noqa: E402
from simko.console import progress_bar  # noqa: E402
from simko.engines import Sampling, build_engine, check_engine, step_seed  # noqa: E402
from simko.eval_store import (  # noqa: E402
    STATE_VERSION,
    check_resume,
    fingerprint,
    open_state,
    parse_shard,
    recorded_indices,
    shard_range,
    summarize,
    write_csv,
    write_record,
)
from simko.evaluation import SampleMetrics, sample_and_score  # noqa: E402
from simko.forward import rollout_token_stats  # noqa: E402
from simko.metrics import default_ks, majority_at_n  # noqa: E402
from simko.models.lora import load_adapter_checkpoint, load_model  # noqa: E402
from simko.rewards import final_answer, score_batch  # noqa: E402

log = logging.getLogger(__name__)


def load_checkpoint_into(policy: torch.nn.Module, ckpt_path: str) -> None:
    """Load the policy weights of a checkpoint written by ``simko.train`` (``last.ckpt`` or a weights-only
    ``stepNNNNNN.ckpt``), weights-only: a file that would execute code when unpickled is refused, not run."""
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path)
    if checkpoint.get("lora"):  # a LoRA run's checkpoint: its adapter config and weights, merged into the base
        load_adapter_checkpoint(policy, checkpoint, f"checkpoint {path}")
        return
    policy_state = policy_state_dict(checkpoint, path)
    missing, unexpected = policy.load_state_dict(policy_state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match model: missing {missing[:5]}, unexpected {unexpected[:5]}")


@torch.no_grad()
def evaluate(cfg: DictConfig, out_dir: Path) -> dict | None:
    """Evaluate this call's problems into ``out_dir``, one record per problem, skipping the recorded ones; when
    they are all the selected problems, write the summary and return it (a shard returns None)."""
    import_modules(cfg.get("imports"))  # user modules (e.g. verifiers) before anything is built
    engine_name = cfg.rollout.get("engine", "hf")  # the trainer's engine (rollout.engine) and its knobs
    check_engine(engine_name, cfg.rollout.get(engine_name))  # e.g. vLLM missing: fail before the model loads
    torch.manual_seed(cfg.seed)
    check_eval_config(cfg)
    shard = parse_shard(cfg.eval.get("shard"))
    check_resume(out_dir, fingerprint(cfg))  # a rerun into this folder with another config: refused before loading
    datamodule = build_data(cfg)  # before the model: a bad data path fails in seconds
    policy, tokenizer = load_model(cfg.model, apply=False)  # a LoRA adapter comes from the checkpoint
    if cfg.get("ckpt_path"):
        load_checkpoint_into(policy, cfg.ckpt_path)
    policy.eval()
    datamodule.set_tokenizer(tokenizer)
    check_against_model(policy, datamodule)  # eval does not cut prompts: none may exceed the context
    problems = datamodule.val_examples()
    if cfg.eval.limit:
        problems = problems[: int(cfg.eval.limit)]
    if not problems:
        raise ValueError(f"data config {cfg.data._target_} has no held-out problems (val_source) to evaluate")
    n = int(cfg.eval.n)
    ks = sorted(int(k) for k in cfg.eval.ks) if cfg.eval.ks else default_ks(n)
    lo, hi = shard_range(len(problems), shard)
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)  # the values used (T, top-p, max tokens), as reports show
    eval_cfg.pop("shard", None)  # merged shards summarize as the unsharded run does
    state = {
        "version": STATE_VERSION,
        "fingerprint": fingerprint(cfg),
        "num_problems": len(problems),
        "ks": ks,
        "shard": list(shard) if shard else None,
        "range": [lo, hi],
        "config": {  # the summary's "config"
            "model": OmegaConf.to_container(cfg.model),
            "ckpt_path": cfg.get("ckpt_path"),
            "data": cfg.data._target_,
            "dataset": _choice("data"),  # the data config's name (for plot titles), None outside Hydra
            "split": getattr(datamodule.val_source, "split", None),
            "held_out": repr(datamodule.val_source),
            "eval": eval_cfg,
        },
    }
    open_state(out_dir, state)  # a folder of another evaluation's config: refused here
    done = recorded_indices(out_dir)
    todo = [i for i in range(lo, hi) if i not in done]
    if done:
        log.info(
            "resuming in %s: %d of %d problems recorded, %d to go", out_dir, hi - lo - len(todo), hi - lo, len(todo)
        )
    verifiers = instantiate(cfg.eval.verifiers) if cfg.eval.get("verifiers") else None
    score = partial(score_batch, verifiers=verifiers)
    diag_k = min(int(cfg.eval.diagnostics_top_k), policy.get_output_embeddings().weight.shape[0])
    temperature = float(cfg.eval.temperature)
    metrics = SampleMetrics(ks, diag_k, float(cfg.eval.diagnostics_tau))
    token_stats = partial(rollout_token_stats, policy, temperature=temperature)  # (rows, top_k) -> TokenStats
    micro_batch_size = int(cfg.eval.micro_batch_size)  # rows per forward of the diagnostics
    diagnostic_rows = _diagnostics_rows(1, n, cfg.eval.get("diagnostics_samples"))
    engine = build_engine(engine_name, policy, tokenizer, **(cfg.rollout.get(engine_name) or {})) if todo else None

    with progress_bar("eval", len(todo)) as advance:
        for index in todo:
            record = _evaluate_problem(
                cfg, index, problems[index], engine, tokenizer, n, score, verifiers, metrics, token_stats,
                micro_batch_size, diagnostic_rows,
            )  # fmt: skip
            write_record(out_dir, record)  # durable before the next problem starts
            advance(1)
    if engine is not None:
        engine.close()
    if (lo, hi) != (0, len(problems)):
        log.info(
            "shard %s: problems %d..%d of %d recorded in %s; merge all shards with python -m simko.eval_merge "
            "<shard folders> --out <new folder>", cfg.eval.shard, lo, hi - 1, len(problems), out_dir,
        )  # fmt: skip
        return None
    return summarize([out_dir], out_dir, write_outputs)


def _evaluate_problem(
    cfg, index, ex, engine, tokenizer, n, score, verifiers, metrics, token_stats, micro_batch_size, diagnostic_rows
) -> dict:
    """Sample, score and diagnose one problem: its record for ``problems.jsonl`` (``simko.eval_store``).

    One problem per generate call, seeded by its index in the held-out set: its samples are the same whether it is
    evaluated in one run, in a shard, or after a resume."""
    sampling = Sampling(
        max_new_tokens=int(cfg.eval.max_new_tokens),
        temperature=float(cfg.eval.temperature),
        top_p=float(cfg.eval.top_p),
        seed=step_seed(cfg.seed, index, 0),
    )
    rollouts, scores, times = sample_and_score(engine, tokenizer, [ex], n, sampling, score)
    started = time.perf_counter()  # the update's share is the diagnostics forward (the rest is counting)
    correct = metrics.update([ex], rollouts, scores, token_stats, micro_batch_size, diagnostic_rows)[0].tolist()
    diagnostics_s = time.perf_counter() - started
    state = metrics.take()  # this problem's diversity values and diagnostic token sums; the metric is empty again
    extracted = [final_answer(c, ex["verifier"], verifiers) for c in rollouts.completions]  # what its verifier reads
    row = problem_row(ex.get("id", index), ex, rollouts.completions, extracted, correct, rollouts.truncated.tolist())
    return {
        "index": index,
        "c": row["c"],
        "majority_correct": int(majority_at_n([extracted], [correct])),
        "diversity": state["diversity"],
        "diagnostic_sums": state["diagnostic_sums"],
        "response_tokens": int(rollouts.response_mask.sum()),  # generated tokens up to and including EOS
        "truncated": int(rollouts.truncated.sum()),  # samples without EOS within max_new_tokens
        "no_final_answer": sum(answer is None for answer in extracted),
        "seconds": {"generate": times["time/generate"], "score": times["time/score"], "diagnostics": diagnostics_s},
        "row": row,
    }


PER_PROBLEM_COLUMNS = ["id", "c", "n", "answer", "extracted", "correct", "truncated", "prompt", "sample_completion",
                       "sample_correct"]  # fmt: skip


def problem_row(
    problem_id,
    example: dict,
    completions: list[str],
    extracted: list[str],
    correct: list[bool],
    truncated: list[bool] | None = None,
) -> dict[str, object]:
    """One row of ``per_problem.csv``: the problem, its counts, per sample (JSON lists, in sample order) the
    extracted answer, whether it was correct and whether it was cut off at ``max_new_tokens``, and the prompt with
    the first sample's completion (whether that sample was correct: ``sample_correct``)."""
    return {
        "id": problem_id,
        "c": int(sum(correct)),
        "n": len(completions),
        "answer": example["answer"],
        "extracted": json.dumps(extracted, ensure_ascii=False),
        "correct": json.dumps([int(bool(x)) for x in correct]),
        "truncated": json.dumps([int(bool(x)) for x in truncated]) if truncated is not None else "",
        "prompt": example.get("prompt", example.get("question")),
        "sample_completion": completions[0] if completions else "",
        "sample_correct": int(bool(correct[0])) if correct else 0,
    }


def _diagnostics_rows(num_prompts: int, n: int, samples: int | None) -> torch.Tensor:
    """Rows of a prompt-major batch whose diagnostics are computed: the first ``samples`` of each prompt's n
    (all when None). The forward they need costs about half of sampling: a subset keeps n = 256 affordable."""
    rows = torch.arange(num_prompts * n).view(num_prompts, n)
    return rows[:, : min(int(samples), n)].reshape(-1) if samples else rows.reshape(-1)


def _choice(group: str) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def write_outputs(summary: dict, rows, out_dir: Path) -> None:
    """``per_problem.csv`` (``rows``: any iterable, written as it is read), ``pass_at_k.json`` and the plot; each
    file complete or absent (written beside, fsynced, renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2, default=str).encode()
    write_csv(rows, out_dir / "per_problem.csv", PER_PROBLEM_COLUMNS)
    atomic_write(out_dir / "pass_at_k.json", lambda f: f.write(text))
    from simko.plot import plot_pass_at_k

    ckpt = summary.get("config", {}).get("ckpt_path")
    label = f"{Path(ckpt).parent.parent.name}/{Path(ckpt).name}" if ckpt else "base model"
    plot_pass_at_k({label: summary}, out_dir / "pass_at_k.png")


@hydra.main(config_path=check_config_dir(), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.paths.output_dir)
    try:
        summary = evaluate(cfg, out_dir)
    except ConfigError as err:  # a bad knob or bad data, found at start: one message, no traceback
        exit_with_config_error(err)
    except CheckpointError as err:  # unreadable, truncated or untrusted: one message naming the file
        exit_with_config_error(err)
    if summary is None:  # a shard: its records are written; the summary comes from the merge
        return
    table = "  ".join(f"pass@{k}={v:.3f}" for k, v in summary["pass_at_k"].items())
    log.info("%d problems x n=%d: %s  maj@n=%.3f", summary["num_problems"], summary["n"], table, summary["maj@n"])
    log.info("wrote %s", out_dir)


if __name__ == "__main__":
    main()
