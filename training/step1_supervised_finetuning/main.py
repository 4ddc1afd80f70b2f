"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen answers."""
# ruff: noqa: E402  (`--help` is answered before the heavy imports)

from __future__ import annotations

from dschat_hal.args import answer_help, step1_parser, validate
from dschat_hal.configs import Step1Config, to_config

if __name__ == "__main__":
    answer_help(step1_parser)  # before the imports below load torch, transformers and DeepSpeed (seconds)

import math

from dschat_hal import loop, memory_plan
from dschat_hal.errors import cli_entry
from dschat_hal.models import check_positions, create_lm, load_tokenizer, model_family
from dschat_hal.models.lm import add_eot_token
from dschat_hal.runtime import (
    ScalarWriter,
    apply_lora,
    print_rank0,
    setup,
    shape_counts,
    write_summary,
)


@cli_entry
def main(argv: list[str]) -> dict:
    args = validate(step1_parser().parse_args(argv))
    config = to_config(args, Step1Config)  # what the library takes from here on
    if args.dry_run:
        return memory_plan.dry_run(config, 1)
    model_config, optim, hardware = config.model, config.optim, config.hardware
    check_positions(model_config.model_name_or_path, model_config.max_seq_len, "--max_seq_len", hardware.bucket_lengths)
    loop.claim_outputs(config.checkpoint)
    backend = setup(args)  # the start-up lines, which name the flags
    dtype = backend.resolve_dtype(hardware.dtype)
    memory_plan.check(config, 1, backend)  # before any weights are loaded
    tokenizer = load_tokenizer(model_config.model_name_or_path)
    if config.data.add_eot_token:
        add_eot_token(tokenizer, config.data.eot_token)
    train_set, eval_set, train_loader, eval_loader = loop.supervised_loaders(config, 1, tokenizer, backend)

    model = create_lm(
        model_config.model_name_or_path,
        tokenizer,
        loop.partitioned_load(backend, config, dtype, optim.zero_stage),
        dropout=optim.dropout,
        seed=hardware.seed,
        attn_implementation=hardware.attn_implementation,
    )
    apply_lora(model, optim.lora_dim, optim.lora_module_name, config.schedule.only_optimize_lora)
    engine = loop.supervised_engine(backend, model, config, train_loader, dtype, "step1_model")
    fp32_loss = backend.compute_fp32_loss(model_family(model), hardware.compute_fp32_loss)

    def lm_loss(engine, batch):
        backend.audit_shape("actor", batch["input_ids"])
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return backend.lm_loss(logits, batch["labels"], fp32_loss)

    def token_losses(engine, batch):
        """The batch's summed token loss and its token count: perplexity is a mean over tokens,
        independent of how the eval rows are batched."""
        tokens = (batch["labels"][..., 1:] != -100).sum()
        summed = lm_loss(engine, batch).float() * tokens
        return {"loss": summed.where(tokens > 0, 0.0), "n": tokens}  # an all-padding batch adds nothing

    def perplexity() -> float:
        metrics = loop.evaluate(engine, eval_loader, token_losses, backend)
        return math.exp(min(metrics["loss"] / max(metrics["n"], 1), 50))

    print_rank0(
        f"step 1 on {backend.describe()}: {len(train_set)} train / {len(eval_set)} eval samples, fp32 loss {fp32_loss}"
    )
    before = perplexity()
    print_rank0(f"perplexity before training: {before:.2f}")
    writer = ScalarWriter.for_run(config.logging, "step1", vars(args))
    losses = loop.train(engine, train_loader, lm_loss, backend, config, writer, "step1", dtype=dtype)
    after = perplexity()
    writer.add({"step1/eval_perplexity": after}, engine.global_steps)
    writer.close()
    print_rank0(f"perplexity after training: {after:.2f}")
    output_dir = config.checkpoint.output_dir
    if output_dir:
        loop.save_trained_lm(engine, tokenizer, config, "step1", vars(args))  # args.json: the resolved flags
        print_rank0(f"saved the actor to {output_dir}")
    summary = {
        "shape_counts": shape_counts(backend),
        "losses": losses,
        "perplexity_before": before,
        "perplexity": after,
        "output_dir": output_dir,
    }
    write_summary(output_dir, summary)
    return summary


if __name__ == "__main__":
    main()
