"""Step 2: reward model fine-tuning on chosen/rejected pairs; reports accuracy and mean scores."""
# ruff: noqa: E402  (`--help` is answered before the heavy imports)

from __future__ import annotations

from dschat_hal.args import answer_help, step2_parser, validate
from dschat_hal.configs import Step2Config, to_config

if __name__ == "__main__":
    answer_help(step2_parser)  # before the imports below load torch, transformers and DeepSpeed (seconds)

from dschat_hal import loop, memory_plan
from dschat_hal.errors import cli_entry
from dschat_hal.models import (
    atomic_directory,
    check_positions,
    create_reward_model,
    is_reward_checkpoint,
    load_tokenizer,
    model_family,
)
from dschat_hal.models.lm import add_eot_token
from dschat_hal.models.reward_model import reset_final_norm
from dschat_hal.provenance import write_record
from dschat_hal.runtime import (
    ScalarWriter,
    apply_lora,
    engine_from_flags,
    is_rank0,
    print_rank0,
    setup,
    shape_counts,
    write_summary,
    zero3_load_config,
)


@cli_entry
def main(argv: list[str]) -> dict:
    args = validate(step2_parser().parse_args(argv))
    if args.dry_run:
        return memory_plan.dry_run(to_config(args, Step2Config), 2)
    check_positions(args.model_name_or_path, args.max_seq_len, "--max_seq_len", args.bucket_lengths)
    loop.claim_outputs(args)
    backend = setup(args)
    memory_plan.check(to_config(args, Step2Config), 2, backend)  # before any weights are loaded
    tokenizer = load_tokenizer(args.model_name_or_path)
    if args.add_eot_token:
        add_eot_token(tokenizer, args.eot_token)
    train_set, eval_set, train_loader, eval_loader = loop.supervised_loaders(args, 2, tokenizer, backend)

    fp32_loss = backend.compute_fp32_loss(model_family(args.model_name_or_path), args.compute_fp32_loss)
    load_config = zero3_load_config(backend, args, args.zero_stage, args.per_device_train_batch_size)
    model = create_reward_model(
        args.model_name_or_path,
        tokenizer,
        load_config,
        dropout=args.dropout,
        compute_fp32_loss=fp32_loss,
        seed=args.seed,
        attn_implementation=args.attn_implementation,
    )
    # a new value head: reset bloom's final norm under it; the head (and that norm) stay trainable
    # under --only_optimize_lora, or the reward model would keep a random head
    reset = () if is_reward_checkpoint(args.model_name_or_path) else reset_final_norm(model)
    apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora, ("v_head.", *reset))
    engine = engine_from_flags(
        backend,
        model,
        args,
        "",
        total_steps=loop.total_optimizer_steps(train_loader, args),
        micro_batch=args.per_device_train_batch_size,
        job_name="step2_model",
    )

    def pair_loss(engine, batch):
        backend.audit_shape("reward", batch["input_ids"])
        return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["loss"]

    def pair_metrics(engine, batch):
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        chosen, rejected = out["chosen_mean_scores"].float(), out["rejected_mean_scores"].float()
        return {
            "correct": (chosen > rejected).float().sum(),
            "n": chosen.new_tensor(float(chosen.numel())),
            "chosen": chosen.sum(),
            "rejected": rejected.sum(),
        }

    def report(when: str) -> dict[str, float]:
        totals = loop.evaluate(engine, eval_loader, pair_metrics, backend, max_batches=args.eval_iters)
        n = max(totals["n"], 1.0)
        result = {
            "accuracy": totals["correct"] / n,
            "chosen_score": totals["chosen"] / n,
            "rejected_score": totals["rejected"] / n,
        }
        print_rank0(
            f"{when}: accuracy {result['accuracy']:.3f}, chosen score {result['chosen_score']:.3f}, "
            f"rejected score {result['rejected_score']:.3f}"
        )
        return result

    print_rank0(f"step 2 on {backend.describe()}: {len(train_set)} train / {len(eval_set)} eval pairs")
    before = report("before training")
    writer = ScalarWriter.for_run(args, "step2")
    evaluations: list[dict[str, float]] = []

    def periodic_eval(step: int) -> None:
        if args.eval_interval and step % args.eval_interval == 0:
            evaluations.append({"step": step, **report(f"step {step}")})
            writer.add({f"step2/eval_{k}": v for k, v in evaluations[-1].items() if k != "step"}, step)

    losses = loop.train(
        engine, train_loader, pair_loss, backend, args, writer, "step2", on_step=periodic_eval, rows_per_sample=2
    )
    after = report("after training")
    if args.center_reward:  # step 3 --center_reward subtracts it
        totals = loop.evaluate(engine, train_loader, pair_metrics, backend, max_batches=args.eval_iters)
        engine.module.score_mean = (totals["chosen"] + totals["rejected"]) / max(2 * totals["n"], 1.0)
        print_rank0(f"mean score on the training pairs: {engine.module.score_mean:.3f} (stored for --center_reward)")
        after["score_mean"] = engine.module.score_mean
    writer.add({f"step2/eval_{k}": v for k, v in after.items()}, engine.global_steps)
    writer.close()
    if args.output_dir:
        with atomic_directory(args.output_dir, enabled=is_rank0()) as tmp:  # the record is published with the model
            engine.module.write(tmp, tokenizer)
            write_record(tmp, args, "step2")
        print_rank0(f"saved the reward model to {args.output_dir}")
    summary = {
        "shape_counts": shape_counts(backend),
        "losses": losses,
        "before": before,
        "evaluations": evaluations,
        **after,
        "output_dir": args.output_dir,
    }
    write_summary(args.output_dir, summary)
    return summary


if __name__ == "__main__":
    main()
