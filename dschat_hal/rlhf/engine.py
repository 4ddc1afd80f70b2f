"""The four (five with EMA) models of step 3, each wrapped in its DeepSpeed engine; three (four) with a
critic-free advantage estimator, which builds no critic."""

from __future__ import annotations

import argparse
import logging
import time

import torch

from accel import Accelerator
from dschat_hal.decisions import RunDecisions, ppo_dropout
from dschat_hal.models import create_lm, create_reward_model, model_family
from dschat_hal.runtime import apply_lora, engine_from_flags, inference_engine, zero3_load_config

log = logging.getLogger(__name__)

EMA_BETA = 0.992


def mixed_precision_lora_config(backend: Accelerator, args: argparse.Namespace) -> dict:
    """ZeRO++ entries of `--enable_mixed_precision_lora`: the actor's frozen (non-LoRA) weights are
    stored and gathered quantised; across nodes, a secondary partition per node (hpZ)."""
    from dschat_hal.ds_config import hpz_entries
    from dschat_hal.errors import UserError
    from dschat_hal.runtime import world_size

    if args.actor_lora_dim <= 0 or args.actor_zero_stage != 3:
        raise UserError(
            "--enable_mixed_precision_lora quantises the actor's frozen weights under ZeRO-3: "
            "add --actor_lora_dim N (N > 0) and --actor_zero_stage 3, or drop the flag"
        )
    if not backend.supports_quantized_weights:
        raise UserError(
            f"--enable_mixed_precision_lora needs ZeRO++ weight quantisation, which {backend.name} "
            "does not support; drop the flag"
        )
    return {"zero_quantized_nontrainable_weights": True, **hpz_entries(backend, 3, world_size())}


class RLHFEngine:
    """Actor and critic (trained), reference and reward (frozen), and an optional actor EMA, built as
    the run's `decisions` say: the frozen models where they place them, no critic when the advantage
    estimator uses none (`--advantage_estimator` other than gae)."""

    def __init__(
        self, backend: Accelerator, args: argparse.Namespace, tokenizer, num_total_iters: int, decisions: RunDecisions
    ) -> None:
        self.backend, self.args, self.tokenizer, self.decisions = backend, args, tokenizer, decisions
        self.critic_family = model_family(args.critic_model_name_or_path)
        self.actor = self._timed("actor", self._init_actor, num_total_iters)
        reference = decisions.reference
        self.ref = self._timed("reference", self._init_frozen_actor, reference.stage, reference.offload)
        self.actor_ema = (
            self._timed("actor EMA", self._init_frozen_actor, args.actor_zero_stage, offload=True, lora=True)
            if args.enable_ema
            else None
        )
        self.critic = self._timed("critic", self._init_critic, num_total_iters) if decisions.critic else None
        self.reward = self._timed("reward", self._init_reward)

    @staticmethod
    def _timed(name: str, build, *args, **kwargs):
        """Build one engine, logging how long it took."""
        start = time.time()
        engine = build(*args, **kwargs)
        log.info("step 3: %s ready (%.1fs)", name, time.time() - start)
        return engine

    def _actor_model(self, lora: bool, stage: int | None = None) -> torch.nn.Module:
        """The actor's weights, built partitioned when `stage` (default: the actor's) is 3."""
        args = self.args
        stage = args.actor_zero_stage if stage is None else stage
        config = zero3_load_config(self.backend, args, stage, args.per_device_training_batch_size)
        model = create_lm(
            args.actor_model_name_or_path,
            self.tokenizer,
            config,
            dropout=ppo_dropout(args.actor_dropout),
            seed=args.seed,
            attn_implementation=args.attn_implementation,
        )
        if lora:
            apply_lora(model, args.actor_lora_dim, args.actor_lora_module_name, args.only_optimize_lora)
        return model

    def _init_actor(self, total_iters: int):
        args = self.args
        # with the ptx loss, each PPO micro-batch is two actor backwards (PPO, then ptx) accumulated into
        # one step, as upstream does: twice the accumulation keeps the actor's steps on the planned schedule
        accumulation = args.gradient_accumulation_steps * (2 if args.unsupervised_dataset_name else 1)
        zero_extra = mixed_precision_lora_config(self.backend, args) if args.enable_mixed_precision_lora else None
        engine = engine_from_flags(
            self.backend,
            self._actor_model(lora=True),
            args,
            "actor_",
            total_steps=total_iters,
            micro_batch=args.per_device_training_batch_size,
            job_name="step3_actor",
            grad_accum=accumulation,
            zero_extra=zero_extra,
        )
        if zero_extra:
            engine.optimizer.quantize_nontrainable_params()  # LoRA froze the base weights after partitioning
        return engine

    def _init_frozen_actor(self, stage: int, offload: bool, lora: bool = False):
        """The reference model (or the EMA copy): the actor's weights, forward only, at ZeRO `stage`."""
        model = self._actor_model(lora=lora, stage=stage)
        return inference_engine(
            self.backend,
            model,
            self.args,
            stage=stage,
            offload=offload,
            micro_batch=self.args.per_device_training_batch_size,
        )

    def _critic_model(self, fp32_loss: bool, stage: int | None = None) -> torch.nn.Module:
        """The reward model's weights, built partitioned when `stage` (default: the critic's) is 3."""
        args = self.args
        stage = args.critic_zero_stage if stage is None else stage
        config = zero3_load_config(self.backend, args, stage, args.per_device_training_batch_size)
        return create_reward_model(
            args.critic_model_name_or_path,
            self.tokenizer,
            config,
            dropout=ppo_dropout(args.critic_dropout),
            compute_fp32_loss=fp32_loss,
            seed=args.seed,
            attn_implementation=args.attn_implementation,
        )

    def _init_critic(self, total_iters: int):
        args = self.args
        fp32 = self.backend.compute_fp32_loss(self.critic_family, args.compute_fp32_loss)
        model = apply_lora(
            self._critic_model(fp32), args.critic_lora_dim, args.critic_lora_module_name, args.only_optimize_lora
        )
        return engine_from_flags(
            self.backend,
            model,
            args,
            "critic_",
            total_steps=total_iters,
            micro_batch=args.per_device_training_batch_size,
            job_name="step3_critic",
        )

    def _init_reward(self):
        placement = self.decisions.reward
        return inference_engine(
            self.backend,
            self._critic_model(fp32_loss=True, stage=placement.stage),
            self.args,
            stage=placement.stage,
            offload=placement.offload,
            micro_batch=self.args.per_device_training_batch_size,
        )

    @torch.no_grad()
    def update_ema(self, beta: float = EMA_BETA) -> None:
        """ema ← β·ema + (1−β)·actor, parameter by parameter (gathered under ZeRO-3)."""
        if self.actor_ema is None:
            return
        import deepspeed

        for param, ema_param in zip(self.actor.module.parameters(), self.actor_ema.module.parameters(), strict=True):
            partitioned = hasattr(param, "ds_id") or hasattr(ema_param, "ds_id")
            with deepspeed.zero.GatheredParameters([param, ema_param], modifier_rank=0, enabled=partitioned):
                ema_param.data.copy_(torch.lerp(param.data.to(ema_param.dtype), ema_param.data, beta))
