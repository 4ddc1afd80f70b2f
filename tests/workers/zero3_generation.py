"""Run under `torch.distributed.run --nproc_per_node 2`: the hybrid engine on a ZeRO-3 actor (LoRA).

Writes DIR/rank{N}.json (DIR: the first argument): all-gather counts per generation phase for 4 and 16 new tokens (hybrid
engine and plain `generate`), whether the tokens equal HF `generate` on the same weights, and whether a
training step after generation changed the weights the next phase generates with.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from test_hybrid_engine import (  # noqa: E402
    EOS,
    PAD,
    answers_equal,
    engine_for,
    peaked_model,
    prompt_batch,
    reference_tokens,
)

from dschat_hal.rlhf.generation.engine import HybridEngine  # noqa: E402
from dschat_hal.rlhf.generation.hf_generate import PlainGenerator  # noqa: E402
from dschat_hal.rlhf.generation.sampling import GenerationConfig  # noqa: E402


def count_gathers() -> dict[str, int]:
    """Wrap every all-gather entry point of DeepSpeed's communication backend with a counter."""
    import deepspeed.comm.comm as ds_comm

    counts = {"all_gather": 0}
    backend = ds_comm.cdb
    for name in dir(backend):
        if "gather" in name and callable(getattr(backend, name)) and not name.startswith("_"):
            original = getattr(backend, name)

            def counted(*args, _original=original, **kwargs):
                counts["all_gather"] += 1
                return _original(*args, **kwargs)

            setattr(backend, name, counted)
    return counts


def main() -> None:
    rank = int(os.environ["RANK"])
    # wide enough that every matrix is above ZeRO-3's persistence threshold (1e4 elements): really partitioned
    model = peaked_model("opt", lora=True, width=128)
    prompts, mask = prompt_batch(seed=10 + rank)  # each rank its own prompts: rows end at different steps
    backend, engine = engine_for(model, stage=3)
    counts = count_gathers()
    result = {"rank": rank, "hybrid": {}, "plain": {}}
    for tokens in (4, 16):
        config = GenerationConfig(max_answer_seq_len=tokens, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
        for name, generator in (
            ("hybrid", HybridEngine(engine, backend, config, dtype=torch.float32)),
            ("plain", PlainGenerator(engine, backend, config)),
        ):
            generator.generate(prompts, mask)  # warm (builds the copy / cache)
            before = counts["all_gather"]
            generator.generate(prompts, mask)
            result[name][tokens] = counts["all_gather"] - before
    # tokens equal HF generate on the same weights (a plain copy gathered here)
    config = GenerationConfig(max_answer_seq_len=12, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    hybrid = HybridEngine(engine, backend, config, dtype=torch.float32)
    seq = hybrid.generate(prompts, mask)
    plain = hybrid.copy.model
    result["tokens_equal_hf"] = answers_equal(seq, reference_tokens(plain, prompts, mask, config))
    # a training step after generation changes what the next phase generates with
    weights_before = {k: v.clone() for k, v in hybrid.copy.model.state_dict().items()}
    engine.train()
    out = engine(input_ids=seq, attention_mask=(seq != PAD).long(), use_cache=False)
    loss = backend.lm_loss(out.logits, seq, fp32=True)
    engine.backward(loss)
    engine.step()
    hybrid.generate(prompts, mask)
    weights_after = hybrid.copy.model.state_dict()
    result["weights_changed"] = any(not torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
