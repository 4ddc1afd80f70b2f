"""The four (five with EMA) models of step 3, each wrapped in its DeepSpeed engine; three (four) with a
critic-free advantage estimator, which builds no critic."""

from __future__ import annotations

import logging
import time

import torch

from accel import Accelerator
from dschat_hal.configs import OptimConfig, Step3Config
from dschat_hal.decisions import RunDecisions, ppo_dropout, unplanned_decisions
from dschat_hal.models import create_lm, create_reward_model, model_family
from dschat_hal.runtime import apply_lora, engine_from_config, frozen_engine, partitioned_load_config

log = logging.getLogger(__name__)

EMA_BETA = 0.992


def mixed_precision_lora_config(backend: Accelerator, actor: OptimConfig) -> dict:
    """ZeRO++ entries of `--enable_mixed_precision_lora`: the actor's frozen (non-LoRA) weights are
    stored and gathered quantised; across nodes, a secondary partition per node (hpZ)."""
    from dschat_hal.ds_config import hpz_entries
    from dschat_hal.errors import UserError
    from dschat_hal.runtime import world_size

    if actor.lora_dim <= 0 or actor.zero_stage != 3:
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
    """Actor and critic (trained), reference and reward (frozen), and an optional actor EMA, built from
    step 3's config as the run's `decisions` say: the frozen models where they place them, no critic when
    the advantage estimator uses none (`ppo.advantage_estimator` other than gae). Without `decisions`
    (a pipeline built in Python that ran no memory plan): `decisions.unplanned_decisions(config)`."""

    def __init__(
        self,
        backend: Accelerator,
        config: Step3Config,
        tokenizer,
        num_total_iters: int,
        decisions: RunDecisions | None = None,
    ) -> None:
        self.backend, self.config, self.tokenizer = backend, config, tokenizer
        self.decisions = decisions or unplanned_decisions(config)
        self.dtype = backend.resolve_dtype(config.hardware.dtype)
        self.critic_family = model_family(config.models.critic_model_name_or_path)
        self.actor = self._timed("actor", self._init_actor, num_total_iters)
        reference = self.decisions.reference
        self.ref = self._timed("reference", self._init_frozen_actor, reference.stage, reference.offload)
        self.actor_ema = (
            self._timed("actor EMA", self._init_frozen_actor, config.actor.zero_stage, offload=True, lora=True)
            if config.models.enable_ema
            else None
        )
        self.critic = self._timed("critic", self._init_critic, num_total_iters) if self.decisions.critic else None
        self.reward = self._timed("reward", self._init_reward)

    @staticmethod
    def _timed(name: str, build, *args, **kwargs):
        """Build one engine, logging how long it took."""
        start = time.time()
        engine = build(*args, **kwargs)
        log.info("step 3: %s ready (%.1fs)", name, time.time() - start)
        return engine

    def _load_config(self, stage: int) -> dict | None:
        """What `from_pretrained` needs to build weights partitioned at `stage` (3), else None."""
        config = self.config
        return partitioned_load_config(
            self.backend,
            dtype=self.dtype,
            stage=stage,
            offload=config.hardware.offload,
            micro_batch=config.ppo.per_device_training_batch_size,
            grad_accum=config.schedule.gradient_accumulation_steps,
        )

    def _actor_model(self, lora: bool, stage: int | None = None) -> torch.nn.Module:
        """The actor's weights, built partitioned when `stage` (default: the actor's) is 3."""
        config, actor = self.config, self.config.actor
        stage = actor.zero_stage if stage is None else stage
        model = create_lm(
            config.models.actor_model_name_or_path,
            self.tokenizer,
            self._load_config(stage),
            dropout=ppo_dropout(actor.dropout),
            seed=config.hardware.seed,
            attn_implementation=config.hardware.attn_implementation,
        )
        if lora:
            apply_lora(model, actor.lora_dim, actor.lora_module_name, config.schedule.only_optimize_lora)
        return model

    def _trained_engine(self, model: torch.nn.Module, optim: OptimConfig, total_iters: int, job: str, **kwargs):
        config = self.config
        return engine_from_config(
            self.backend,
            model,
            optim,
            config.schedule,
            config.hardware,
            config.logging,
            dtype=self.dtype,
            total_steps=total_iters,
            micro_batch=config.ppo.per_device_training_batch_size,
            job_name=job,
            **kwargs,
        )

    def _init_actor(self, total_iters: int):
        config = self.config
        # with the ptx loss, each PPO micro-batch is two actor backwards (PPO, then ptx) accumulated into
        # one step, as upstream does: twice the accumulation keeps the actor's steps on the planned schedule
        accumulation = config.schedule.gradient_accumulation_steps * (2 if config.ptx.unsupervised_dataset_name else 1)
        zero_extra = (
            mixed_precision_lora_config(self.backend, config.actor)
            if config.models.enable_mixed_precision_lora
            else None
        )
        engine = self._trained_engine(
            self._actor_model(lora=True),
            config.actor,
            total_iters,
            "step3_actor",
            grad_accum=accumulation,
            zero_extra=zero_extra,
        )
        if zero_extra:
            engine.optimizer.quantize_nontrainable_params()  # LoRA froze the base weights after partitioning
        return engine

    def _frozen_engine(self, model: torch.nn.Module, stage: int, offload: bool):
        return frozen_engine(
            self.backend,
            model,
            dtype=self.dtype,
            stage=stage,
            offload=offload,
            micro_batch=self.config.ppo.per_device_training_batch_size,
        )

    def _init_frozen_actor(self, stage: int, offload: bool, lora: bool = False):
        """The reference model (or the EMA copy): the actor's weights, forward only, at ZeRO `stage`."""
        return self._frozen_engine(self._actor_model(lora=lora, stage=stage), stage, offload)

    def _critic_model(self, fp32_loss: bool, stage: int | None = None) -> torch.nn.Module:
        """The reward model's weights, built partitioned when `stage` (default: the critic's) is 3."""
        config, critic = self.config, self.config.critic
        stage = critic.zero_stage if stage is None else stage
        return create_reward_model(
            config.models.critic_model_name_or_path,
            self.tokenizer,
            self._load_config(stage),
            dropout=ppo_dropout(critic.dropout),
            compute_fp32_loss=fp32_loss,
            seed=config.hardware.seed,
            attn_implementation=config.hardware.attn_implementation,
        )

    def _init_critic(self, total_iters: int):
        config, critic = self.config, self.config.critic
        fp32 = self.backend.compute_fp32_loss(self.critic_family, config.hardware.compute_fp32_loss)
        model = apply_lora(
            self._critic_model(fp32), critic.lora_dim, critic.lora_module_name, config.schedule.only_optimize_lora
        )
        return self._trained_engine(model, critic, total_iters, "step3_critic")

    def _init_reward(self):
        placement = self.decisions.reward
        return self._frozen_engine(
            self._critic_model(fp32_loss=True, stage=placement.stage), placement.stage, placement.offload
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
