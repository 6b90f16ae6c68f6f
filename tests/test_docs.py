"""The docs hold together: every relative link and anchor resolves, the README states the commands CI runs, and the
README's "Extend it" examples run as written (a loss, a verifier, a rollout engine, a data source)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*```")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # link text may span lines
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: the heading's text, lowercased, without punctuation, spaces as hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    ids = set()
    for line in prose_lines(path.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def relative_links(path: Path) -> list[str]:
    prose = "\n".join(INLINE_CODE.sub("", line) for line in prose_lines(path.read_text()))
    targets = LINK.findall(prose)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with id {anchor!r} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_states_the_commands_ci_runs():
    ci_targets = re.findall(r"^make ([\w-]+)", (ROOT / ".ci" / "run").read_text(), flags=re.M)
    assert ci_targets, ".ci/run runs no make target"
    readme = (ROOT / "README.md").read_text()
    makefile_targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for target in ci_targets:
        assert f"make {target}" in readme, f"README does not state `make {target}`, which .ci/run runs"
    for target in set(re.findall(r"\bmake ([a-z][\w-]*)", readme)):
        assert target in makefile_targets, f"README names `make {target}`, which the Makefile does not define"


def extend_it_blocks() -> dict[str, str]:
    """The fenced blocks of README's "Extend it" section by the path their first line names (``# path[: ...]``)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Extend it") :]
    blocks = {}
    for body in re.findall(r"^```\w*\n(.*?)^```", section, flags=re.M | re.S):
        first, _, rest = body.partition("\n")
        path = re.match(r"#\s*([\w./-]+)", first)
        assert path, f"an Extend-it example does not start with the file it goes into: {first!r}"
        blocks[path.group(1)] = rest
    return blocks


def test_readme_extend_it_examples_run():
    """In a fresh process: the examples register into the global registries."""
    assert {"src/simko/losses/neg_weight.py", "configs/loss/neg_weight.yaml", "examples/my_verifiers.py"} <= set(
        extend_it_blocks()
    )
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().endswith("extend-it examples ok")


def run_extend_it_examples() -> None:
    """Load each Python example as the module its path names, then use it as the README says."""
    import types

    import torch
    import yaml
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    blocks = extend_it_blocks()
    modules = {}
    for path, code in blocks.items():
        if path.endswith(".py"):
            name = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
            module = types.ModuleType(name)
            module.__file__ = str(ROOT / path)
            sys.modules[name] = module
            exec(compile(code, path, "exec"), module.__dict__)
            modules[path] = module

    # --- the loss: its YAML over grpo.yaml builds it; at ratio 1 its gradient is GRPO's with the incorrect rows'
    # advantages scaled (float64)
    from simko.losses import LOSSES, TokenStats, build_loss

    loss_cfg = yaml.safe_load(blocks["configs/loss/neg_weight.yaml"])
    assert loss_cfg.pop("defaults") == ["grpo", "_self_"]
    knobs = {k: v for k, v in yaml.safe_load((ROOT / "configs/loss/grpo.yaml").read_text()).items() if k != "_target_"}
    knobs.update(loss_cfg)
    loss_fn = build_loss(**knobs)
    assert type(loss_fn) is LOSSES[loss_cfg["name"]] and loss_fn.neg_weight == loss_cfg["neg_weight"]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 11, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, 11, (6, 5), generator=generator)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[1, 3:] = False
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    advantages = build_loss("grpo").compute_advantages(rewards.view(2, 3)).view(-1)
    grads = {}
    for name, fn in (("grpo", build_loss("grpo")), ("example", loss_fn)):
        leaf = logits.clone().requires_grad_(True)
        stats = TokenStats.from_logits(leaf, tokens, mask, top_k=0)
        out = fn(stats, old_logprobs=stats.logprobs.detach(), advantages=advantages, rewards=rewards)
        out.loss.backward()
        grads[name] = leaf.grad
    scale = torch.where(rewards < 1.0, loss_fn.neg_weight, 1.0).to(torch.float64)[:, None, None]
    torch.testing.assert_close(grads["example"], grads["grpo"] * scale, rtol=1e-12, atol=1e-15)
    assert out.metrics["neg_weight/incorrect_frac"] == 0.5

    # --- the verifier: the working file's code (which tests/test_verifier_cli.py runs), with the partial credits its
    # docstring promises
    assert blocks["examples/my_verifiers.py"].strip() in (ROOT / "examples/my_verifiers.py").read_text()
    digits = modules["examples/my_verifiers.py"].digits
    assert digits(["46", "47", "146", "x"], ["46"] * 4) == [1.0, 0.5, 2 / 3, 0.0]

    # --- the engine: one chunk samples what the HF engine samples; smaller chunks give the same Rollouts layout
    from simko.engines import Sampling, build_engine
    from simko.models.char_tokenizer import build_char_tokenizer
    from simko.models.tiny import build_tiny_model

    tokenizer = build_char_tokenizer()
    small = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    policy = build_tiny_model(len(tokenizer), **small)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ["12+3=", "4+55=", "7+8=", "99+9="]]
    sampling = Sampling(max_new_tokens=5, seed=7)
    reference = build_engine("hf", policy, tokenizer).generate(prompts, 3, sampling)
    whole = build_engine("hf_chunked", policy, tokenizer, chunk=100).generate(prompts, 3, sampling)
    assert torch.equal(whole.input_ids, reference.input_ids) and whole.completions == reference.completions
    chunked = build_engine("hf_chunked", policy, tokenizer, chunk=2).generate(prompts, 3, sampling)
    first = build_engine("hf", policy, tokenizer).generate(prompts[:2], 3, sampling)
    assert chunked.num_rows == 12 and chunked.completions[:6] == first.completions

    # --- the data source: its YAML instantiates the data module; answers sorted; val disjoint from train
    data_cfg = OmegaConf.create({"seed": 3, "data": yaml.safe_load(blocks["configs/data/sorting.yaml"])})
    datamodule = instantiate(data_cfg.data)
    assert datamodule.train_source.seed == 3
    train = [ex for step in range(20) for ex in datamodule.examples_for_step(step, rank=0, world_size=1)]
    val = datamodule.val_examples(rank=0, world_size=1)
    assert len(train) == 20 * data_cfg.data.prompts_per_step and val
    assert all(ex["answer"] == "".join(sorted(ex["question"])) for ex in train + val)
    assert not {ex["question"] for ex in train} & {ex["question"] for ex in val}
    print("extend-it examples ok")


if __name__ == "__main__":
    run_extend_it_examples()
