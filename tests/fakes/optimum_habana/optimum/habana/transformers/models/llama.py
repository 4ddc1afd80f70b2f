"""An emulation of optimum-habana 1.21's `GaudiLlamaForCausalLM` where it differs from transformers':

- `cache_position` is ignored (`ignore_cache_position = True`); the past length is read from the
  cache's shape, `past_key_values[0][0].shape[2]` (for a preallocated cache: its whole length);
- with a past, new keys/values are concatenated to it, unless `token_idx` is given: then they are
  written in place at `token_idx - 1` (`index_copy_`) and the same tensors are the new past;
- the past comes back as legacy tuples, and masks are built for the key length that implies
  (`_gaudi_prepare_4d_causal_attention_mask`: a 2-D mask of another length fails);
- `generate` is optimum-habana's static-shape loop: inputs padded to prompt + max_new_tokens, a
  device `token_idx`, `index_copy_`/`index_fill_` writes; it takes `lazy_mode`, `ignore_eos`,
  `hpu_graphs` and records the keyword arguments of each call in `generate_calls`.

Forwards without a past or `token_idx` (training, scoring) are transformers' own, as on Gaudi where
the patched modules compute the same function.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM, apply_rotary_pos_emb, repeat_kv

generate_calls: list[dict] = []


def _additive_mask(mask_2d: torch.Tensor, q_len: int, past_len: int, dtype: torch.dtype) -> torch.Tensor:
    """As optimum-habana's converter: causal over the new positions after `past_len` past ones, then
    the 2-D padding mask, which must cover exactly past_len + q_len keys (past_len alone for one query)."""
    neg = torch.finfo(dtype).min
    if q_len == 1:
        return torch.zeros(mask_2d.size(0), 1, 1, mask_2d.size(1), dtype=dtype).masked_fill(
            mask_2d[:, None, None, :] == 0, neg
        )
    causal = torch.full((q_len, q_len), neg, dtype=dtype).triu(1)
    if past_len > 0:
        causal = torch.cat([torch.zeros(q_len, past_len, dtype=dtype), causal], dim=-1)
    causal = causal[None, None].expand(mask_2d.size(0), 1, q_len, past_len + q_len)
    return causal.masked_fill(mask_2d[:, None, None, :] == 0, neg)  # fails unless lengths agree


class GaudiLlamaForCausalLM(LlamaForCausalLM):
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        token_idx: torch.Tensor | None = None,
        trim_logits: bool | None = False,
        reuse_cache: bool | None = False,
        lazy_mode: bool | None = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if past_key_values is None and token_idx is None:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=False,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        base = self.model
        hidden = base.embed_tokens(input_ids)
        batch, q_len = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0  # cache_position ignored
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len)[None]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + q_len, dtype=torch.long)
        mask = _additive_mask(attention_mask, q_len, past_len, hidden.dtype)
        cos, sin = base.rotary_emb(hidden, position_ids)
        presents = []
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            residual = hidden
            h = layer.input_layernorm(hidden)
            shape = (batch, q_len, -1, attn.head_dim)
            query = attn.q_proj(h).view(shape).transpose(1, 2)
            key = attn.k_proj(h).view(shape).transpose(1, 2)
            value = attn.v_proj(h).view(shape).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            past = past_key_values[i] if past_key_values is not None else None
            if past is None:
                keys, values = key, value
            elif token_idx is not None:
                past[0].index_copy_(2, token_idx - 1, key)
                past[1].index_copy_(2, token_idx - 1, value)
                keys, values = past[0], past[1]
            else:
                keys, values = torch.cat([past[0], key], dim=2), torch.cat([past[1], value], dim=2)
            presents.append((keys, values))
            scores = query @ repeat_kv(keys, attn.num_key_value_groups).transpose(2, 3) * attn.scaling + mask
            probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
            out = (probs @ repeat_kv(values, attn.num_key_value_groups)).transpose(1, 2).reshape(batch, q_len, -1)
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = base.norm(hidden)
        if q_len > 1 and trim_logits and token_idx is not None:
            hidden = hidden.index_select(1, token_idx - 1)
        logits = self.lm_head(hidden).float()
        return CausalLMOutputWithPast(logits=logits, past_key_values=tuple(presents))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        pad_token_id: int = 0,
        eos_token_id: int | None = None,
        temperature: float = 1.0,
        min_new_tokens: int = 0,
        lazy_mode: bool = False,
        ignore_eos: bool | None = None,
        hpu_graphs: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        generate_calls.append({"lazy_mode": lazy_mode, "ignore_eos": ignore_eos, "hpu_graphs": hpu_graphs, **kwargs})
        batch, prompt_len = input_ids.shape
        ids = torch.nn.functional.pad(input_ids, (0, max_new_tokens), value=pad_token_id)
        mask = torch.nn.functional.pad(attention_mask, (0, max_new_tokens), value=0)
        token_idx = torch.tensor([prompt_len])
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = self(input_ids=ids, attention_mask=mask, position_ids=positions, token_idx=token_idx, trim_logits=True)
        logits, past = out.logits[:, -1], out.past_key_values
        unfinished = torch.ones(batch, dtype=torch.bool)
        stop_on_eos = eos_token_id is not None and not ignore_eos
        for step in range(max_new_tokens):
            if eos_token_id is not None and step < min_new_tokens:
                logits[:, eos_token_id] = torch.finfo(logits.dtype).min
            if do_sample:
                token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(1)
            else:
                token = logits.argmax(-1)
            token = torch.where(unfinished, token, pad_token_id)
            ids.index_copy_(1, token_idx, token[:, None])
            mask.index_fill_(1, token_idx, 1)
            if stop_on_eos:
                unfinished &= token != eos_token_id
            if step + 1 == max_new_tokens or not bool(unfinished.any()):
                break
            token_idx = token_idx + 1
            position = (mask.long().cumsum(-1) - 1).index_select(1, token_idx - 1)
            out = self(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=position,
                past_key_values=past,
                token_idx=token_idx,
                use_cache=True,
            )
            logits, past = out.logits[:, -1], out.past_key_values
        return ids[:, : int(token_idx) + 1]
