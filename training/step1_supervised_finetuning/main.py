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
    engine_from_flags,
    print_rank0,
    setup,
    shape_counts,
    write_summary,
    zero3_load_config,
)


@cli_entry
def main(argv: list[str]) -> dict:
    args = validate(step1_parser().parse_args(argv))
    if args.dry_run:
        return memory_plan.dry_run(to_config(args, Step1Config), 1)
    check_positions(args.model_name_or_path, args.max_seq_len, "--max_seq_len", args.bucket_lengths)
    loop.claim_outputs(args)
    backend = setup(args)
    memory_plan.check(to_config(args, Step1Config), 1, backend)  # before any weights are loaded
    tokenizer = load_tokenizer(args.model_name_or_path)
    if args.add_eot_token:
        add_eot_token(tokenizer, args.eot_token)
    train_set, eval_set, train_loader, eval_loader = loop.supervised_loaders(args, 1, tokenizer, backend)

    load_config = zero3_load_config(backend, args, args.zero_stage, args.per_device_train_batch_size)
    model = create_lm(
        args.model_name_or_path,
        tokenizer,
        load_config,
        dropout=args.dropout,
        seed=args.seed,
        attn_implementation=args.attn_implementation,
    )
    apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)
    engine = engine_from_flags(
        backend,
        model,
        args,
        "",
        total_steps=loop.total_optimizer_steps(train_loader, args),
        micro_batch=args.per_device_train_batch_size,
        job_name="step1_model",
    )
    fp32_loss = backend.compute_fp32_loss(model_family(model), args.compute_fp32_loss)

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
    writer = ScalarWriter.for_run(args, "step1")
    losses = loop.train(engine, train_loader, lm_loss, backend, args, writer, "step1")
    after = perplexity()
    writer.add({"step1/eval_perplexity": after}, engine.global_steps)
    writer.close()
    print_rank0(f"perplexity after training: {after:.2f}")
    if args.output_dir:
        loop.save_trained_lm(engine, tokenizer, args, "step1")
        print_rank0(f"saved the actor to {args.output_dir}")
    summary = {
        "shape_counts": shape_counts(backend),
        "losses": losses,
        "perplexity_before": before,
        "perplexity": after,
        "output_dir": args.output_dir,
    }
    write_summary(args.output_dir, summary)
    return summary


if __name__ == "__main__":
    main()
