"""--resume across epoch boundaries (issue #27): a run stopped by --max_steps at an epoch's last
batch, one batch into the next epoch, or mid-epoch, then resumed, gives the uninterrupted run's
losses and final weights, in steps 1, 2 and 3 (step 3 also with a ptx loader shorter than the
prompts, which ends its epochs).

Each epoch creates new data iterators, and creating one draws a seed from the global RNG: a
checkpoint taken after an epoch's last batch must restore the RNG before that draw, not after it.
Dropout (steps 1 and 2) and sampling (step 3) make any RNG difference show in the losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_rlhf_models, tiny_step1_argv
from safetensors.torch import load_file

from training.step1_supervised_finetuning.main import main as step1
from training.step2_reward_model_finetuning.main import main as step2
from training.step3_rlhf_finetuning.main import main as step3

BATCHES = 3  # per epoch in every run below: 24 rows (steps 1 and 2, batches of 8), 12 prompts (step 3, of 4)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under `directory`, keyed by file and name."""
    return {
        f"{path.relative_to(directory)}:{key}": value
        for path in sorted(directory.rglob("*.safetensors"))
        for key, value in load_file(path).items()
    }


def assert_same_weights(reference: Path, resumed: Path) -> None:
    left, right = weights(reference), weights(resumed)
    assert left and left.keys() == right.keys()
    assert all(torch.allclose(left[k], right[k], atol=1e-6) for k in left), [
        k for k in left if not torch.allclose(left[k], right[k], atol=1e-6)
    ]


def interrupted_then_resumed(main, args: list[str], out: Path, stop: int) -> dict:
    """Run to `--max_steps stop` (saving every step), then `--resume` to the end; the resumed run's result."""
    first = main([*args, "--output_dir", str(out), "--max_steps", str(stop)])
    assert first["output_dir"] == str(out)
    return main([*args, "--output_dir", str(out), "--resume"])


# ---- steps 1 and 2 ---------------------------------------------------------------------------
def supervised_args(tmp: Path) -> list[str]:
    return tiny_step1_argv(
        tmp, "--data_split", "6,6,88", "--num_train_epochs", "2", "--dtype", "fp32", "--dropout", "0.1",
        "--seed", "4", "--learning_rate", "2e-3", "--print_loss", "--save_interval", "1", "--quiet",
    )  # fmt: skip


@pytest.fixture(scope="module")
def supervised_reference(tmp_path_factory) -> dict:
    """The uninterrupted runs of steps 1 and 2: {step: (losses, output directory)}."""
    tmp = tmp_path_factory.mktemp("reference12")
    runs = {}
    for name, main in (("step1", step1), ("step2", step2)):
        out = tmp / name
        losses = main([*supervised_args(tmp), "--output_dir", str(out)])["losses"]
        assert len(losses) == 2 * BATCHES, "the data no longer gives 3 batches per epoch: adjust --data_split"
        runs[name] = losses, out
    return runs


@pytest.mark.parametrize(
    ("name", "stop"),
    [
        ("step1", BATCHES),  # at the first epoch's last batch: the next epoch's iterator not yet made
        ("step1", BATCHES + 1),  # one batch into the second epoch
        ("step1", BATCHES - 1),  # mid-epoch
        ("step2", BATCHES),
        ("step2", BATCHES + 1),
    ],
)
def test_supervised_resume_across_epochs_is_exact(name, stop, supervised_reference, tmp_path):
    main = {"step1": step1, "step2": step2}[name]
    losses, reference = supervised_reference[name]
    resumed = interrupted_then_resumed(main, supervised_args(tmp_path), tmp_path / "run", stop)
    assert resumed["losses"] == pytest.approx(losses[stop:], abs=1e-5)
    assert_same_weights(reference, tmp_path / "run")


# ---- step 3 ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def step3_setup(tmp_path_factory) -> Path:
    """A tiny actor and reward model (random weights) and a ptx text of 7 blocks (2 batches of 4)."""
    root = save_tiny_rlhf_models(tmp_path_factory.mktemp("models3"))
    lines = [f"the quick brown fox jumps over the lazy dog, line {i}." for i in range(15)]
    (root / "ptx.txt").write_text("\n".join(lines) + "\n")
    return root


def step3_args(models: Path, tmp: Path, ptx: bool) -> list[str]:
    return [
        "--device", "cpu", "--dtype", "fp32", "--data_output_path", str(tmp / "cache"), "--seed", "9",
        "--data_split", "97,0,3", "--num_train_epochs", "2",
        "--actor_model_name_or_path", str(models / "actor"), "--critic_model_name_or_path", str(models / "reward"),
        "--max_prompt_seq_len", "48", "--max_answer_seq_len", "8", "--per_device_generation_batch_size", "4",
        "--per_device_training_batch_size", "4", "--save_interval", "1", "--quiet",
        *(["--unsupervised_dataset_name", str(models / "ptx.txt"), "--unsup_coef", "0.5"] if ptx else []),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def step3_reference(step3_setup, tmp_path_factory):
    """The uninterrupted step-3 run of a data setup (with or without ptx), made once: (history, output)."""
    runs = {}

    def reference(ptx: bool) -> tuple[list[dict], Path]:
        if ptx not in runs:
            tmp = tmp_path_factory.mktemp(f"reference3_ptx{ptx}")
            history = step3([*step3_args(step3_setup, tmp, ptx), "--output_dir", str(tmp / "full")])["history"]
            runs[ptx] = history, tmp / "full"
        return runs[ptx]

    return reference


@pytest.mark.parametrize(
    ("ptx", "stop"),
    [
        (False, BATCHES),  # at the first epoch's last prompt batch
        (False, BATCHES + 1),  # one batch into the second epoch
        (True, 2),  # the ptx loader (2 batches) ends each epoch before the prompts (3 batches) do
    ],
)
def test_step3_resume_across_epochs_is_exact(ptx, stop, step3_setup, step3_reference, tmp_path):
    full, reference = step3_reference(ptx)
    assert len(full) == 2 * (2 if ptx else BATCHES), "the data no longer gives the planned batches per epoch"
    resumed = interrupted_then_resumed(step3, step3_args(step3_setup, tmp_path, ptx), tmp_path / "run", stop)
    history = resumed["history"]
    assert len(history) == len(full) - stop
    for key in ("reward", "actor_loss", "critic_loss"):
        assert [r[key] for r in history] == pytest.approx([r[key] for r in full[stop:]], abs=1e-5), key
    assert_same_weights(reference, tmp_path / "run")
