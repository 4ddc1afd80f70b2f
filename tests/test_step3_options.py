"""Step 3's optional parts: EMA actor, ptx (unsupervised) loss, TensorBoard scalars, adaptive KL."""

from __future__ import annotations

import json
import math

from conftest import tiny_step3_argv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from training import plot_metrics
from training.step3_rlhf_finetuning.main import main as step3


def test_ema_ptx_tensorboard_and_adaptive_kl(e2e_output, tmp_path, capsys):
    text = tmp_path / "unsup.json"
    text.write_text(json.dumps([{"text": "Keep a regular bedtime and a cool dark room. " * 4}] * 40))
    result = step3(
        [
            *tiny_step3_argv(e2e_output, tmp_path),
            "--enable_ema",
            "--unsupervised_dataset_name",
            str(text),
            "--unsup_coef",
            "1.0",
            "--per_device_unsup_batch_size",
            "2",
            "--target_kl",
            "0.01",
            "--enable_tensorboard",
            "--tensorboard_path",
            str(tmp_path / "tb"),
            "--print_answers",
            "--enable_test_mode",
            "--test_stop_step",
            "3",
            "--output_dir",
            str(tmp_path / "rlhf"),
        ]
    )
    history = result["history"]
    reports = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[step3] epoch")]
    assert reports and all(" samples/s, generation " in line and " tokens/s, ETA " in line for line in reports)
    assert all(math.isfinite(h["unsup_loss"]) for h in history)
    assert history[-1]["kl_ctl"] != 0.1  # the adaptive controller moved the coefficient
    ema = AutoModelForCausalLM.from_pretrained(tmp_path / "rlhf" / "actor_ema")
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "rlhf" / "actor")
    ema_w, actor_w = ema.lm_head.weight, actor.lm_head.weight
    assert not ema_w.equal(actor_w)  # the EMA lags the actor
    events = EventAccumulator(str(tmp_path / "tb" / "step3"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in (
        "step3/reward",
        "step3/reward_ema",
        "step3/actor_loss",
        "step3/critic_loss",
        "step3/kl",
        "step3/answer_length",
        "step3/samples_per_s",  # issue #30: throughput, learning rates and ETA per step
        "step3/gen_tokens_per_s",
        "step3/actor_lr",
        "step3/critic_lr",
        "step3/eta_s",
    ):
        assert tag in tags
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 3 and all(math.isfinite(v) for v in values)
    png = tmp_path / "metrics.png"
    assert plot_metrics.main(["--logdir", str(tmp_path / "tb"), "--out", str(png)]) == 0
    assert all(h["gen_tokens_per_s"] > 0 and h["samples_per_s"] > 0 for h in history)
    assert history[-1]["eta_s"] == 0  # --test_stop_step 3: the last step
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
