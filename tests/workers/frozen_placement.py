"""One rank of a step-3 run under torchrun: `python frozen_placement.py OUT STEP3_FLAGS...`.

Writes OUT/rank{R}.json: whether the reference and reward models' parameters are ZeRO-3 partitioned
(`ds_id`), and the first experience's reference log-probs and rewards.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat_hal.rlhf import engine as rlhf_engine  # noqa: E402
from dschat_hal.rlhf import trainer as rlhf_trainer  # noqa: E402
from training.step3_rlhf_finetuning.main import main as step3  # noqa: E402


def main(out: Path, argv: list[str]) -> None:
    seen: dict = {}
    init, generate = rlhf_engine.RLHFEngine.__init__, rlhf_trainer.PPOTrainer.generate_experience

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen["partitioned"] = {
            name: any(hasattr(p, "ds_id") for p in getattr(self, name).module.parameters())
            for name in ("actor", "ref", "critic", "reward")
        }

    def recording_generate(self, *args, **kwargs):
        exp = generate(self, *args, **kwargs)
        if "first" not in seen:
            # the frozen models' outputs (old log-probs and values come from the training forwards)
            seen["first"] = {k: exp[k].float().tolist() for k in ("ref_logprobs", "raw_rewards")}
        return exp

    rlhf_engine.RLHFEngine.__init__ = recording_init
    rlhf_trainer.PPOTrainer.generate_experience = recording_generate
    step3(argv)
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
