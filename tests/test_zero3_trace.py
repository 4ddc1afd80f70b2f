"""Step 3 under ZeRO-3 calls every engine as its module (`reward_model.score`), so DeepSpeed's
start-of-forward hook closes each step's parameter trace (the actor's too, with the hybrid engine, whose
decoding is not the actor module's forward): with a complete trace the critic's backward
reuses what its forward gathered and the next layers are prefetched. Called as `engine.forward_value`
(upstream's way) the critic's trace never completed and each backward gathered the whole model again."""

from __future__ import annotations

from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

from dschat_hal.rlhf import engine as rlhf_engine
from tests.test_old_logprobs import tiny_step3
from training.step3_rlhf_finetuning.main import main as step3


def test_zero3_engines_complete_their_parameter_trace_and_the_critic_backward_gathers_nothing(tmp_path, monkeypatch):
    engines: dict = {}
    init = rlhf_engine.RLHFEngine.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.update(actor=self.actor, critic=self.critic)

    gathered: dict[tuple[int, bool], int] = {}
    original = ppc.PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params

    def counted(self, params, forward):
        key = (id(self), forward)
        gathered[key] = gathered.get(key, 0) + sum(p.ds_numel for p in params)
        return original(self, params, forward)

    monkeypatch.setattr(rlhf_engine.RLHFEngine, "__init__", recording_init)
    monkeypatch.setattr(
        ppc.PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__all_gather_params", counted
    )
    # the hybrid engine generates on its own copy: the actor's module runs only its training forward
    argv = tiny_step3(tmp_path, "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--enable_hybrid_engine")
    argv[argv.index("--test_stop_step") + 1] = "4"
    step3(argv)
    for name, engine in engines.items():
        coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
        assert coordinator.is_complete_trace(), name
    critic = engines["critic"].optimizer.parameter_offload.get_param_coordinator()
    numel = sum(p.ds_numel for p in engines["critic"].module.parameters() if not p.ds_persist)  # gathered ones
    # the first step records the trace (and gathers again in backward); later backwards reuse the forward's
    assert gathered[(id(critic), True)] >= 4 * numel * 0.9
    assert gathered.get((id(critic), False), 0) <= 1.5 * numel  # without a complete trace: ~4x
