"""Saving a ZeRO-3 model: only the writing rank holds a whole copy; the others gather and drop.

Two ranks save a ~58M-parameter OPT (232 MB in fp32, largest matrix 9.4 MB), as a causal LM and as a
reward model, partitioned at load time; each measures its peak resident memory during the save.
Rank 0 writes, so its peak rises by at least the model's size (the measurement sees a copy: 242 MB
measured); rank 1's must stay within a few gathered matrices (19 MB measured; 241 MB before only the
writer kept the gathered state). The saved files equal the loaded ones.
"""

from __future__ import annotations

import json

import torch
from conftest import run_script
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, OPTConfig

from dschat_hal.models import create_reward_model, load_tokenizer
from dschat_hal.models.lm import padded_vocab_size


def write_sources(directory) -> None:
    """A ~58M-parameter OPT (8 layers of width 768) with the bundled tokenizer: as a causal LM in
    `lm/source`, as a reward model (the same backbone, a random head) in `reward/source`."""
    tokenizer = load_tokenizer("tiny-opt")
    config = OPTConfig(
        vocab_size=padded_vocab_size(tokenizer),
        hidden_size=768,
        word_embed_proj_dim=768,
        ffn_dim=3072,
        num_hidden_layers=8,
        num_attention_heads=12,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    lm_dir = directory / "lm" / "source"
    AutoModelForCausalLM.from_config(config).save_pretrained(lm_dir, safe_serialization=True)
    tokenizer.save_pretrained(lm_dir)
    reward = create_reward_model(str(lm_dir), tokenizer)
    torch.nn.init.normal_(reward.v_head.weight)
    reward.save(directory / "reward" / "source", tokenizer)


def weights(directory) -> dict[str, torch.Tensor]:
    state = {}
    for name in sorted(p.name for p in directory.glob("*.safetensors")):
        state |= {f"{name}:{key}": value for key, value in load_file(str(directory / name)).items()}
    return state


def test_only_the_writing_rank_holds_the_gathered_model(tmp_path):
    write_sources(tmp_path)
    # large blocks always mmap-ed, so freed ones go back at once: the peak counts live memory, not
    # what glibc keeps for reuse (without it the peaks vary by tens of MB from run to run)
    result = run_script(
        *("-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/workers/zero3_save.py", str(tmp_path)),
        env={"MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for kind in ("lm", "reward"):
        writer, other = (rank[kind] for rank in ranks)
        size = writer["model_bytes"]
        assert size > 200e6 and writer["held_bytes"] < 0.02 * size, (kind, writer)  # really partitioned
        assert writer["growth"] > 0.75 * size, (kind, writer)  # a whole copy shows
        assert other["growth"] < min(3 * other["largest_bytes"], 0.15 * size), (kind, other)  # a matrix or two
        source, saved = weights(tmp_path / kind / "source"), weights(tmp_path / kind / "saved")
        assert source.keys() == saved.keys() and all(torch.equal(source[k], saved[k]) for k in source), kind
    assert "model.safetensors:score.weight" in saved
