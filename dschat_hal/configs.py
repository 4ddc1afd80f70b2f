"""Typed configuration of the three steps: dataclasses grouped by concern, each field with its default
and help text in one place.

A step's config (`Step1Config`, `Step2Config`, `DPOStepConfig`, `Step3Config`) is made of parts, one per
concern (model, data, optimisation, PPO, generation engine, hardware, logging, checkpointing, memory
plan). The command line is built from these fields (`dschat_hal/args.py`, the one place that maps flags
to configs and back): each field is the flag of its name (`--actor_learning_rate` is
`Step3Config.actor.learning_rate`, the part's prefix before the field's name), so `--help` shows
upstream DeepSpeed-Chat's flag names and defaults. Library code takes a config, or the part it needs::

    config = Step3Config(models=RLHFModelConfig("tiny-opt", "tiny-opt", allow_random_critic=True))
    engine = RLHFEngine(backend, config, tokenizer, num_total_iters=10)

Nothing heavy is imported here (no torch): `--help` is answered from these fields before torch loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from accel import DEVICE_CHOICES

PROMPT_FORMATS = ("plain", "chat_template")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
ATTN_HELP = "attention kernels of every model loaded (transformers' attn_implementation; default: its own choice)"
NUM_PADDING_HELP = (
    "accepted for upstream compatibility, without effect: end scores and the pairwise loss find each "
    "sequence's tokens through the attention mask, so OPT's leading padding token needs no offset"
)
Config = TypeVar("Config")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp", "remax")


def uses_critic(estimator: str) -> bool:
    """Whether advantage estimator `estimator` needs a value model, the critic (only PPO's GAE does)."""
    return estimator == "gae"


# what --kl_loss uses when its options are not given (an option without --kl_loss is refused)
KL_LOSS_DEFAULTS = {"kl_estimator": "k3", "kl_loss_coef": 0.001}


def parse_bool(value: str) -> bool:
    """A flag's true/false value (1/0, true/false, yes/no, on/off)."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def opt(default: Any = dataclasses.MISSING, help: str | None = None, **flag: Any) -> Any:  # noqa: A002
    """A field that is also a flag: its default, its help and argparse's extras (`type`, `choices`,
    `nargs`, `const`, `metavar`, `exclusive`: the mutually exclusive set it belongs to). A field
    without a default is a required flag. Mutable defaults (lists) are copied per instance."""
    metadata = {"help": help, **flag}
    if isinstance(default, list):
        return field(default_factory=functools.partial(list, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def switch(help: str | None = None, **flag: Any) -> Any:  # noqa: A002
    """An on/off field: a flag that takes no value (`store_true`)."""
    return field(default=False, metadata={"help": help, "action": "store_true", **flag})


def part(cls: type, *, title: str, prefix: str = "", required: bool = False, help_vars: dict | None = None, **defaults):
    """A step config's field holding one concern's config: its flags form the `--help` group `title`,
    named `--{prefix}{field}`; `defaults` are this step's own defaults, `help_vars` fill `{name}`s in
    the part's help texts."""
    metadata = {"config": cls, "title": title, "prefix": prefix, "help_vars": help_vars or {}}
    if required:
        return field(metadata=metadata)
    return field(default_factory=functools.partial(cls, **defaults), metadata=metadata)


# ---- shared parts ---------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Which data, how it is split between the steps, read and rendered."""

    data_path: list[str] = opt(
        ["local/jsonfile"],
        "dataset names (e.g. Dahoas/rm-static), local/jsonfile, or local dirs/files",
        nargs="*",
    )
    data_split: str = opt("2,4,4", "shares of each dataset for steps 1,2,3 (disjoint slices)")
    sft_only_data_path: list[str] = opt([], "datasets used only in step 1", nargs="*")
    prompt_key: str | None = opt(
        None,
        "the data column holding the prompt text or messages (e.g. question; default: prompt, "
        "else TRL's completion/messages/text for chosen)",
        metavar="COLUMN",
    )
    chosen_key: str | None = opt(
        None,
        "the data column holding the chosen text or messages (e.g. response; default: chosen, "
        "else TRL's completion/messages/text for chosen)",
        metavar="COLUMN",
    )
    rejected_key: str | None = opt(
        None,
        "the data column holding the rejected text or messages (e.g. bad_response; default: rejected, "
        "else TRL's completion/messages/text for chosen)",
        metavar="COLUMN",
    )
    data_output_path: str | None = opt(
        None,
        "Arrow cache of tokenised data (default: data_cache beside --output_dir, else "
        "~/.cache/dschat_hal/data; '' to disable)",
    )
    preprocessing_num_workers: int | None = opt(
        None, "processes that tokenise the data (datasets.map num_proc; default: one)", type=int
    )
    add_eot_token: bool = switch(
        "register --eot_token as an additional special token (one id, never split; embeddings grow to fit)"
    )
    eot_token: str = opt("<|endoftext|>", "the end-of-text token --add_eot_token registers")
    prompt_format: str = opt(
        "plain",
        "plain: the data's 'Human: ... Assistant:' text; chat_template: the turns rendered with the "
        "tokenizer's chat template (as TRL does), answers ending in its end-of-turn token",
        choices=PROMPT_FORMATS,
    )

    def column_keys(self) -> dict[str, str]:
        """The columns given (`--prompt_key`, ...) as role -> column."""
        given = {"prompt": self.prompt_key, "chosen": self.chosen_key, "rejected": self.rejected_key}
        return {role: column for role, column in given.items() if column}


@dataclass
class OptimConfig:
    """One trained model's optimiser: `--learning_rate` ... in steps 1 and 2, `--actor_...` and
    `--critic_...` in step 3."""

    learning_rate: float | None = opt(None, "peak learning rate (after warmup)", type=float)
    weight_decay: float = opt(0.0, "AdamW weight decay", type=float)
    zero_stage: int = opt(0, "ZeRO stage", type=int, choices=[0, 1, 2, 3])
    gradient_checkpointing: bool = switch()
    dropout: float | None = opt(None, "override the model's dropout (None: {unset})", type=float)
    lora_dim: int = opt(0, "LoRA rank (0: off)", type=int)
    lora_module_name: str = opt(
        "layers.", "substring of the linear layers to adapt ('layers.' covers OPT's decoder.layers. and llama's)"
    )
    lora_learning_rate: float = opt(5e-4, "learning rate of LoRA factors", type=float)


@dataclass
class ScheduleConfig:
    """How long training runs and how the learning rate moves: shared by the trained models."""

    only_optimize_lora: bool = switch("train only the LoRA factors (step 2 also trains its new value head)")
    num_train_epochs: int = opt(1, "epochs over the step's data", type=int)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", type=int)
    lr_scheduler_type: str = opt(
        "cosine",
        "learning-rate schedule over the planned optimizer steps",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    num_warmup_steps: int = opt(0, "optimizer steps of linear warmup", type=int)
    max_steps: int = opt(
        0, "stop after this many optimizer steps (0: no limit); the lr schedule still spans the epochs", type=int
    )
    max_bad_steps: int = opt(0, "non-finite/overflow steps tolerated before stopping", type=int)


@dataclass
class EvalConfig:
    """Evaluation during training."""

    eval_interval: int = opt(0, "evaluate {what} every N steps (0: off)", type=int)
    eval_iters: int = opt(100, "at most this many evaluation batches per evaluation", type=int)


@dataclass
class HardwareConfig:
    """The device, its dtype and kernels, seeding, and how ZeRO and the optimizer use memory."""

    device: str = opt("auto", "hardware backend", choices=DEVICE_CHOICES)
    dtype: str = opt("auto", "training dtype", choices=["auto", "fp32", "bf16", "fp16"])
    attn_implementation: str | None = opt(None, ATTN_HELP, choices=ATTN_IMPLEMENTATIONS)
    seed: int = opt(1234, "seeds the data split, shuffling and model init", type=int)
    local_rank: int = opt(-1, "passed by the deepspeed launcher", type=int)
    offload: bool = switch("ZeRO-Offload optimizer (and ZeRO-3 params) to the CPU")
    no_fused_kernels: bool = switch("torch AdamW instead of fused device kernels")
    optimizer: str = opt(
        "auto",
        "auto: the device's fused AdamW (CPU and CUDA: torch's AdamW(fused=True), HPU: Habana's FusedAdamW); "
        "deepspeed_fused: DeepSpeed's FusedAdam (CUDA; its op builds with nvcc on first use). "
        "--offload and --no_fused_kernels choose theirs",
        choices=["auto", "deepspeed_fused"],
    )
    zero_hpz_enabled: bool = switch(
        "ZeRO++ hpZ: ZeRO-3 weights also partitioned within each node (multi-node ZeRO-3 only)"
    )
    compute_fp32_loss: bool | None = opt(
        None,
        "compute losses in fp32 (default: the device's policy, e.g. bloom on HPU)",
        type=parse_bool,
        nargs="?",
        const=True,
    )
    bucket_lengths: list[int] | None = opt(None, "pad sequence lengths to these buckets", type=int, nargs="*")
    audit_shapes: bool = switch("record the distinct input shapes each model sees")
    enable_hpu_graphs: bool = switch(
        "HPU: step-3 generation in HPU graphs (HabanaAI's fork's flag; the default on HPU in lazy mode)",
        exclusive="hpu_graphs",
    )
    disable_hpu_graphs: bool = switch(
        "HPU: step-3 generation without HPU graphs (they are on by default in lazy mode)", exclusive="hpu_graphs"
    )


@dataclass
class LoggingConfig:
    """What is printed and where scalars go."""

    enable_tensorboard: bool = switch("upstream's flag: --report_to tensorboard")
    report_to: str | None = opt(
        None,
        "where scalars go (default: tensorboard with --enable_tensorboard, else none); "
        "wandb: imported only then, offline with WANDB_MODE=offline",
        choices=["tensorboard", "wandb", "none"],
    )
    tensorboard_path: str = opt("step_tensorboard", "where TensorBoard logs go")
    print_loss: bool = switch("print the loss of every step")
    log_interval: int = opt(10, "steps between progress lines (host syncs)", type=int)
    quiet: bool = switch("no progress bars")
    debug: bool = switch("show tracebacks instead of one-line errors")
    verbose: bool = switch("keep DeepSpeed's own info log and memory reports")


@dataclass
class CheckpointConfig:
    """Where the trained model is saved, and resumable checkpoints."""

    output_dir: str | None = opt(
        None,
        "where the trained model is saved, HF format; '' saves nothing (default: output/actor, output/reward "
        "or output/rlhf under the current directory, for steps 1, 2 and 3)",
    )
    save_interval: int = opt(0, "save a resumable checkpoint every N steps (0: off)", type=int)
    checkpoint_dir: str | None = opt(None, "where checkpoints go (default: OUTPUT_DIR_checkpoints)")
    resume: bool = switch("continue from the latest checkpoint")
    save_total_limit: int = opt(0, "keep only the newest N checkpoints (0: all)", type=int)


@dataclass
class PlanConfig:
    """The memory plan (dschat_hal/memory_plan/): checked before any weights are loaded."""

    dry_run: bool = switch("print the memory plan per rank and phase, then stop")
    num_devices: int | None = opt(None, "ranks the plan assumes (default: WORLD_SIZE)", type=int)
    device_memory: str | None = opt(None, "memory per device for the plan, e.g. 40GiB (default: what is free)")
    skip_memory_check: bool = switch("start even when the memory plan says it does not fit")


# ---- steps 1 and 2 ------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Steps 1 and 2: the model trained, its batches and sequence length."""

    model_name_or_path: str = opt("tiny-opt", "hub name, local dir, or tiny-opt|tiny-bloom|tiny-llama")
    per_device_train_batch_size: int = opt(16, "training micro-batch per device", type=int)
    per_device_eval_batch_size: int = opt(16, "evaluation batch per device", type=int)
    max_seq_len: int = opt(512, "prompt + answer tokens (longer rows are cut)", type=int)


@dataclass
class RewardModelConfig:
    """Step 2's reward model."""

    num_padding_at_beginning: int = opt(1, NUM_PADDING_HELP, type=int)
    center_reward: bool = switch(
        "after training, store the mean score of (at most --eval_iters batches of) the training pairs with "
        "the model, for step 3's --center_reward"
    )


@dataclass
class DPOConfig:
    """DPO's loss and its frozen reference model (upstream's step2_dpo_finetuning)."""

    beta: float = opt(
        0.1, "DPO temperature (typically 0.1 to 0.5): how far the policy may move from the reference", type=float
    )
    label_smoothing: float = opt(
        0.0, "conservative DPO: the share of preference labels assumed flipped, in [0, 0.5)", type=float
    )
    offload_reference_model: bool = switch("ZeRO-Offload the reference model")
    reference_zero_stage: str = opt(
        "auto",
        "the frozen reference: 0 replicated, 3 partitioned; auto: 3 when the model is ZeRO-3 or with "
        "--offload_reference_model, else 0 (upstream's rule)",
        choices=["auto", "0", "3"],
    )


@dataclass
class Step1Config:
    """Step 1: supervised fine-tuning of the actor."""

    DESCRIPTION: ClassVar[str] = "Step 1: supervised fine-tuning of the actor"
    OUTPUT_NAME: ClassVar[str] = "actor"  # the default output is output/actor

    model: ModelConfig = part(ModelConfig, title="model")
    data: DataConfig = part(DataConfig, title="data")
    optim: OptimConfig = part(
        OptimConfig, title="model optimisation", help_vars={"unset": "its config's"}, learning_rate=1e-3
    )
    schedule: ScheduleConfig = part(ScheduleConfig, title="schedule")
    hardware: HardwareConfig = part(HardwareConfig, title="hardware")
    logging: LoggingConfig = part(LoggingConfig, title="logging", tensorboard_path="step1_tensorboard")
    checkpoint: CheckpointConfig = part(CheckpointConfig, title="output and checkpoints")
    plan: PlanConfig = part(PlanConfig, title="memory plan")


@dataclass
class Step2Config:
    """Step 2: reward model fine-tuning on preference pairs."""

    DESCRIPTION: ClassVar[str] = "Step 2: reward model fine-tuning on preference pairs"
    OUTPUT_NAME: ClassVar[str] = "reward"

    model: ModelConfig = part(ModelConfig, title="model")
    reward: RewardModelConfig = part(RewardModelConfig, title="reward model")
    data: DataConfig = part(DataConfig, title="data")
    optim: OptimConfig = part(
        OptimConfig, title="model optimisation", help_vars={"unset": "its config's"}, learning_rate=5e-5
    )
    schedule: ScheduleConfig = part(ScheduleConfig, title="schedule")
    eval: EvalConfig = part(
        EvalConfig, title="evaluation", help_vars={"what": "reward accuracy and scores on the eval pairs"}
    )
    hardware: HardwareConfig = part(HardwareConfig, title="hardware")
    logging: LoggingConfig = part(LoggingConfig, title="logging", tensorboard_path="step2_tensorboard")
    checkpoint: CheckpointConfig = part(CheckpointConfig, title="output and checkpoints")
    plan: PlanConfig = part(PlanConfig, title="memory plan")


@dataclass
class DPOStepConfig:
    """Step 2's alternative, DPO: the step-1 actor trained on preference pairs against a frozen copy."""

    DESCRIPTION: ClassVar[str] = (
        "Step 2 alternative: DPO fine-tuning of the actor on preference pairs (no reward model)"
    )
    OUTPUT_NAME: ClassVar[str] = "dpo"

    model: ModelConfig = part(ModelConfig, title="model")
    dpo: DPOConfig = part(DPOConfig, title="DPO")
    data: DataConfig = part(DataConfig, title="data")
    optim: OptimConfig = part(
        OptimConfig, title="model optimisation", help_vars={"unset": "its config's"}, learning_rate=1e-3
    )
    schedule: ScheduleConfig = part(ScheduleConfig, title="schedule")
    eval: EvalConfig = part(
        EvalConfig, title="evaluation", help_vars={"what": "DPO loss, rewards and accuracy on the eval pairs"}
    )
    hardware: HardwareConfig = part(HardwareConfig, title="hardware")
    logging: LoggingConfig = part(LoggingConfig, title="logging", tensorboard_path="step2_tensorboard")
    checkpoint: CheckpointConfig = part(CheckpointConfig, title="output and checkpoints")
    plan: PlanConfig = part(PlanConfig, title="memory plan")


# ---- step 3 ---------------------------------------------------------------------------------------------
@dataclass
class RLHFModelConfig:
    """Step 3's models: the actor (and reference) from step 1, the reward model (and critic) from step 2."""

    actor_model_name_or_path: str = opt(help="step-1 output (or any causal LM)")
    critic_model_name_or_path: str = opt(
        help="step-2 output: the reward model, and the critic's initial weights (gae only)"
    )
    num_padding_at_beginning: int = opt(1, NUM_PADDING_HELP, type=int)
    allow_random_critic: bool = switch("accept a built-in tiny (random) critic/reward model instead of a step-2 output")
    enable_ema: bool = switch("keep an EMA copy of the actor (beta 0.992)")
    enable_mixed_precision_lora: bool = switch(
        "ZeRO++ quantised frozen weights for the actor (needs --actor_lora_dim > 0 and --actor_zero_stage 3)"
    )


@dataclass
class FrozenModelsConfig:
    """Where step 3's frozen models (reference, reward) live (`dschat_hal/decisions.py`)."""

    offload_reference_model: bool = switch("ZeRO-Offload the reference model")
    offload_reward_model: bool = switch("ZeRO-Offload the reward model")
    reference_zero_stage: str = opt(
        "auto",
        "the frozen reference model: 0 replicated (no gathers in its forward), 3 partitioned; auto: 3 with "
        "--offload_reference_model, 0 unless the actor is ZeRO-3 and the memory plan needs it partitioned",
        choices=["auto", "0", "3"],
    )
    reward_zero_stage: str = opt(
        "auto",
        "the frozen reward model: 0 replicated (no gathers in its forward), 3 partitioned; auto: 3 with "
        "--offload_reward_model, 0 unless the critic is ZeRO-3 and the memory plan needs it partitioned",
        choices=["auto", "0", "3"],
    )


@dataclass
class EngineConfig:
    """Step 3's generation engine: prompt and answer lengths, sampling, the hybrid engine."""

    per_device_generation_batch_size: int = opt(16, "prompts per device per generation", type=int)
    max_prompt_seq_len: int = opt(256, "prompt tokens (left-padded to this)", type=int)
    max_answer_seq_len: int = opt(256, "generated tokens at most", type=int)
    temperature: float = opt(1.0, "sampling temperature of generation", type=float)
    greedy_generation: bool = switch(
        "decode greedily (upstream DeepSpeed-Chat's choice); default: sample with --temperature"
    )
    enable_hybrid_engine: bool = switch(
        "generate in the actor's generation form: ZeRO-3 weights gathered once per phase into a hook-free "
        "copy, LoRA folded in, our decode loop over a static KV cache"
    )
    hybrid_engine: str = opt("own", "'deepspeed' is refused (see docs/hybrid-engine.md)", choices=["own", "deepspeed"])
    release_inference_cache: bool = switch("hybrid engine: free the KV cache after each phase")
    unpin_actor_parameters: bool = switch(
        "hybrid engine, ZeRO-3: free the gathered inference copy after each phase (less memory, slower)"
    )
    inference_tp_size: int = opt(
        1, "hybrid engine: generate on groups of this many ranks, the actor sharded by DeepSpeed AutoTP", type=int
    )
    tp_gather_partition_size: int = opt(
        8, "hybrid engine, ZeRO-3: layers gathered per group when the whole model does not fit at once", type=int
    )
    enable_device_graphs: bool = switch(
        "capture the hybrid engine's decode step in device graphs (CUDA graphs, HPU graphs; on the CPU "
        "torch.compile's eager backend, a check of the capture); prompts then pad to --max_prompt_seq_len "
        "(or --bucket_lengths)"
    )
    print_answers: bool = switch("print a prompt and its answer")
    print_answers_interval: int = opt(1, "PPO steps between printed answers", type=int)


@dataclass
class PPOConfig:
    """PPO (or a critic-free estimator): batches, epochs, reward shaping, KL and clipping, with
    DeepSpeed-Chat's defaults."""

    per_device_training_batch_size: int = opt(16, "experience rows per PPO micro-batch", type=int)
    generation_batches: int = opt(1, "generation batches collected per PPO step", type=int)
    ppo_epochs: int = opt(1, "passes over each step's experience", type=int)
    kl_ctl: float = opt(0.1, "KL penalty coefficient", type=float)
    target_kl: float | None = opt(None, "adapt kl_ctl towards this KL (off by default)", type=float)
    clip_reward_value: float = opt(5.0, "reward-model scores are clipped to ±this", type=float)
    center_reward: bool = switch(
        "subtract the mean training score step 2 stored with the reward model (step 2 --center_reward)"
    )
    normalize_reward: bool = switch(
        "standardise reward-model scores by their running mean/std before the clip (OpenRLHF's)"
    )
    whiten_advantages: bool = switch("whiten advantages per PPO micro-batch (TRL's default)")
    recompute_old_logprobs: bool = switch(
        "always compute the actor's old log-probs and the critic's old values in separate experience "
        "forwards, as upstream does (by default, with one PPO epoch over one micro-batch per generation batch and "
        "the model's dropout off, they are taken from the training forwards, which see the same weights: one "
        "actor and one critic forward less per step; the critic's graph is then kept through the actor's update)"
    )
    cliprange: float = opt(0.2, "PPO ratio clip", type=float)
    cliprange_value: float = opt(0.2, "critic value clip", type=float)
    gamma: float = opt(1.0, "discount", type=float)
    lam: float = opt(0.95, "GAE lambda", type=float)
    advantage_estimator: str = opt(
        "gae",
        "gae: PPO with the critic; critic-free (no critic is built, --critic_model_name_or_path is the "
        "reward model only): grpo (group mean/std), rloo (leave-one-out mean), reinforce_pp (REINFORCE++: "
        "discounted returns, batch-whitened), remax (minus the greedy answer's reward)",
        choices=list(ADVANTAGE_ESTIMATORS),
    )
    n_samples_per_prompt: int = opt(
        1,
        "answers sampled per prompt (the experience batch is prompts x N rows); grpo and rloo need N >= 2",
        type=int,
    )
    dr_grpo: bool = switch(
        "grpo as Dr. GRPO: no division by the group's std, and the policy loss summed over answer tokens "
        "divided by rows x --max_answer_seq_len"
    )
    kl_loss: bool = switch(
        "the KL to the reference model as a loss term (GRPO's placement, verl's use_kl_loss): "
        "--kl_loss_coef x the mean of --kl_estimator over answer tokens, and no KL penalty in the reward"
    )
    kl_estimator: str | None = opt(
        None,
        "with --kl_loss, Schulman's estimator of KL(policy || reference) per token, r = p_ref / p: "
        "k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r (default: k3, GRPO's and verl's low_var_kl)",
        choices=["k1", "k2", "k3"],
    )
    kl_loss_coef: float | None = opt(
        None, "with --kl_loss, the KL term's weight (default: 0.001, verl's kl_loss_coef)", type=float
    )
    log_rollout_mismatch: bool = switch(
        "keep the generation engine's log-prob of each sampled token (fp32) and log per step the share "
        "of answer tokens whose training/rollout probability ratio lies outside [0.9, 1.1] (rollout_mismatch)"
    )
    rollout_is_cap: float | None = opt(
        None,
        "truncated importance sampling: weight each answer token's policy loss by min(p_train / p_rollout, "
        "C), detached (verl's TIS; 2 is usual); implies --log_rollout_mismatch (off by default)",
        type=float,
    )
    align_overflow: bool = switch(
        "fp16: when actor or critic overflows, skip both optimizer steps (keeps them in step)"
    )


@dataclass
class PtxConfig:
    """Step 3's optional unsupervised (ptx) loss on plain text, mixed into the actor's updates."""

    unsupervised_dataset_name: str | None = opt(None, "text dataset for the ptx loss")
    unsupervised_dataset_config_name: str | None = opt(None, "its configuration name")
    unsup_coef: float = opt(
        27.8, "weight of the ptx loss, accumulated with each PPO micro-batch into one actor step", type=float
    )
    per_device_unsup_batch_size: int | None = opt(
        None,
        "ptx rows per generation batch, split across its PPO micro-batches (None: the generation batch size "
        "x --n_samples_per_prompt)",
        type=int,
    )


@dataclass
class Step3ScheduleConfig(ScheduleConfig):
    """Step 3's schedule: also the test mode's early stop."""

    enable_test_mode: bool = switch("stop after --test_stop_step PPO steps")
    test_stop_step: int = opt(0, "the PPO step --enable_test_mode stops at", type=int)
    max_seconds: float = opt(
        0.0,
        "stop at the first PPO step boundary after this many seconds of training (0: no limit; counted from "
        "the loop's start, model loading and held-out evaluations excluded; a wall-time budget of this "
        "process: a resumed run starts a new one); the lr schedule still spans the epochs",
        type=float,
    )


@dataclass
class Step3Config:
    """Step 3: RLHF fine-tuning with PPO or a critic-free estimator (GRPO, RLOO, REINFORCE++, ReMax)."""

    DESCRIPTION: ClassVar[str] = (
        "Step 3: RLHF fine-tuning with PPO or a critic-free estimator (GRPO, RLOO, REINFORCE++, ReMax)"
    )
    OUTPUT_NAME: ClassVar[str] = "rlhf"

    models: RLHFModelConfig = part(RLHFModelConfig, title="models", required=True)
    engine: EngineConfig = part(EngineConfig, title="generation engine")
    ppo: PPOConfig = part(PPOConfig, title="PPO")
    frozen: FrozenModelsConfig = part(FrozenModelsConfig, title="frozen models")
    ptx: PtxConfig = part(PtxConfig, title="unsupervised (ptx) loss")
    data: DataConfig = part(DataConfig, title="data")
    actor: OptimConfig = part(
        OptimConfig,
        title="actor optimisation",
        prefix="actor_",
        help_vars={"unset": "0: off, as TRL does in PPO"},
        learning_rate=9.65e-6,
    )
    critic: OptimConfig = part(
        OptimConfig,
        title="critic optimisation",
        prefix="critic_",
        help_vars={"unset": "0: off, as TRL does in PPO"},
        learning_rate=5e-6,
    )
    schedule: Step3ScheduleConfig = part(Step3ScheduleConfig, title="schedule", num_warmup_steps=100)
    eval: EvalConfig = part(
        EvalConfig, title="evaluation", help_vars={"what": "the mean reward of answers to held-out prompts"}
    )
    hardware: HardwareConfig = part(HardwareConfig, title="hardware")
    logging: LoggingConfig = part(LoggingConfig, title="logging", tensorboard_path="step3_tensorboard")
    checkpoint: CheckpointConfig = part(CheckpointConfig, title="output and checkpoints")
    plan: PlanConfig = part(PlanConfig, title="memory plan")

    def has_critic(self) -> bool:
        """Whether this run builds, trains and saves a critic (gae only)."""
        return uses_critic(self.ppo.advantage_estimator)


def to_flags(config: object, prefix: str = "") -> dict:
    """A config as the flags' values (dest -> value), as the command line would give them."""
    flags = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "config" in f.metadata:
            flags.update(to_flags(value, prefix + f.metadata["prefix"]))
        else:
            flags[prefix + f.name] = value
    return flags


def to_config(args: Any, config_class: type[Config]) -> Config:
    """The typed config of parsed (and validated) flags: `to_config(args, Step3Config)`."""
    return _from_flags(vars(args), config_class, "")


def _from_flags(flags: dict, cls: type[Config], prefix: str) -> Config:
    values = {}
    for f in dataclasses.fields(cls):
        if "config" in f.metadata:
            values[f.name] = _from_flags(flags, f.metadata["config"], prefix + f.metadata["prefix"])
        else:
            values[f.name] = flags[prefix + f.name]
    return cls(**values)


def with_flags(config: Config, values: dict[str, Any]) -> Config:
    """`config` with some flags' values changed (dest -> value, as `to_flags` names them), each through
    `dataclasses.replace` of the part that holds it: `with_flags(config, {"actor_zero_stage": 3})`."""
    left = dict(values)
    changed = _replace_flags(config, left, "")
    if left:
        raise KeyError(f"{type(config).__name__} has no flag {', '.join(sorted(left))}")
    return changed


def _replace_flags(config: Config, left: dict[str, Any], prefix: str) -> Config:
    changes = {}
    for f in dataclasses.fields(config):
        if "config" in f.metadata:
            part_ = getattr(config, f.name)
            new = _replace_flags(part_, left, prefix + f.metadata["prefix"])
            if new is not part_:
                changes[f.name] = new
        elif prefix + f.name in left:
            changes[f.name] = left.pop(prefix + f.name)
    return dataclasses.replace(config, **changes) if changes else config
