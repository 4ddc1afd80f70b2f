"""Run in a fresh process: resident memory of a generation phase with LoRA folded (OPT, 8 layers of width
1024, ~384 MB of LoRA-targeted fp32 weights), against a plain clone of those weights as the yardstick.
Prints one JSON line: targeted bytes, the phase's peak growth (VmHWM after resetting it), the clone's
growth, and whether every parameter came back bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import accel  # noqa: E402
from dschat_hal.models.lora import convert_to_lora, lora_layers  # noqa: E402
from dschat_hal.rlhf.generation.engine import HybridEngine  # noqa: E402
from dschat_hal.rlhf.generation.sampling import GenerationConfig  # noqa: E402


class Actor:
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()


def kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def peak_growth(action) -> int:
    """Bytes the resident set peaked above its level before `action`."""
    rss = kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    action()
    return (kib("VmHWM") - rss) * 1024


def main() -> None:
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=96, hidden_size=1024, word_embed_proj_dim=1024, ffn_dim=4096, num_hidden_layers=8,
        num_attention_heads=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    convert_to_lora(model, "layers.", dim=8)
    with torch.no_grad():
        for layer in lora_layers(model):  # a trained update: about 1% of the weight
            torch.nn.init.normal_(layer.lora_left_weight)
            layer.lora_left_weight.mul_(0.01 * layer.weight.std() / layer.delta().std())
    targeted = [layer.weight for layer in lora_layers(model)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    gen = GenerationConfig(max_answer_seq_len=4, pad_token_id=0, eos_token_id=2, do_sample=False)
    engine = HybridEngine(Actor(model), accel.get("cpu"), gen, dtype=torch.float32)
    prompts = torch.randint(3, 96, (2, 8))
    phase = peak_growth(lambda: engine.generate(prompts, torch.ones_like(prompts)))
    clones: list[torch.Tensor] = []
    clone = peak_growth(lambda: clones.extend(w.detach().clone() for w in targeted))
    result = {
        "targeted_bytes": sum(w.numel() * w.element_size() for w in targeted),
        "phase_growth": phase,
        "clone_growth": clone,
        "restored": all(torch.equal(p, before[name]) for name, p in model.named_parameters()),
        "unfused": not any(layer.fused for layer in lora_layers(model)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
