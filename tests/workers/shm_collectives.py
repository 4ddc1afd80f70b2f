"""Worker for tests/test_shm_collectives.py (2 processes under torchrun): ZeRO's collectives through the
CPU backend's shared-memory routing, each checked against the exact answer, and a few ZeRO-3 training
steps whose final weights are written for comparison with a run on gloo."""

from __future__ import annotations

import json
import os
import sys

import torch

import accel
from accel import _shm_collectives as shm


def collective_cases(rank: int, world: int) -> dict:
    import deepspeed.comm as dist

    calls = {"n": 0}
    kernel = shm.shm_all_reduce

    def counted(tensor):
        calls["n"] += 1
        kernel(tensor)

    shm.shm_all_reduce = counted

    def via_kernel(fn) -> tuple[bool, bool]:
        before = calls["n"]
        ok = fn()
        return bool(ok), calls["n"] > before

    def reduce_case(dtype, numel=None, op=dist.ReduceOp.SUM, contiguous=True, group=None):
        def run():
            n = numel or 1000
            values = torch.arange(n, dtype=torch.float32) % 7 + rank * 3
            tensor = values.to(dtype)
            members = range(torch.distributed.get_world_size(group))  # ranks 0..k-1 (the sub-group: rank 0)
            expected = sum((torch.arange(n, dtype=torch.float32) % 7 + r * 3) for r in members).to(dtype)
            if op == dist.ReduceOp.MAX:
                expected = (torch.arange(n, dtype=torch.float32) % 7 + (world - 1) * 3).to(dtype)
            if not contiguous:  # left to the process group: the same answer as calling it directly
                tensor = torch.stack([tensor, tensor], 1)[:, 0]
                expected = torch.stack([tensor, tensor], 1)[:, 0]
                torch.distributed.all_reduce(expected)
            dist.all_reduce(tensor, op=op, group=group)
            return torch.equal(tensor, expected)

        return via_kernel(run)

    def gather_case(dtype, per_rank, in_place=False, async_op=False):
        def run():
            shard = torch.full((per_rank,), float(rank + 1)).to(dtype) + torch.arange(per_rank).to(dtype)
            output = torch.full((per_rank * world,), -5.0).to(dtype)
            if in_place:
                output.narrow(0, rank * per_rank, per_rank).copy_(shard)
                shard = output.narrow(0, rank * per_rank, per_rank)
            handle = dist.all_gather_into_tensor(output, shard, async_op=async_op)
            if async_op:
                handle.wait()
            expected = torch.cat(
                [
                    torch.full((per_rank,), float(r + 1)).to(dtype) + torch.arange(per_rank).to(dtype)
                    for r in range(world)
                ]
            )
            return torch.equal(output, expected)

        return via_kernel(run)

    solo = torch.distributed.new_group([0])  # every rank creates it; only rank 0 is in it
    cases = {
        "bf16": reduce_case(torch.bfloat16),
        "fp32": reduce_case(torch.float32),
        "fp32_odd_large": reduce_case(torch.float32, numel=9_000_001),  # several 32 MB chunks, a ragged tail
        "int64": reduce_case(torch.int64),
        "max": reduce_case(torch.float32, op=dist.ReduceOp.MAX),
        "strided": reduce_case(torch.float32, contiguous=False),
        "gather_bf16": gather_case(torch.bfloat16, 1001),
        "gather_fp32_in_place": gather_case(torch.float32, 77, in_place=True),
        "gather_async": gather_case(torch.bfloat16, 5_000_003, async_op=True),
        "gather_int64": gather_case(torch.int64, 10),
    }
    if rank == 0:
        cases["subgroup"] = reduce_case(torch.float32, group=solo)
    return cases


def zero3_training(out_dir: str, rank: int) -> None:
    import deepspeed
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32,
    )  # fmt: skip
    model = OPTForCausalLM(config)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_scatter": False},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    generator = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    torch.save({"losses": losses, "state": state}, os.path.join(out_dir, f"weights{rank}.pt"))


def main() -> None:
    out_dir = sys.argv[1]
    backend = accel.get("cpu")
    backend.init_distributed()
    import deepspeed.comm.comm as ds_comm

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cdb = ds_comm.cdb
    report = {"routed": bool(getattr(cdb, shm._WRAPPED, False)), "level": getattr(cdb, "shm_vector_kernel_level", 0)}
    if report["routed"]:
        report["cases"] = collective_cases(rank, world)
        # The routing again as an AVX2-only CPU sees it (the kernel's level 1: fp32 only), whatever this CPU has
        native_level, cdb.shm_vector_kernel_level = cdb.shm_vector_kernel_level, min(report["level"], 1)
        report["cases_at_level_1"] = collective_cases(rank, world)
        cdb.shm_vector_kernel_level = native_level
    zero3_training(out_dir, rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
