"""A verifier of your own, plugged into the command line with the ``imports`` config key (docs/tasks.md).

    python -m simko.train imports=[examples.my_verifiers] \
        +data.train_source.verifier=digits +data.val_source.verifier=digits

``imports`` modules are imported before anything is built (the module names are found as ``python -m`` finds
them: installed packages, or the current directory, here the repository root). Importing this one registers the
verifier ``digits``; the examples then name it in their ``verifier`` field (here set on the arithmetic sources).
The function runs in killable worker processes, one completion at a time, with a timeout: a hang or a crash costs
that completion a 0.0 and a count in ``verifier/timeouts`` / ``verifier/errors``, never the run.

``digits`` gives partial credit on integer answers: the share of the gold answer's digits that the completion's
final answer has right, aligned from the right (gold 46: "46" scores 1.0, "47" 0.5, "146" 2/3, "x" 0.0). Only a
1.0 counts as a solve for pass@k.
"""

from simko.rewards import extract_final_answer, register_verifier


@register_verifier("digits")
def digits(completions: list[str], answers: list[str]) -> list[float]:
    scores = []
    for completion, answer in zip(completions, answers):
        pred, gold = extract_final_answer(completion).strip(), str(answer).strip()
        if not pred.isdecimal() or not gold.isdecimal():
            scores.append(0.0)
            continue
        width = max(len(pred), len(gold))
        right = sum(p == g for p, g in zip(pred.zfill(width)[::-1], gold.zfill(width)[::-1]))
        scores.append(right / width)
    return scores
