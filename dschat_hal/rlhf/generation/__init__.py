"""Step-3 generation: plain HF `generate`, or the hybrid engine.

The hybrid engine switches the actor into a generation form for one generation phase and back:
- ZeRO-3: the partitioned weights are gathered once per phase (all at once, or in groups of layers)
  into a plain, hook-free copy of the architecture, so decoding runs no per-token collectives;
- LoRA: the adapters are folded into the weights the generation form uses, and the training
  weights are restored exactly afterwards;
- decoding is our own loop over a preallocated static KV cache with fixed shapes (mask and cache
  of prompt + answer length); its per-token step is one module the backend may capture in a
  device graph (`Accelerator.capture_decode_step`);
- models that keep their own static cache (optimum-habana's) decode with their own `generate`; the
  backend may capture their forward in device graphs for the phase only
  (`Accelerator.capture_generate_forward`), put back before any training forward.

One concern per module, each importing only those listed before it:
- `sampling`: the generation config, how a token is picked, the answers' static width;
- `decode`: the static-cache decode loop (`prefill`, `decode_one_token`, `decode_tokens`);
- `inference_copy`: LoRA folded for a block, the ZeRO-3 gathered inference copy;
- `hf_generate`: HF `generate` (the plain path `PlainGenerator`, the engine's fallback);
- `engine`: `HybridEngine`, which chooses the decode loop or HF `generate` and holds the form;
- `tensor_parallel`: the engine sharded over a TP group by AutoTP, and `make_hybrid_engine`.

The package's door is `make_hybrid_engine`; step 3's main imports nothing else from it (the trainer, its
neighbour, uses `sampling`, `decode` and `hf_generate` directly). Its flags are checked with the others'
(`dschat_hal.args.check_tp_args`).
"""

from dschat_hal.rlhf.generation.tensor_parallel import make_hybrid_engine

__all__ = ["make_hybrid_engine"]
