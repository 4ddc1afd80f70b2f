"""Run under `torch.distributed.run --nproc_per_node 2`: tensor-parallel generation (T = 2) against the
T = 1 hybrid engine and HF `generate` on the same weights.

Writes DIR/rank{N}.json (DIR: the first argument): per case (family, ZeRO stage, LoRA) whether the TP
tokens equal the T = 1 engine's and HF's, the per-rank copy and transformer-layer bytes, and the KV
cache bytes; whether seeded sampling reproduces; whether a training step changes what the next phase
generates with. Rank 1 has fewer and shorter prompts than rank 0 (uneven last batch).
"""

from __future__ import annotations

import json
import os
import re
import sys

LOCAL_SIZE_AT_START = os.environ.get("LOCAL_SIZE")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import deepspeed.comm.comm as ds_comm  # noqa: E402
from test_hybrid_engine import EOS, PAD, SPECIAL, VOCAB, answers_equal, engine_for, reference_tokens  # noqa: E402
from transformers import AutoModelForCausalLM, BloomConfig, GPTNeoXConfig, LlamaConfig, OPTConfig  # noqa: E402

from accel.cpu import shm_buffer_path  # noqa: E402
from dschat_hal.models.lora import convert_to_lora, lora_layers  # noqa: E402
from dschat_hal.rlhf.generation import make_hybrid_engine  # noqa: E402
from dschat_hal.rlhf.generation.decode import cache_tensors  # noqa: E402
from dschat_hal.rlhf.generation.engine import HybridEngine  # noqa: E402
from dschat_hal.rlhf.generation.sampling import GenerationConfig  # noqa: E402
from dschat_hal.rlhf.generation.tensor_parallel import TensorParallelEngine, layer_bytes  # noqa: E402

WIDTH = 128  # AutoTP cuts in grains of 64: every sharded dimension a multiple of 128 splits evenly
CONFIGS = {
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        word_embed_proj_dim=WIDTH,
        ffn_dim=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        **SPECIAL,
    ),
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=WIDTH, n_layer=2, n_head=4, **SPECIAL),
    "llama": lambda: LlamaConfig(  # grouped-query attention: 4 query heads share 2 key/value heads
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **SPECIAL,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        **SPECIAL,
    ),
}
LORA_TARGET = {"opt": "layers.", "bloom": "h.", "llama": "layers.", "gpt_neox": "layers."}
# every family under both stages, LoRA on and off each twice
CASES = [
    ("opt", 2, False),
    ("opt", 3, True),
    ("bloom", 2, True),
    ("bloom", 3, False),
    ("llama", 2, False),
    ("llama", 3, True),
    ("gpt_neox", 2, True),
    ("gpt_neox", 3, False),
]


def peaked(family: str, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)
    if lora:
        convert_to_lora(model, LORA_TARGET[family], dim=4)
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_left_weight, std=0.5)
    return model


def prompts_for(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: three left-padded prompts of 9 positions; rank 1: two of 6."""
    rows, width = (3, 9) if rank == 0 else (2, 6)
    generator = torch.Generator().manual_seed(10 + rank)
    prompts = torch.randint(3, VOCAB, (rows, width), generator=generator)
    mask = torch.ones_like(prompts)
    for row, pad in enumerate((3, 0, 1)[:rows]):
        prompts[row, :pad] = PAD
        mask[row, :pad] = 0
    return prompts, mask


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def sharded_bytes(form: torch.nn.Module, full_sizes: dict[str, int]) -> tuple[int, int]:
    """Bytes this rank holds of the transformer layers' AutoTP-sharded tensors (row-parallel biases are
    replicated, not sharded), and the same tensors' full bytes."""
    from deepspeed.module_inject.layers import LinearAllreduce, TensorParallel_Layer

    mine = full = 0
    for name, module in form.named_modules():
        if isinstance(module, TensorParallel_Layer) and re.search(r"\.\d+\.", name + "."):
            for leaf, param in module.named_parameters(recurse=False):
                if not (leaf == "bias" and isinstance(module, LinearAllreduce)):
                    mine, full = mine + nbytes(param), full + full_sizes[f"{name}.{leaf}"]
    return mine, full


def cache_bytes(engine: HybridEngine) -> int:
    return sum(t.numel() * t.element_size() for t in cache_tensors(engine._cache))


def main() -> None:
    rank = int(os.environ["RANK"])
    prompts, mask = prompts_for(rank)
    greedy = GenerationConfig(max_answer_seq_len=10, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    result: dict = {"rank": rank, "local_size_at_start": LOCAL_SIZE_AT_START, "cases": {}}
    for family, stage, lora in CASES:
        model = peaked(family, lora)
        reference = reference_tokens(model, prompts, mask, greedy)
        full_sizes = {n: nbytes(p) for n, p in model.named_parameters() if "lora_" not in n}
        full_layers = sum(size for n, size in full_sizes.items() if re.search(r"\.\d+\.", n))
        backend, engine = engine_for(model, stage)
        whole = HybridEngine(engine, backend, greedy, dtype=torch.float32)
        tp = make_hybrid_engine(engine, backend, greedy, inference_tp_size=2, dtype=torch.float32)
        whole_seq, tp_seq = whole.generate(prompts, mask), tp.generate(prompts, mask)
        sharded, sharded_full = sharded_bytes(tp.form.model, full_sizes)
        result["cases"][f"{family}-zero{stage}-{'lora' if lora else 'full'}"] = {
            "is_tp": isinstance(tp, TensorParallelEngine),
            "equal_whole": torch.equal(tp_seq, whole_seq),
            "equal_hf": answers_equal(tp_seq, reference),
            "second_phase_equal": torch.equal(tp.generate(prompts, mask), tp_seq),
            "copy_bytes": tp.form.nbytes,
            "full_bytes": tp.form.full_bytes(),
            "layer_bytes": layer_bytes(tp.form.model),
            "full_layer_bytes": full_layers,
            "sharded_bytes": sharded,
            "sharded_full_bytes": sharded_full,
            "cache_bytes": cache_bytes(tp),
            "whole_cache_bytes": cache_bytes(whole),
            "gather_calls": tp.form.gather_calls,
            "head_shares_embedding": tp.form.model.get_output_embeddings().weight
            is tp.form.model.get_input_embeddings().weight,
        }
    # --tp_gather_partition_size 1 when the whole model does not fit: one layer gathered at a time
    model = peaked("llama", lora=True)
    reference = reference_tokens(model, prompts, mask, greedy)
    backend, engine = engine_for(model, 3)
    backend.available_memory = lambda: 1
    tp = make_hybrid_engine(engine, backend, greedy, inference_tp_size=2, dtype=torch.float32, gather_group_layers=1)
    seq = tp.generate(prompts, mask)
    result["grouped"] = {"equal_hf": answers_equal(seq, reference), "gather_calls": tp.form.gather_calls}
    # seeded sampling reproduces run to run; a training step changes the next phase's weights and tokens
    model = peaked("opt", lora=False)
    with torch.no_grad():
        model.get_output_embeddings().weight.div_(8)
    backend, engine = engine_for(model, 3)
    sampling = GenerationConfig(max_answer_seq_len=10, pad_token_id=PAD, eos_token_id=EOS, temperature=0.9)
    tp = make_hybrid_engine(engine, backend, sampling, inference_tp_size=2, dtype=torch.float32)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(tp.generate(prompts, mask))
    result["sampling_reproduces"] = torch.equal(runs[0], runs[1])
    weights_before = {k: v.clone() for k, v in tp.form.model.state_dict().items()}
    for _ in range(3):
        engine.train()
        seq = runs[0]
        out = engine(input_ids=seq, attention_mask=(seq != PAD).long(), use_cache=False)
        engine.backward(backend.lm_loss(out.logits, seq, fp32=True) * -1.0)  # push away from its own samples
        engine.step()
    torch.manual_seed(5)
    after = tp.generate(prompts, mask)
    weights_after = tp.form.model.state_dict()
    result["weights_changed"] = any(not torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    result["tokens_changed"] = not torch.equal(after, runs[0])
    # DeepSpeed's shared-memory workspace was mapped (its op is in use) and its name already unlinked
    result["shm_op"] = getattr(ds_comm.cdb, "shm_comm_op", None) is not None
    result["shm_buffer_left"] = os.path.exists(shm_buffer_path(rank))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
