"""One rank of the 2-process vLLM weight-sync check (tests/test_vllm.py starts it with torch.distributed.run).

Each rank builds the same tiny policy, wraps it for ``--mode ddp`` (the plain module, as Lightning's DDP hands it
to the engine) or ``--mode fsdp2`` (``fully_shard`` on every block and the root), builds its own colocated vLLM
engine (external launcher on the gloo group), takes one optimizer step on rank-specific data (gradients averaged
across ranks), pushes the weights and checks that the engine's greedy answers equal HF ``generate`` of the full
updated weights. Under FSDP2 it also checks that the push gathers one tensor at a time (``full_weights`` is lazy).
Writes ``rank<r>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from simko.engines import Sampling, build_engine
    from simko.engines.vllm import full_weights
    from test_vllm import EOS, hf_greedy, ids_of, tiny_policy

    policy, tok = tiny_policy(seed=3)
    reference, _ = tiny_policy(seed=3)  # an unsharded copy: gets the full weights after the step
    if args.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in policy.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(policy, mesh=mesh)
        calls = []
        from torch.distributed.tensor import DTensor

        real = DTensor.full_tensor

        def counting(self, *a, **kw):
            calls.append(1)
            return real(self, *a, **kw)

        DTensor.full_tensor = counting
        it = full_weights(policy)
        next(it)
        lazy = len(calls) == 1
        list(it)  # finish the collectives on every rank
        DTensor.full_tensor = real
    else:
        lazy = True

    engine = build_engine("vllm", policy, tok, kv_cache_gib=0.05, max_model_len=512)
    prompts = ["12+34=", "5+5="] if rank == 0 else ["7+8=", "99+1="]
    prompt_ids = ids_of(tok, prompts)
    greedy = Sampling(max_new_tokens=8, temperature=0.0)

    def engine_answers():
        r = engine.generate(prompt_ids, 1, greedy)
        return [r.response_tokens[n, : int(r.response_mask[n].sum())].tolist() for n in range(len(prompt_ids))]

    before = engine_answers()
    before_ok = before == [hf_greedy(reference, ids, 8) for ids in prompt_ids]

    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    target = torch.tensor([[5 + rank] * 8])
    opt.zero_grad()
    logits = policy(target).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
    if args.mode == "ddp":  # what DDP's all-reduce does
        for p in policy.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    opt.step()
    engine.sync_weights(policy)
    full = {name: tensor.clone() for name, tensor in full_weights(policy)}
    reference.load_state_dict(full)
    after = engine_answers()
    expected = [hf_greedy(reference, ids, 8) for ids in prompt_ids]
    engine.close()
    result = {
        "rank": rank,
        "before_ok": before_ok,
        "after_ok": after == expected,
        "changed": after != before,
        "lazy": lazy,
        "after": after,
        "expected": expected,
        "eos": EOS,
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
