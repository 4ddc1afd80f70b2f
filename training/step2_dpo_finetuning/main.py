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
    frozen_engine,
    print_rank0,
    setup,
    shape_counts,
    world_size,
    write_summary,
)


@cli_entry
def main(argv: list[str]) -> dict:
    args = validate(dpo_parser().parse_args(argv))
    config = to_config(args, DPOStepConfig)  # what the library takes from here on
    if args.dry_run:
        return dpo_dry_run(config)
    model_config, optim, hardware, dpo = config.model, config.optim, config.hardware, config.dpo
    check_positions(model_config.model_name_or_path, model_config.max_seq_len, "--max_seq_len", hardware.bucket_lengths)
    loop.claim_outputs(config.checkpoint)
    backend = setup(args)  # the start-up lines, which name the flags
    dtype = backend.resolve_dtype(hardware.dtype)
    dpo_check(config, backend)  # before any weights are loaded
    tokenizer = load_tokenizer(model_config.model_name_or_path)
    if config.data.add_eot_token:
        add_eot_token(tokenizer, config.data.eot_token)
    # the pairs of step 2's share of the data, padded as step 2 pads them (chosen rows, then rejected)
    train_set, eval_set, train_loader, eval_loader = loop.supervised_loaders(config, 2, tokenizer, backend)

    def build_lm(stage: int):
        return create_lm(
            model_config.model_name_or_path,
            tokenizer,
            loop.partitioned_load(backend, config, dtype, stage),
            dropout=optim.dropout,
            seed=hardware.seed,
            attn_implementation=hardware.attn_implementation,
        )

    only_lora = config.schedule.only_optimize_lora
    model = apply_lora(build_lm(optim.zero_stage), optim.lora_dim, optim.lora_module_name, only_lora)
    engine = loop.supervised_engine(backend, model, config, train_loader, dtype, "step2_dpo_model")
    placement = reference_placement(config)  # the memory plan's rule (dschat_hal.decisions)
    print_rank0(placement.describe("reference", world_size(), step="DPO"))
    reference = frozen_engine(
        backend,
        build_lm(placement.stage),
        dtype=dtype,
        stage=placement.stage,
        offload=placement.offload,
        micro_batch=model_config.per_device_train_batch_size,
    )
    eval_config = config.eval

    def forward(engine, batch):
        """The DPO terms of a pairwise batch: the policy's forward (with its graph), the reference's without."""
        backend.audit_shape("actor", batch["input_ids"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = pair_label_mask(ids, mask)
        chosen, rejected = pair_logps(engine(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, labels)
        with torch.no_grad():
            ref = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
            ref_chosen, ref_rejected = pair_logps(ref, ids, labels)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, dpo.beta, dpo.label_smoothing)

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
        totals = loop.evaluate(engine, eval_loader, pair_metrics, backend, max_batches=eval_config.eval_iters)
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
        f"DPO on {backend.describe()}: {len(train_set)} train / {len(eval_set)} eval pairs, beta {dpo.beta}, "
        f"label smoothing {dpo.label_smoothing}"
    )
    before = report("before training")
    writer = ScalarWriter.for_run(config.logging, "step2_dpo", vars(args))
    evaluations: list[dict[str, float]] = []

    def periodic_eval(step: int) -> None:
        if eval_config.eval_interval and step % eval_config.eval_interval == 0:
            evaluations.append({"step": step, **report(f"step {step}")})
            writer.add({f"step2_dpo/eval_{k}": v for k, v in evaluations[-1].items() if k != "step"}, step)

    losses = loop.train(
        engine, train_loader, train_loss, backend, config, writer, "step2_dpo", on_step=periodic_eval, dtype=dtype
    )
    after = report("after training")
    writer.add({f"step2_dpo/eval_{k}": v for k, v in after.items()}, engine.global_steps)
    writer.close()
    output_dir = config.checkpoint.output_dir
    if output_dir:
        loop.save_trained_lm(engine, tokenizer, config, "step2_dpo", vars(args))  # args.json: the resolved flags
        print_rank0(f"saved the DPO actor to {output_dir}")
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
