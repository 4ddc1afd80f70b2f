"""Step 2 alternative: DPO. The step-1 actor learns the preference pairs directly against a frozen copy of
itself (the reference), with no reward model and no step 3; its output is a causal LM, like step 1's."""
# ruff: noqa: E402  (`--help` is answered before the heavy imports)

from __future__ import annotations

from dschat_hal.args import answer_help, dpo_parser, validate
from dschat_hal.configs import DPOStepConfig, to_config

if __name__ == "__main__":
    answer_help(dpo_parser)  # before the imports below load torch, transformers and DeepSpeed (seconds)

import torch

from dschat_hal import loop
from dschat_hal.dpo import dpo_loss, pair_label_mask, pair_logps, reference_placement
from dschat_hal.errors import cli_entry
from dschat_hal.memory_plan.dpo import dpo_check, dpo_dry_run
from dschat_hal.models import check_positions, create_lm, load_tokenizer
from dschat_hal.models.lm import add_eot_token
from dschat_hal.runtime import (
    ScalarWriter,
    apply_lora,
    engine_from_flags,
    inference_engine,
    print_rank0,
    setup,
    shape_counts,
    world_size,
    write_summary,
    zero3_load_config,
)


@cli_entry
def main(argv: list[str]) -> dict:
    args = validate(dpo_parser().parse_args(argv))
    if args.dry_run:
        return dpo_dry_run(to_config(args, DPOStepConfig))
    check_positions(args.model_name_or_path, args.max_seq_len, "--max_seq_len", args.bucket_lengths)
    loop.claim_outputs(args)
    backend = setup(args)
    dpo_check(to_config(args, DPOStepConfig), backend)  # before any weights are loaded
    tokenizer = load_tokenizer(args.model_name_or_path)
    if args.add_eot_token:
        add_eot_token(tokenizer, args.eot_token)
    # the pairs of step 2's share of the data, padded as step 2 pads them (chosen rows, then rejected)
    train_set, eval_set, train_loader, eval_loader = loop.supervised_loaders(args, 2, tokenizer, backend)

    def build_lm(stage: int):
        config = zero3_load_config(backend, args, stage, args.per_device_train_batch_size)
        return create_lm(
            args.model_name_or_path,
            tokenizer,
            config,
            dropout=args.dropout,
            seed=args.seed,
            attn_implementation=args.attn_implementation,
        )

    model = apply_lora(build_lm(args.zero_stage), args.lora_dim, args.lora_module_name, args.only_optimize_lora)
    engine = engine_from_flags(
        backend,
        model,
        args,
        "",
        total_steps=loop.total_optimizer_steps(train_loader, args),
        micro_batch=args.per_device_train_batch_size,
        job_name="step2_dpo_model",
    )
    placement = reference_placement(to_config(args, DPOStepConfig))
    print_rank0(placement.describe("reference", world_size()).replace("step 3:", "DPO:"))
    reference = inference_engine(
        backend,
        build_lm(placement.stage),
        args,
        stage=placement.stage,
        offload=placement.offload,
        micro_batch=args.per_device_train_batch_size,
    )

    def forward(engine, batch):
        """The DPO terms of a pairwise batch: the policy's forward (with its graph), the reference's without."""
        backend.audit_shape("actor", batch["input_ids"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = pair_label_mask(ids, mask)
        chosen, rejected = pair_logps(engine(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, labels)
        with torch.no_grad():
            ref = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
            ref_chosen, ref_rejected = pair_logps(ref, ids, labels)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta, args.label_smoothing)

    def train_loss(engine, batch):
        return forward(engine, batch).loss

    def pair_metrics(engine, batch):
        out = forward(engine, batch)
        n = out.chosen_rewards.numel()
        return {
            "loss": out.loss.float() * n,
            "correct": (out.chosen_rewards > out.rejected_rewards).float().sum(),
            "chosen": out.chosen_rewards.float().sum(),
            "rejected": out.rejected_rewards.float().sum(),
            "n": out.loss.new_tensor(float(n)),
        }

    def report(when: str) -> dict[str, float]:
        totals = loop.evaluate(engine, eval_loader, pair_metrics, backend, max_batches=args.eval_iters)
        n = max(totals["n"], 1.0)
        result = {
            "loss": totals["loss"] / n,
            "accuracy": totals["correct"] / n,
            "chosen_reward": totals["chosen"] / n,
            "rejected_reward": totals["rejected"] / n,
        }
        result["reward_margin"] = result["chosen_reward"] - result["rejected_reward"]
        print_rank0(
            f"{when}: DPO loss {result['loss']:.4f}, chosen reward {result['chosen_reward']:.4f}, rejected reward "
            f"{result['rejected_reward']:.4f}, margin {result['reward_margin']:.4f}, accuracy {result['accuracy']:.3f}"
        )
        return result

    print_rank0(
        f"DPO on {backend.describe()}: {len(train_set)} train / {len(eval_set)} eval pairs, beta {args.beta}, "
        f"label smoothing {args.label_smoothing}"
    )
    before = report("before training")
    writer = ScalarWriter.for_run(args, "step2_dpo")
    evaluations: list[dict[str, float]] = []

    def periodic_eval(step: int) -> None:
        if args.eval_interval and step % args.eval_interval == 0:
            evaluations.append({"step": step, **report(f"step {step}")})
            writer.add({f"step2_dpo/eval_{k}": v for k, v in evaluations[-1].items() if k != "step"}, step)

    losses = loop.train(engine, train_loader, train_loss, backend, args, writer, "step2_dpo", on_step=periodic_eval)
    after = report("after training")
    writer.add({f"step2_dpo/eval_{k}": v for k, v in after.items()}, engine.global_steps)
    writer.close()
    if args.output_dir:
        loop.save_trained_lm(engine, tokenizer, args, "step2_dpo")
        print_rank0(f"saved the DPO actor to {args.output_dir}")
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
