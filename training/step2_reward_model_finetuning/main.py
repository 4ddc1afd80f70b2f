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
    is_rank0,
    print_rank0,
    setup,
    shape_counts,
    write_summary,
)


@cli_entry
def main(argv: list[str]) -> dict:
    args = validate(step2_parser().parse_args(argv))
    config = to_config(args, Step2Config)  # what the library takes from here on
    if args.dry_run:
        return memory_plan.dry_run(config, 2)
    model_config, optim, hardware = config.model, config.optim, config.hardware
    name = model_config.model_name_or_path
    check_positions(name, model_config.max_seq_len, "--max_seq_len", hardware.bucket_lengths)
    loop.claim_outputs(config.checkpoint)
    backend = setup(args)  # the start-up lines, which name the flags
    dtype = backend.resolve_dtype(hardware.dtype)
    memory_plan.check(config, 2, backend)  # before any weights are loaded
    tokenizer = load_tokenizer(name)
    if config.data.add_eot_token:
        add_eot_token(tokenizer, config.data.eot_token)
    train_set, eval_set, train_loader, eval_loader = loop.supervised_loaders(config, 2, tokenizer, backend)

    fp32_loss = backend.compute_fp32_loss(model_family(name), hardware.compute_fp32_loss)
    model = create_reward_model(
        name,
        tokenizer,
        loop.partitioned_load(backend, config, dtype, optim.zero_stage),
        dropout=optim.dropout,
        compute_fp32_loss=fp32_loss,
        seed=hardware.seed,
        attn_implementation=hardware.attn_implementation,
    )
    # a new value head: reset bloom's final norm under it; the head (and that norm) stay trainable
    # under --only_optimize_lora, or the reward model would keep a random head
    reset = () if is_reward_checkpoint(name) else reset_final_norm(model)
    only_lora = config.schedule.only_optimize_lora
    apply_lora(model, optim.lora_dim, optim.lora_module_name, only_lora, ("v_head.", *reset))
    engine = loop.supervised_engine(backend, model, config, train_loader, dtype, "step2_model")
    eval_config = config.eval

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
        totals = loop.evaluate(engine, eval_loader, pair_metrics, backend, max_batches=eval_config.eval_iters)
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
    writer = ScalarWriter.for_run(config.logging, "step2", vars(args))
    evaluations: list[dict[str, float]] = []

    def periodic_eval(step: int) -> None:
        if eval_config.eval_interval and step % eval_config.eval_interval == 0:
            evaluations.append({"step": step, **report(f"step {step}")})
            writer.add({f"step2/eval_{k}": v for k, v in evaluations[-1].items() if k != "step"}, step)

    losses = loop.train(
        engine,
        train_loader,
        pair_loss,
        backend,
        config,
        writer,
        "step2",
        on_step=periodic_eval,
        rows_per_sample=2,
        dtype=dtype,
    )
    after = report("after training")
    if config.reward.center_reward:  # step 3 --center_reward subtracts it
        totals = loop.evaluate(engine, train_loader, pair_metrics, backend, max_batches=eval_config.eval_iters)
        engine.module.score_mean = (totals["chosen"] + totals["rejected"]) / max(2 * totals["n"], 1.0)
        print_rank0(f"mean score on the training pairs: {engine.module.score_mean:.3f} (stored for --center_reward)")
        after["score_mean"] = engine.module.score_mean
    writer.add({f"step2/eval_{k}": v for k, v in after.items()}, engine.global_steps)
    writer.close()
    output_dir = config.checkpoint.output_dir
    if output_dir:
        with atomic_directory(output_dir, enabled=is_rank0()) as tmp:  # the record is published with the model
            engine.module.write(tmp, tokenizer)
            write_record(tmp, vars(args), "step2")  # args.json: the resolved flags
        print_rank0(f"saved the reward model to {output_dir}")
    summary = {
        "shape_counts": shape_counts(backend),
        "losses": losses,
        "before": before,
        "evaluations": evaluations,
        **after,
        "output_dir": output_dir,
    }
    write_summary(output_dir, summary)
    return summary


if __name__ == "__main__":
    main()
