"""Flags that would do nothing in this run (another device, another ZeRO stage, a missing companion
flag): one `note:` line each at start-up instead of silence."""

from __future__ import annotations

import argparse

from accel import Accelerator
from dschat_hal.ds_config import hpz_entries

# Where each graph flag acts: HPU graphs capture step 3's generation on either path (the hybrid engine's
# decode step, optimum-habana's patched forward on the plain path too); other device graphs only the engine's.
ONLY_STEP3_CAPTURES = {
    "enable_hpu_graphs": "only step 3's generation runs in HPU graphs (by default in HPU lazy mode)",
    "enable_device_graphs": "only step 3's hybrid engine captures its decode step",
}


def inert_flag_notes(args: argparse.Namespace, backend: Accelerator, world_size: int) -> list[str]:
    """One line per flag given that has no effect here, naming why and what would make it act."""
    flags = vars(args)
    step3 = "enable_hybrid_engine" in flags
    hybrid = flags.get("enable_hybrid_engine", False)
    notes = []
    for flag in ("enable_hpu_graphs", "enable_device_graphs"):
        if not flags.get(flag):
            continue
        if not step3:
            notes.append(f"--{flag} does nothing in this step: {ONLY_STEP3_CAPTURES[flag]}")
        elif backend.graph_kind is None:
            notes.append(f"--{flag} does nothing on {backend.name}: it has no device graphs; drop the flag")
        elif flag == "enable_hpu_graphs" and backend.graph_kind != "HPU graphs":
            notes.append(
                f"--enable_hpu_graphs on {backend.name}: the decode step is captured in {backend.graph_kind} "
                "instead (the same as --enable_device_graphs)"
            )
    if flags.get("disable_hpu_graphs"):
        if not step3:
            notes.append("--disable_hpu_graphs does nothing in this step: only step 3's generation is captured")
        elif flags.get("enable_device_graphs"):
            notes.append(
                "--disable_hpu_graphs does nothing with --enable_device_graphs, which asks for graphs; drop one"
            )
        elif not backend.graphs_by_default:
            notes.append(
                f"--disable_hpu_graphs does nothing on {backend.name}: its generation is not captured in graphs by "
                "default (HPU graphs are on by default in lazy mode only); drop the flag"
            )
    if flags.get("release_inference_cache") and not hybrid:
        notes.append(
            "--release_inference_cache frees the hybrid engine's KV cache; without --enable_hybrid_engine it does "
            "nothing: add --enable_hybrid_engine or drop the flag"
        )
    if flags.get("unpin_actor_parameters"):
        if not hybrid:
            notes.append(
                "--unpin_actor_parameters frees the hybrid engine's inference copy; without --enable_hybrid_engine "
                "it does nothing: add --enable_hybrid_engine or drop the flag"
            )
        elif flags.get("actor_zero_stage") != 3:
            notes.append(
                f"--unpin_actor_parameters frees the gathered copy of a ZeRO-3 actor; with --actor_zero_stage "
                f"{flags.get('actor_zero_stage')} there is none, so it does nothing"
            )
    if flags.get("zero_hpz_enabled"):
        stages = [flags[k] for k in ("zero_stage", "actor_zero_stage", "critic_zero_stage") if k in flags]
        if not any(hpz_entries(backend, stage, world_size) for stage in stages):
            notes.append(
                f"--zero_hpz_enabled does nothing here: it partitions ZeRO-3 weights within each node of a "
                f"multi-node run (this run: ZeRO stage {'/'.join(map(str, stages))}, {world_size} process(es))"
            )
    if flags.get("optimizer") == "deepspeed_fused":
        chosen = backend.describe_optimizer(
            offload=flags.get("offload", False), fused=not flags.get("no_fused_kernels")
        )
        if not chosen.endswith(".FusedAdam"):
            why = next((f"--{f}" for f in ("offload", "no_fused_kernels") if flags.get(f)), None)
            notes.append(
                f"--optimizer deepspeed_fused does nothing with {why}, which picks {chosen}; drop one of the two"
                if why
                else f"--optimizer deepspeed_fused does nothing on {backend.name}: DeepSpeed's FusedAdam is a CUDA "
                f"optimizer ({chosen} is used); drop the flag"
            )
    notes.extend(critic_free_notes(args))
    return notes


# Step-3 flags that only the critic (or GAE, which needs it) reads.
CRITIC_ONLY_FLAGS = (
    "critic_learning_rate",
    "critic_weight_decay",
    "critic_zero_stage",
    "critic_gradient_checkpointing",
    "critic_dropout",
    "critic_lora_dim",
    "critic_lora_module_name",
    "critic_lora_learning_rate",
    "cliprange_value",
    "lam",
)


def critic_free_notes(args: argparse.Namespace) -> list[str]:
    """With a critic-free `--advantage_estimator`, one line naming the critic-only flags set away from their
    defaults: no critic is built, so they do nothing (the reward model is placed as the reference)."""
    from dschat_hal.configs import uses_critic

    if "advantage_estimator" not in vars(args) or uses_critic(args.advantage_estimator):
        return []
    from dschat_hal.configs import RLHFModelConfig, Step3Config, to_flags

    defaults = to_flags(Step3Config(models=RLHFModelConfig("", "")))
    given = [name for name in CRITIC_ONLY_FLAGS if getattr(args, name, None) != defaults[name]]
    if not given:
        return []
    flags = ", ".join(f"--{name}" for name in given)
    return [
        f"{flags} {'is' if len(given) == 1 else 'are'} unused with --advantage_estimator {args.advantage_estimator}, "
        "which builds no critic (--critic_model_name_or_path is the reward model only)"
    ]
