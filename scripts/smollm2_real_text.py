"""What goes wrong on real text: the SmolLM2 recipe's prompts, responses, tokenizer and verifier, measured.

    python scripts/smollm2_real_text.py                                   # the pretrained model, 32 problems x 8
    python scripts/smollm2_real_text.py --ckpt logs/smollm2/.../last.ckpt # a trained checkpoint
    python scripts/smollm2_real_text.py --samples logs/smollm2/.../samples.jsonl --no-sampling

It samples held-out problems of ``experiment=smollm2_math_level1_eval`` with the engine the recipe uses (vLLM, one
thread) and reports, as JSON (``--out``) and on screen:

- **chat template**: the prompt as the model reads it (its token ids decoded), whether the template added a system
  message the config did not ask for, and the EOS ids the engine stops at;
- **truncation**: the share of responses without EOS within the budget, and whether every other response ends with
  EOS (``<|im_end|>``);
- **special tokens inside responses**: ``build_rollouts`` decodes with ``skip_special_tokens=True``, so a special
  token the model writes mid-response vanishes from the text the verifier reads;
- **tokenizer round trips**: the sampled ids decoded, re-encoded and decoded again; the share whose text changes and
  the share whose ids differ (a non-canonical tokenization: harmless here, the update scores the sampled ids);
- **answer extraction**: the share with a complete ``\\boxed{}``, the share scored without one (math-verify's own
  extraction of the text), and examples of each;
- **verifier time**: seconds per completion in the killable worker pool.

- **restated question**: the share of the first ``--restated-problems`` held-out problems (100: the recipe's
  evaluation; ``--restated-split train`` the training problems) whose own question, scored as a completion, is
  rewarded, and their ids; and the share of their gold answers that score, written unboxed and boxed. The math
  verifier's unboxed fallback credits only a final value, so mostly a question whose last number is its plain
  answer still scores.

``--samples`` re-scores the completions logged in a training run's ``samples.jsonl`` with the same verifier and
round-trips their text through the tokenizer: the logged reward must be the one the logged text gets (a run logged
before the verifier stopped crediting restated questions differs on those: ``reward_differs``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from simko.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="eval", overrides=overrides)


def round_trip(tokenizer, ids: list[int], eos: list[int]) -> dict:
    """The text of sampled ids as ``build_rollouts`` makes it, re-encoded and decoded again."""
    body = ids[:-1] if ids and ids[-1] in eos else ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    again = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {
        "text_changes": tokenizer.decode(again, skip_special_tokens=True) != text,
        "ids_differ": list(again) != list(body),
        "special_inside": [t for t in body if t in set(tokenizer.all_special_ids)],
        "text_without_skip_differs": tokenizer.decode(body, skip_special_tokens=False) != text,
    }


def sample_and_measure(cfg, args) -> dict:
    import torch
    from hydra.utils import instantiate

    from simko.engines import Sampling, build_engine
    from simko.eval import load_checkpoint_into
    from simko.models.lora import load_model
    from simko.rewards import score_batch
    from simko.rewards.extract import extract_boxed
    from simko.rollout import eos_ids, tokenize_prompts

    datamodule = instantiate(cfg.data)
    policy, tokenizer = load_model(cfg.model, apply=False)
    if args.ckpt:
        load_checkpoint_into(policy, args.ckpt)
    policy.eval()
    datamodule.set_tokenizer(tokenizer)
    problems = datamodule.val_examples()[: args.problems]
    eos = eos_ids(policy, tokenizer)
    prompt_ids = tokenize_prompts(tokenizer, [p["prompt"] for p in problems])
    seen_prompt = tokenizer.decode(prompt_ids[0], skip_special_tokens=False)
    engine = build_engine(cfg.rollout.engine, policy, tokenizer, **(cfg.rollout.get(cfg.rollout.engine) or {}))
    sampling = Sampling(int(cfg.eval.max_new_tokens), float(cfg.eval.temperature), float(cfg.eval.top_p), args.seed)
    started = time.perf_counter()
    with torch.no_grad():
        rollouts = engine.generate(prompt_ids, args.samples_per_problem, sampling)
    generate_s = time.perf_counter() - started
    engine.close()
    G = args.samples_per_problem
    answers = [p["answer"] for p in problems for _ in range(G)]
    verifiers = instantiate(cfg.eval.verifiers)
    score_batch(["\\boxed{1}"], ["1"], ["math"], verifiers=verifiers)  # start the workers before timing
    started = time.perf_counter()
    rewards = score_batch(rollouts.completions, answers, ["math"] * len(answers), verifiers=verifiers)
    score_s = time.perf_counter() - started
    for verifier in verifiers.values():
        verifier.close()

    rows = []
    for i, text in enumerate(rollouts.completions):
        ids = rollouts.response_tokens[i][rollouts.response_mask[i]].tolist()
        rows.append({"text": text, "reward": rewards[i], "truncated": bool(rollouts.truncated[i]),
                     "ends_with_eos": bool(ids) and ids[-1] in eos, "boxed": extract_boxed(text),
                     **round_trip(tokenizer, ids, eos)})  # fmt: skip
    return report(cfg, args, seen_prompt, tokenizer, eos, rows, generate_s, score_s, G)


def report(cfg, args, seen_prompt, tokenizer, eos, rows, generate_s, score_s, group) -> dict:
    def share(predicate, among=rows) -> float:
        return sum(map(predicate, among)) / max(len(among), 1)

    rewarded = [r for r in rows if r["reward"] >= 1.0]
    finished = [r for r in rows if not r["truncated"]]
    examples = {
        "rewarded_without_box": [r["text"] for r in rewarded if r["boxed"] is None][:3],
        "boxed": [r["text"] for r in rows if r["boxed"] is not None][:3],
        "text_changes_in_round_trip": [r["text"] for r in rows if r["text_changes"]][:3],
        "special_token_inside": [r["text"] for r in rows if r["special_inside"]][:3],
    }
    template_system = seen_prompt.startswith("<|im_start|>system")
    return {
        "checkpoint": args.ckpt or "pretrained",
        "samples": len(rows),
        "problems": len(rows) // group,
        "prompt_as_read": seen_prompt,
        "template_adds_system_message": template_system,
        "eos_ids": eos,
        "eos_tokens": [tokenizer.convert_ids_to_tokens(i) for i in eos],
        "pass@1": share(lambda r: r["reward"] >= 1.0),
        "truncated_frac": share(lambda r: r["truncated"]),
        "finished_end_with_eos": share(lambda r: r["ends_with_eos"], finished),
        "special_token_inside_frac": share(lambda r: bool(r["special_inside"])),
        "round_trip_text_changes_frac": share(lambda r: r["text_changes"]),
        "round_trip_ids_differ_frac": share(lambda r: r["ids_differ"]),
        "skip_special_tokens_changes_text_frac": share(lambda r: r["text_without_skip_differs"]),
        "boxed_frac": share(lambda r: r["boxed"] is not None),
        "rewarded_without_box_frac_of_rewarded": share(lambda r: r["boxed"] is None, rewarded),
        "rewarded_truncated_frac_of_rewarded": share(lambda r: r["truncated"], rewarded),
        "generate_s": generate_s,
        "verifier_s_per_completion": score_s / max(len(rows), 1),
        "examples": examples,
    }


def restated_question(cfg, count: int, split: str = "val") -> dict:
    """Each of the first ``count`` problems of ``split`` (val: held out) with its own question as the completion:
    the share rewarded (a verifier that credits what the model did not compute), and, as the check that right
    answers stay right, the share rewarded of the gold written unboxed ("The answer is $gold$.") and boxed."""
    from hydra.utils import instantiate

    from simko.rewards import score_batch

    source = getattr(instantiate(cfg.data), f"{split}_source")
    problems = [source[i] for i in range(min(len(source), count))]
    golds, names = [p["answer"] for p in problems], [p["verifier"] for p in problems]
    forms = {
        "question": [p["question"] for p in problems],
        "gold_unboxed": [f"The answer is ${gold}$." for gold in golds],
        "gold_boxed": [f"The answer is \\boxed{{{gold}}}." for gold in golds],
    }
    verifiers = instantiate(cfg.eval.verifiers)
    try:
        scores = {form: score_batch(texts, golds, names, verifiers=verifiers) for form, texts in forms.items()}
    finally:
        for verifier in verifiers.values():
            verifier.close()
    rewarded = [p for p, score in zip(problems, scores["question"]) if score >= 1.0]
    return {
        "split": split,
        "problems": len(problems),
        "reward_frac": len(rewarded) / max(len(problems), 1),
        "gold_unboxed_reward_frac": sum(scores["gold_unboxed"]) / max(len(problems), 1),
        "gold_boxed_reward_frac": sum(scores["gold_boxed"]) / max(len(problems), 1),
        "rewarded": [{"id": p["id"], "answer": p["answer"], "question_end": p["question"][-120:]} for p in rewarded],
    }


def check_samples(path: Path, cfg) -> dict:
    """Re-score a run's logged samples: the logged reward must be what the logged text scores."""
    from hydra.utils import instantiate

    from simko.models.lora import load_model
    from simko.rewards import score_batch

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    verifiers = instantiate(cfg.eval.verifiers)
    rescored = score_batch([r["completion"] for r in rows], [r["answer"] for r in rows],
                           [r["verifier"] for r in rows], verifiers=verifiers)  # fmt: skip
    for verifier in verifiers.values():
        verifier.close()
    _, tokenizer = load_model(cfg.model, apply=False)

    def round_trips(text: str) -> bool:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text

    changes = [r for r in rows if not round_trips(r["completion"])]
    return {
        "samples_file": str(path),
        "rows": len(rows),
        "reward_differs": sum(abs(a - r["reward"]) > 1e-9 for a, r in zip(rescored, rows)),
        "rewarded_logged": sum(r["reward"] >= 1.0 for r in rows),
        "rewarded_rescored": sum(score >= 1.0 for score in rescored),
        "text_changes_in_round_trip": len(changes),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a simko.train checkpoint (default: the pretrained model)")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--samples-per-problem", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=Path, help="also re-score a run's samples.jsonl")
    parser.add_argument("--no-sampling", action="store_true", help="only --samples (and the restated question)")
    parser.add_argument("--restated-problems", type=int, default=100, help="problems restated (0: skip)")
    parser.add_argument("--restated-split", choices=("val", "train"), default="val", help="val: the held-out ones")
    parser.add_argument("--out", type=Path, help="JSON file (default: logs/smollm2_real_text/<checkpoint>.json)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the eval config")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = compose(["experiment=smollm2_math_level1_eval", *args.overrides])
    result = {} if args.no_sampling else sample_and_measure(cfg, args)
    if args.restated_problems:
        result["restated_question"] = restated_question(cfg, args.restated_problems, args.restated_split)
    if args.samples:
        result["samples_check"] = check_samples(args.samples, cfg)
    name = Path(args.ckpt).parent.parent.name if args.ckpt else "pretrained"
    out = args.out or REPO / "logs" / "smollm2_real_text" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    json.dump({k: v for k, v in result.items() if k != "examples"}, sys.stdout, indent=2, ensure_ascii=False)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
