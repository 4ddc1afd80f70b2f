"""The memory plan: DeepSpeed's own estimators, DeepSpeed-Chat's published runs, the refusal and --dry_run."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from dschat_hal import memory_plan
from dschat_hal.args import step1_parser, step3_parser
from dschat_hal.configs import Step1Config, Step3Config, to_config
from dschat_hal.rlhf.advantages import ESTIMATORS
from tests.conftest import ROOT

CONFIGS = ROOT / "benchmarks" / "model_configs"
GB = 2**30


def config(name: str) -> str:
    return str(CONFIGS / name)


# ---- training states against DeepSpeed's estimators -----------------------------------------------
def _deepspeed_table(estimator, model, gpus: int, nodes: int) -> dict[str, tuple[float, float]]:
    """DeepSpeed's printed table: options -> (GB per CPU node, GB per GPU)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimator(model, num_gpus_per_node=gpus, num_nodes=nodes, additional_buffer_factor=1.0)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", out.getvalue(), re.M)
    return {
        options.replace("OffloadDeviceEnum.", "").replace(" ", ""): (float(cpu), float(gpu))
        for cpu, gpu, options in rows
    }


@pytest.fixture(scope="module")
def real_model():
    """A 100M-parameter OPT with real (uninitialised) storage: DeepSpeed counts by data_ptr."""
    from transformers import AutoModelForCausalLM, OPTConfig
    from transformers.modeling_utils import no_init_weights

    cfg = OPTConfig(
        hidden_size=1024, ffn_dim=4096, num_hidden_layers=8, num_attention_heads=16, vocab_size=8192,
        word_embed_proj_dim=1024, max_position_embeddings=512,
    )  # fmt: skip
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    from deepspeed.runtime.zero.stage3 import model_to_params

    total, largest = model_to_params(model)
    return model, total, largest


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 4)])
def test_zero3_states_equal_deepspeeds_all_live_estimate(real_model, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live

    model, total, largest = real_model
    table = _deepspeed_table(estimate_zero3_model_states_mem_needs_all_live, model, gpus, nodes)
    ranks = gpus * nodes
    ours = memory_plan.training_states(total, 0, largest, 3, ranks, 2, offload=False, device="cuda")
    assert ours.device / GB == pytest.approx(
        table["offload_param=none,offload_optimizer=none,zero_init=1"][1], abs=0.006
    )
    ours = memory_plan.training_states(total, 0, largest, 3, ranks, 2, offload=True, device="cuda")
    cpu, gpu = table["offload_param=cpu,offload_optimizer=cpu,zero_init=1"]
    assert ours.device / GB == pytest.approx(gpu, abs=0.006)
    assert ours.host * gpus / GB == pytest.approx(cpu, abs=0.006)  # DeepSpeed's CPU column is per node


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (8, 4)])
def test_zero2_states_equal_deepspeeds_all_live_estimate(real_model, gpus, nodes):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live

    model, total, largest = real_model
    table = _deepspeed_table(estimate_zero2_model_states_mem_needs_all_live, model, gpus, nodes)
    ranks = gpus * nodes
    ours = memory_plan.training_states(total, 0, largest, 2, ranks, 2, offload=False, device="cuda")
    assert ours.device / GB == pytest.approx(table["offload_optimizer=none"][1], abs=0.006)
    ours = memory_plan.training_states(total, 0, largest, 2, ranks, 2, offload=True, device="cuda")
    assert ours.device / GB == pytest.approx(table["offload_optimizer=cpu"][1], abs=0.006)
    if gpus * 4 <= 16:  # DeepSpeed's CPU column: max(4 x GPUs, 16) bytes per parameter per node
        assert ours.host * gpus / GB == pytest.approx(table["offload_optimizer=cpu"][0], abs=0.006)


@pytest.mark.parametrize("name", ["opt-13b", "opt-66b", "llama-2-7b", "llama-2-70b"])
def test_states_equal_deepspeeds_formulas_for_published_shapes(name):
    """Meta-device counts of the real shapes, through DeepSpeed's estimator formulas (exact)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = memory_plan.model_shape(config(name))
    for gpus, nodes in ((1, 1), (8, 1), (8, 8)):
        ranks = gpus * nodes
        _, z3, _ = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_layer, gpus, nodes, cpu_offload=False, cpu_offload_params=False
        )
        _, z2 = estimate_zero2_model_states_mem_needs(shape.params, gpus, nodes, cpu_offload=False)
        z3_ours = memory_plan.training_states(shape.params, 0, shape.largest_layer, 3, ranks, 2, False, "cuda").device
        z2_ours = memory_plan.training_states(shape.params, 0, shape.largest_layer, 2, ranks, 2, False, "cuda").device
        z1_ours = memory_plan.training_states(shape.params, 0, shape.largest_layer, 1, ranks, 2, False, "cuda").device
        assert z3_ours == pytest.approx(z3, abs=2)
        assert z2_ours == pytest.approx(z2, abs=2)
        assert z1_ours >= z2_ours and (ranks > 1 or z1_ours == pytest.approx(z2_ours))  # ZeRO-1 keeps whole grads


def test_parameter_counts_of_published_shapes():
    """The configs hold the published shapes: OPT-1.3B/13B/66B, Llama-2-7B/13B/70B (within 2%)."""
    expected = {"opt-1.3b": 1.32e9, "opt-13b": 12.9e9, "opt-66b": 65.7e9, "llama-2-7b": 6.74e9,
                "llama-2-13b": 13.0e9, "llama-2-70b": 69.0e9}  # fmt: skip
    for name, count in expected.items():
        assert memory_plan.model_shape(config(name)).params == pytest.approx(count, rel=0.02), name


# ---- activations against what autograd saves --------------------------------------------------
def _saved_bytes_per_token_per_layer(config, batch: int = 3, seq: int = 40) -> float:
    """Bytes autograd keeps for backward (parameters excluded), per token, per extra layer."""
    import torch
    from transformers import AutoModelForCausalLM

    totals = []
    for layers in (1, 2):
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t, seen=seen, params=params):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        ids = torch.randint(3, config.vocab_size, (batch, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        totals.append(sum(seen.values()))
    return (totals[1] - totals[0]) / (batch * seq)


@pytest.mark.parametrize("family", ["opt", "llama", "bloom"])
def test_layer_activations_equal_what_autograd_saves(family, tmp_path):
    from transformers import BloomConfig, LlamaConfig, OPTConfig

    common = {"vocab_size": 512, "hidden_size": 192}
    config = {
        "opt": OPTConfig(ffn_dim=640, num_attention_heads=6, word_embed_proj_dim=192, dropout=0.1, **common),
        "llama": LlamaConfig(intermediate_size=520, num_attention_heads=6, num_key_value_heads=2, **common),
        "bloom": BloomConfig(n_head=6, hidden_dropout=0.0, attention_dropout=0.0, **common),
    }[family]
    (tmp_path / "config.json").write_text(config.to_json_string())
    shape = memory_plan.model_shape(str(tmp_path))
    planned = memory_plan.layer_bytes(shape, seq=40, width=2, dropout=family == "opt")
    assert planned == pytest.approx(_saved_bytes_per_token_per_layer(config), rel=0.03)


# ---- DeepSpeed-Chat's published runs ------------------------------------------------------------
def _step1(*flags: str) -> Step1Config:
    """Step 1's config of these flags, as the step builds it from its command line."""
    return to_config(step1_parser().parse_args(list(flags)), Step1Config)


def _step3_flags(*flags: str) -> Step3Config:
    """Step 3's config of these flags, as the step builds it from its command line."""
    return to_config(step3_parser().parse_args(list(flags)), Step3Config)


def _step3(*flags: str) -> Step3Config:
    return _step3_flags(
        "--actor_model_name_or_path", config(flags[0]), "--critic_model_name_or_path", config("opt-350m"), *flags[1:]
    )


# upstream's training_scripts/opt/{single_gpu/run_1.3b.sh, single_node/run_13b.sh, multi_node/run_66b.sh}
PUBLISHED = {
    "OPT-1.3B on 1x A6000-48G": (
        ["opt-1.3b", "--actor_zero_stage", "0", "--critic_zero_stage", "0", "--actor_lora_dim", "128",
         "--actor_gradient_checkpointing", "--actor_dropout", "0.0", "--gradient_accumulation_steps", "2",
         "--enable_hybrid_engine"], 1, "48GiB"),
    "OPT-13B on 8x A100-40G": (
        ["opt-13b", "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--actor_lora_dim", "128",
         "--actor_gradient_checkpointing", "--actor_dropout", "0.0", "--enable_hybrid_engine",
         "--inference_tp_size", "2"], 8, "40GiB"),
    "OPT-66B on 64x A100-80G": (
        ["opt-66b", "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--actor_lora_dim", "128",
         "--actor_gradient_checkpointing", "--actor_dropout", "0.0", "--enable_hybrid_engine",
         "--inference_tp_size", "8", "--tp_gather_partition_size", "4", "--per_device_generation_batch_size", "4",
         "--per_device_training_batch_size", "4"], 64, "80GiB"),
}  # fmt: skip


@pytest.mark.parametrize("run", list(PUBLISHED))
def test_deepspeed_chats_published_step3_runs_fit(run):
    flags, ranks, memory = PUBLISHED[run]
    args = _step3(*flags, "--device", "cuda", "--dtype", "fp16")
    plan = memory_plan.build(args, 3, "cuda", ranks, memory_plan.parse_bytes(memory))
    assert plan.fits, memory_plan.render(plan)


def test_the_critic_graph_is_kept_through_the_actors_update_only_where_the_plan_fits_with_it():
    flags, ranks, memory = PUBLISHED["OPT-13B on 8x A100-40G"]
    big = _step3(*flags, "--device", "cuda", "--dtype", "fp16", "--num_devices", str(ranks), "--device_memory", memory)
    small = _step3("opt-1.3b", "--device", "cuda", "--dtype", "fp16", "--num_devices", "8", "--device_memory", "80GiB")
    big_decided, small_decided = memory_plan.decide(big), memory_plan.decide(small)
    assert not big_decided.critic_graph_kept and big_decided.critic_graph_refused  # the flags allow it: it does not fit
    assert small_decided.old_values_from_training is not None and small_decided.critic_graph_kept
    training = {p.name: p for p in memory_plan.plan_for(small, 3, decisions=small_decided).phases}["training"]
    assert (
        "critic activations (kept through the actor's update)" in training.parts
        and "actor activations" in training.parts
    )
    forced = _step3(
        "opt-1.3b", "--device", "cuda", "--num_devices", "8", "--device_memory", "80GiB", "--recompute_old_logprobs"
    )
    assert not memory_plan.decide(forced).critic_graph_kept and not memory_plan.decide(forced).critic_graph_refused
    apart = {p.name: p for p in memory_plan.plan_for(forced, 3).phases}["training"]
    assert training.total > apart.total  # both models' activations at once cost memory


def test_without_its_flags_opt_13b_does_not_fit_and_the_plan_names_a_fix():
    args = _step3("opt-13b", "--actor_zero_stage", "2", "--critic_zero_stage", "2", "--enable_hybrid_engine")
    plan = memory_plan.build(args, 3, "cuda", 8, 40 * GB)
    assert plan.fits is False
    fix = memory_plan.find_fix(args, plan)
    assert fix, memory_plan.render(plan)
    trial = _step3("opt-13b", "--actor_zero_stage", "2", "--critic_zero_stage", "2", "--enable_hybrid_engine",
                   *" ".join(fix).split())  # fmt: skip
    assert memory_plan.build(trial, 3, "cuda", 8, 40 * GB).fits


def test_tensor_parallel_generation_halves_the_layer_copy_and_the_cache():
    base = ["opt-13b", "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--enable_hybrid_engine"]
    one = {p.name: p.parts for p in memory_plan.build(_step3(*base), 3, "cuda", 8, None).phases}["generation"]
    two = {p.name: p.parts for p in memory_plan.build(_step3(*base, "--inference_tp_size", "2"), 3, "cuda", 8, None)
           .phases}["generation"]  # fmt: skip
    shape = memory_plan.model_shape(config("opt-13b"))
    assert one["inference copy"] - two["inference copy"] == pytest.approx(shape.layer_params * 2 / 2)
    assert two["KV cache"] == pytest.approx(one["KV cache"] / 2)


def test_checkpointing_lora_and_stages_lower_the_peak():
    def peak(*flags: str) -> float:
        args = _step1("--model_name_or_path", config("opt-1.3b"), "--dtype", "bf16", *flags)
        return memory_plan.build(args, 1, "cuda", 8, None).peak.total

    plain = peak()
    assert peak("--gradient_checkpointing") < plain
    assert peak("--zero_stage", "3") < peak("--zero_stage", "2") < peak("--zero_stage", "1") < plain
    assert peak("--lora_dim", "128", "--only_optimize_lora") < plain
    assert peak("--offload", "--zero_stage", "2") < peak("--zero_stage", "2")


# ---- the entry points ------------------------------------------------------------------------
def test_plan_entry_point_says_what_does_not_fit_and_the_fix(capsys):
    from training.plan import main

    argv = ["1", "--model_name_or_path", config("llama-2-7b"), "--device", "cuda", "--dtype", "bf16",
            "--num_devices", "1", "--device_memory", "80GiB"]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "add --" in out, out
    assert main([*argv[:-3], "8", "--device_memory", "80GiB", "--zero_stage", "3"]) == 0
    assert "fits: peak" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from training.step1_supervised_finetuning.main import main

    out = tmp_path / "actor"
    summary = main(["--model_name_or_path", config("opt-1.3b"), "--dry_run", "--device", "cpu",
                    "--output_dir", str(out), "--device_memory", "24GiB"])  # fmt: skip
    assert "training" in summary["phases"] and summary["peak_bytes"] > 20 * GB
    assert "memory plan, step 1" in capsys.readouterr().out
    assert not out.exists() and not list(tmp_path.iterdir())


def test_step3_dry_run_plans_tensor_parallel_generation(capsys):
    from training.step3_rlhf_finetuning.main import main

    summary = main(["--actor_model_name_or_path", config("opt-13b"), "--critic_model_name_or_path",
                    config("opt-350m"), "--dry_run", "--actor_zero_stage", "3", "--critic_zero_stage", "3",
                    "--enable_hybrid_engine", "--inference_tp_size", "2", "--num_devices", "8",
                    "--device_memory", "40GiB", "--dtype", "fp16"])  # fmt: skip
    assert set(summary["phases"]) >= {"generation", "experience", "training"}
    assert "inference copy" in summary["phases"]["generation"]
    assert "hybrid engine TP 2" in capsys.readouterr().out


def test_e2e_dry_run_plans_all_three_steps(tmp_path, capsys):
    from training.e2e_rlhf import main

    assert main(["--dry-run", "--output-dir", str(tmp_path / "out"), "--device-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert all(f"memory plan, step {n}" in out for n in (1, 2, 3)), out
    assert not (tmp_path / "out").exists()


def test_step_refuses_before_loading_weights_and_the_override_goes_on(tmp_path, capsys):
    from training.step1_supervised_finetuning.main import main

    model = tmp_path / "opt-66b"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "opt-66b" / "config.json").read_text())
    (model / "model.safetensors").write_bytes(b"not weights")  # reading it would fail differently
    argv = ["--model_name_or_path", str(model), "--device", "cpu", "--data_output_path", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    assert error.startswith("error: the memory plan says step 1 does not fit"), error
    assert "GiB" in error and "--skip_memory_check" in error
    with pytest.raises(SystemExit):
        main([*argv, "--skip_memory_check"])
    error = capsys.readouterr().err
    assert "memory plan" not in error and "tokenizer" in error, error


def test_unknown_device_memory_never_refuses():
    args = _step1("--model_name_or_path", config("opt-66b"), "--device", "cuda")
    plan = memory_plan.build(args, 1, "cuda", 1, None)
    assert plan.fits is None and "unknown" in memory_plan.verdict(plan)


def test_device_memory_sizes():
    assert memory_plan.parse_bytes("40GiB") == memory_plan.parse_bytes("40G") == 40 * GB
    assert memory_plan.parse_bytes("48GB") == 48e9
    from dschat_hal.errors import UserError

    with pytest.raises(UserError, match="--device_memory"):
        memory_plan.parse_bytes("lots")


def test_docs_table_is_the_plans_output():
    """The table rows of docs/memory-plan.md are what benchmarks/plan_table.py prints today."""
    from benchmarks.plan_table import estimator_rows, rows

    page = (ROOT / "docs" / "memory-plan.md").read_text()
    for row in rows() + estimator_rows():
        assert row in page, row


def test_bench_memory_runs_every_estimator_on_the_same_answers_per_device(tmp_path):
    """`bench_memory.py --estimators`: PPO's argv is the steps-1-3 table's; grpo generates batch / N
    prompts x N answers, remax batch prompts; the plan of each has the same generation rows and no critic."""
    import argparse

    from benchmarks.bench_memory import estimator_flags, step_argv

    bench = argparse.Namespace(dtype="bf16", zero_stage3=2, prompt=64, answer=64, batch=4, n_samples=2)
    actor = config("opt-1.3b")
    argvs = {e: step_argv(3, actor, config("opt-350m"), tmp_path, tmp_path, "small", bench, e) for e in ESTIMATORS}
    assert argvs["gae"] == step_argv(3, actor, config("opt-350m"), tmp_path, tmp_path, "small", bench)
    for estimator, argv in argvs.items():
        args = step3_parser().parse_args(argv)
        assert args.advantage_estimator == estimator
        assert args.per_device_generation_batch_size * args.n_samples_per_prompt == 4
        assert args.per_device_training_batch_size == 4
        assert args.n_samples_per_prompt == (2 if estimator in ("grpo", "rloo") else 1)
        notes = memory_plan.build(to_config(args, Step3Config), 3, "cpu", 1, None).notes[0]
        assert "generation 4 x 128" in notes and ("no critic" in notes) == (estimator != "gae")
    assert len({argv[argv.index("--output_dir") + 1] for argv in argvs.values()}) == len(argvs)
    with pytest.raises(SystemExit, match="error: --estimators grpo needs --n_samples N >= 2 dividing --batch 4"):
        estimator_flags("grpo", 4, 3)


def test_json_summary_is_serialisable():
    args = _step1("--model_name_or_path", config("opt-1.3b"), "--device", "cuda")
    json.dumps(memory_plan.summary(memory_plan.build(args, 1, "cuda", 1, 48 * GB)))


# ---- host memory shared by the CPU ranks of one host (issue #27) ----------------------------------
def _host_of(monkeypatch, size: int) -> None:
    """This host has `size` bytes available and the planning process holds nothing (no real RAM read)."""
    from accel.cpu import CpuAccelerator

    monkeypatch.setattr(CpuAccelerator, "available_memory", lambda self: size)
    monkeypatch.setattr(memory_plan, "_rss", lambda: 0)
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _cpu_step1(*flags: str) -> Step1Config:
    return _step1("--model_name_or_path", config("opt-1.3b"), "--device", "cpu", "--dtype", "bf16", *flags)


def test_cpu_ranks_on_one_host_each_plan_with_their_share_of_it(monkeypatch, capsys):
    peak = memory_plan.build(_cpu_step1(), 1, "cpu", 1, None).peak.total  # ZeRO 0: the same on every rank
    host = int(1.5 * peak / memory_plan.FIT_FRACTION)  # enough for one rank, not for two
    _host_of(monkeypatch, host)
    one = memory_plan.plan_for(_cpu_step1("--num_devices", "1"), 1)
    assert one.device_memory == host and one.fits
    two = memory_plan.plan_for(_cpu_step1("--num_devices", "2"), 1)
    assert two.device_memory == host // 2 and two.fits is False
    assert "host memory shared by the 2 ranks on this host" in memory_plan.render(two)
    # training/plan.py and a step's --dry_run say the same
    from training.plan import main as plan
    from training.step1_supervised_finetuning.main import main as step1

    argv = ["--model_name_or_path", config("opt-1.3b"), "--device", "cpu", "--dtype", "bf16", "--num_devices", "2"]
    assert plan(["1", *argv]) == 1
    assert f"2 rank(s) on cpu, {memory_plan._gib(host // 2)} each" in capsys.readouterr().out
    assert step1([*argv, "--dry_run"])["device_memory"] == host // 2
    # under a launcher with two ranks here (torchrun's LOCAL_WORLD_SIZE), without --num_devices
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory_plan.plan_for(_cpu_step1(), 1).device_memory == host // 2
    # --device_memory is the memory of one rank, as given
    assert memory_plan.plan_for(_cpu_step1("--device_memory", "3GiB"), 1).device_memory == 3 * GB


def test_rank_memory_divides_host_memory_only(monkeypatch):
    import accel

    backend = accel.get("cpu")
    monkeypatch.setattr(backend, "available_memory", lambda: 10 * GB)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert backend.memory_is_host_memory and backend.rank_memory() == 5 * GB and backend.rank_memory(4) == 10 * GB // 4
    monkeypatch.setattr(type(backend), "memory_is_host_memory", property(lambda self: False))  # a device's own memory
    assert backend.rank_memory() == backend.rank_memory(4) == 10 * GB


def _llama_config(tmp_path, kv_heads: int) -> str:
    from transformers import LlamaConfig

    path = tmp_path / f"llama-kv{kv_heads}"
    LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


def test_tensor_parallel_is_planned_as_the_engine_will_run_it(tmp_path, capsys):
    """One key/value head cannot be split over 2 ranks: the engine falls back to T = 1, and so does the plan."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dschat_hal.memory_plan.fixes import _candidates
    from dschat_hal.models.capabilities import tp_unsupported_reason

    def generation(actor: str, *flags: str) -> tuple[dict, memory_plan.Plan]:
        args = _step3_flags(
            "--actor_model_name_or_path", actor, "--critic_model_name_or_path", config("opt-350m"),
            "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--enable_hybrid_engine", "--dtype", "fp16",
            *flags,
        )  # fmt: skip
        plan = memory_plan.build(args, 3, "cuda", 2, None)
        return {p.name: p.parts for p in plan.phases}["generation"], plan

    mqa = _llama_config(tmp_path, 1)
    reason = tp_unsupported_reason(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(mqa)), 2)
    assert reason and "1 key/value heads" in reason  # the engine's refusal
    one, _ = generation(mqa)
    two, plan = generation(mqa, "--inference_tp_size", "2")
    assert two["inference copy"] == one["inference copy"] and two["KV cache"] == one["KV cache"]
    assert f"hybrid engine: --inference_tp_size 2 falls back to 1: {reason}" in plan.notes
    assert "TP 2" not in memory_plan.render(plan)
    args = _step3_flags("--actor_model_name_or_path", mqa, "--critic_model_name_or_path",
                        config("opt-350m"), "--enable_hybrid_engine", "--actor_zero_stage", "3")  # fmt: skip
    assert not any(flag.startswith("--inference_tp_size") for flag, _ in _candidates(args, 3, 8))
    # two key/value heads split: the cache halves, no note
    gqa = _llama_config(tmp_path, 2)
    one, _ = generation(gqa)
    two, plan = generation(gqa, "--inference_tp_size", "2")
    assert two["KV cache"] == pytest.approx(one["KV cache"] / 2) and not any("falls back" in n for n in plan.notes)
    # training/plan.py says so
    from training.plan import main as plan_main

    assert plan_main(["3", "--actor_model_name_or_path", mqa, "--critic_model_name_or_path", config("opt-350m"),
                      "--actor_zero_stage", "3", "--enable_hybrid_engine", "--inference_tp_size", "2",
                      "--device", "cuda", "--num_devices", "2"]) == 0  # fmt: skip
    assert "--inference_tp_size 2 falls back to 1: LlamaForCausalLM has 1 key/value heads" in capsys.readouterr().out


def test_device_memory_needs_a_positive_size_with_its_unit():
    from dschat_hal.errors import UserError

    assert memory_plan.parse_bytes("512MiB") == 512 * 2**20 and memory_plan.parse_bytes("80gb") == 80e9
    for text, problem in [("1.2.3GiB", "is not a size"), ("40", "has no unit"), ("0", "must be more than 0"),
                          ("0GiB", "must be more than 0"), ("-8GiB", "must be more than 0"), ("", "is not a size")]:  # fmt: skip
        with pytest.raises(UserError, match=problem) as refused:
            memory_plan.parse_bytes(text)
        assert "e.g. 24GiB, 80GB or 512MiB" in str(refused.value)
