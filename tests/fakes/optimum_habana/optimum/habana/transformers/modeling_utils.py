"""Fake `adapt_transformers_to_gaudi`: as optimum-habana does for Llama, it replaces transformers'
`LlamaForCausalLM` with the Gaudi class and registers that class for `LlamaConfig` with the Auto
classes (the real function patches many more families; the double patches Llama only)."""

from __future__ import annotations

calls: list[str] = []


def adapt_transformers_to_gaudi() -> None:
    import transformers
    from transformers.models.llama import modeling_llama

    from optimum.habana.transformers.models.llama import GaudiLlamaForCausalLM

    calls.append("adapt_transformers_to_gaudi")
    modeling_llama.LlamaForCausalLM = GaudiLlamaForCausalLM
    transformers.AutoModelForCausalLM.register(transformers.LlamaConfig, GaudiLlamaForCausalLM, exist_ok=True)
