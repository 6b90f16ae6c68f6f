"""simko.evaluation: sample_and_score and SampleMetrics (pass@k, diversity, diagnostics), the one path that
RLVRModule.validation_step and simko.eval both run; the entry points' config-error exit (simko.checks)."""

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

import simko.eval
import simko.evaluation
import simko.module
from helpers import UNTRAINED_TINY, compose_config, digit_tokenizer, random_qwen2
from simko.checks import CONFIG_ERRORS, ConfigError, exit_with_config_error
from simko.diagnostics import concentration_sums, metrics_from_sums
from simko.engines import Sampling, build_engine
from simko.evaluation import SampleMetrics, sample_and_score
from simko.forward import rollout_token_stats
from simko.losses import build_loss
from simko.metrics import pass_at_k, problem_diversity
from simko.metrics.diversity import text_key
from simko.module import RLVRModule


def odd_length_scorer(completions, answers, names):
    """A verifier stand-in: correct when the completion has an odd number of characters (mixed groups)."""
    return [float(len(c) % 2) for c in completions]


def _batch(model, tok, prompts, seed):
    examples = [{"prompt": p, "answer": "0", "verifier": "exact", "num_solutions": 3} for p in prompts]
    engine = build_engine("hf", model, tok)
    rollouts, scores, timings = sample_and_score(
        engine, tok, examples, 4, Sampling(max_new_tokens=5, seed=seed), odd_length_scorer
    )
    return examples, rollouts, scores, timings


def test_sample_and_score_scores_every_completion_prompt_major():
    tok, model = digit_tokenizer(), random_qwen2(seed=3)
    examples, rollouts, scores, timings = _batch(model, tok, ["12+3=", "5+5="], seed=1)
    assert rollouts.num_rows == 8 and rollouts.group_size == 4
    assert scores.dtype == torch.float32 and scores.tolist() == odd_length_scorer(rollouts.completions, [], [])
    assert set(timings) == {"time/generate", "time/score"}
    seen = []
    sample_and_score(
        build_engine("hf", model, tok),
        tok,
        [{"prompt": "12+3=", "answer": "15", "verifier": "exact"}],
        2,
        Sampling(max_new_tokens=2),
        lambda c, a, n: seen.append((a, n)) or [0.0] * len(c),
    )
    assert seen == [(["15", "15"], ["exact", "exact"])]


def test_sample_metrics_equal_their_definitions_over_batches():
    """Two batches: pass@k and mean@n per problem, the diversity of the correct samples (text keys, 3 solutions
    each) and the diagnostics of the diagnosed rows' token sums, each as its definition computes it."""
    tok, model = digit_tokenizer(), random_qwen2(seed=3)
    batches = [_batch(model, tok, ["12+3=", "5+5="], seed=1), _batch(model, tok, ["71+40="], seed=2)]
    token_stats = partial(rollout_token_stats, model, temperature=1.0)
    metrics = SampleMetrics([1, 2, 4], diagnostics_top_k=3, diagnostics_tau=0.8)
    sums: dict[str, float] = {}
    diversity_rows, passes, means = [], {1: [], 2: [], 4: []}, []
    for b, (examples, rollouts, scores, _) in enumerate(batches):
        rows = torch.tensor([0, 1, 4, 5]) if b == 0 else None  # a subset of rows for the diagnostics, then all
        correct = metrics.update(examples, rollouts, scores, token_stats, micro_batch_size=3, diagnostic_rows=rows)
        assert correct.shape == (len(examples), 4) and torch.equal(correct.reshape(-1), scores >= 1)
        with torch.no_grad():
            full = token_stats(rollouts.rows(torch.arange(rollouts.num_rows) if rows is None else rows), 3)
        for key, value in concentration_sums(full, 0.8).items():
            sums[key] = sums.get(key, 0.0) + value
        for p in range(len(examples)):
            c = int(correct[p].sum())
            for k in passes:
                passes[k].append(pass_at_k(4, c, k))
            means.append(c / 4)
            keys = [text_key(rollouts.completions[p * 4 + i], "0") if correct[p, i] else None for i in range(4)]
            diversity_rows.append(problem_diversity(keys, 3))
    assert metrics.update_count == 2
    result, diversity, diagnostics = metrics.compute()
    for k, values in passes.items():
        assert result[k] == pytest.approx(sum(values) / len(values), rel=1e-12)
    assert result["mean@n"] == pytest.approx(sum(means) / len(means), rel=1e-12)
    for key in ("distinct_correct", "solution_coverage"):
        assert diversity[key] == pytest.approx(sum(r[key] for r in diversity_rows) / len(diversity_rows))
    want = metrics_from_sums(sums)
    assert set(diagnostics) == set(want) and "p_rank3" in diagnostics
    for key, value in want.items():
        assert diagnostics[key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
    assert sums["tokens"] == float(batches[0][1].response_mask[[0, 1, 4, 5]].sum() + batches[1][1].response_mask.sum())
    # compute() resets: the next evaluation starts empty
    assert metrics.update_count == 0 and metrics.diagnostic_sums == {}


def test_validation_and_simko_eval_run_the_same_path(monkeypatch, tmp_path):
    """RLVRModule.validation_step and simko.eval.evaluate both sample and score through sample_and_score and
    accumulate through SampleMetrics.update; what the module logs is what SampleMetrics computes."""
    from simko.data import ArithmeticSource, PromptDataModule

    assert simko.module.sample_and_score is simko.evaluation.sample_and_score is simko.eval.sample_and_score
    assert simko.module.SampleMetrics is SampleMetrics is simko.eval.SampleMetrics
    calls, results = [], []
    real_sample, real_update, real_compute = sample_and_score, SampleMetrics.update, SampleMetrics.compute

    def sample(engine, tokenizer, examples, group_size, *args, **kwargs):
        calls.append(("sample", len(examples), group_size))
        return real_sample(engine, tokenizer, examples, group_size, *args, **kwargs)

    shadow = SampleMetrics(ks=(1, 2, 4), diagnostics_top_k=10)  # simko.eval's batches, accumulated in one metric

    def update(self, examples, rollouts, *args, **kwargs):
        calls.append(("update", len(examples), rollouts.group_size))
        if self.diagnostics_top_k == 10:  # simko.eval's metric (the module's has 3)
            real_update(shadow, examples, rollouts, *args, **kwargs)
        return real_update(self, examples, rollouts, *args, **kwargs)

    def compute(self, *args, **kwargs):
        results.append(real_compute(self, *args, **kwargs))
        return results[-1]

    for owner in (simko.module, simko.eval):
        monkeypatch.setattr(owner, "sample_and_score", sample)
    monkeypatch.setattr(SampleMetrics, "update", update)
    monkeypatch.setattr(SampleMetrics, "compute", compute)

    tok = digit_tokenizer()
    module = RLVRModule(
        random_qwen2(seed=1),
        tok,
        build_loss("grpo"),
        optimizer=torch.optim.SGD,
        group_size=2,
        max_new_tokens=4,
        val_samples=4,
        verifier=odd_length_scorer,
        diagnostics_top_k=3,
    )
    data = PromptDataModule(
        ArithmeticSource(seed=0, split="train"),
        val_source=ArithmeticSource(seed=0, split="val"),
        prompts_per_step=2,
        val_prompts=4,
        prompt_template="{question}=",
        use_chat_template=False,
        tokenizer=tok,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(module, datamodule=data, verbose=False)
    assert calls == [("sample", 2, 4), ("update", 2, 4)] * 2
    (pass_k, diversity, diagnostics), logged = results[0], trainer.callback_metrics
    assert float(logged["val/pass@1"]) == pytest.approx(pass_k[1]) and float(logged["val/mean@n"]) == pytest.approx(
        pass_k["mean@n"]
    )
    assert float(logged["val/distinct_correct"]) == pytest.approx(diversity["distinct_correct"])
    assert float(logged["val/p_rank1"]) == pytest.approx(diagnostics["p_rank1"])

    calls.clear()
    cfg = compose_config(
        [
            f"paths.output_dir={tmp_path / 'eval'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *UNTRAINED_TINY,
            "eval.n=4",
            "eval.limit=4",
            "eval.max_new_tokens=4",
        ],
        config_name="eval",
    )
    summary = simko.eval.evaluate(cfg, tmp_path / "eval")
    assert calls == [("sample", 1, 4), ("update", 1, 4)] * 4  # one problem per generate call, recorded after each
    assert len(results) == 1  # simko.eval summarizes its per-problem records (simko.eval_store), as a merge does
    # ... and its summary of the records is what one SampleMetrics over all problems computes (pass@k and diversity
    # exactly; the diagnostics' token sums are added per problem, so to float rounding)
    pass_k, diversity, diagnostics = real_compute(shadow)
    assert summary["pass_at_k"] == {str(k): pass_k[k] for k in (1, 2, 4)} and summary["mean@n"] == pass_k["mean@n"]
    assert summary["diversity"] == pytest.approx(diversity, rel=0, abs=0, nan_ok=True)
    assert summary["diagnostics"] == pytest.approx(diagnostics, rel=1e-12)


def test_config_errors_exit_with_one_line(capsys):
    assert ConfigError in CONFIG_ERRORS or issubclass(ConfigError, CONFIG_ERRORS)
    with pytest.raises(SystemExit) as stop:
        exit_with_config_error(ConfigError("rollout.top_p=1.5: must be a number in (0, 1]"))
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: rollout.top_p=1.5: must be a number in (0, 1]\n"
    with pytest.raises(SystemExit):
        exit_with_config_error(KeyError())
    assert capsys.readouterr().err == "error: KeyError\n"
