"""Raw preference datasets: one small class per source, all exposing the same five accessors.

Hub names load through `datasets.load_dataset` (wherever a hub is reachable); `local/jsonfile`
is the bundled set; any other local directory or .json/.jsonl/.parquet file in the
prompt/chosen/rejected schema works the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dschat_hal.data.checks import check_data_file
from dschat_hal.errors import UserError
from dschat_hal.models.tiny import DATA_DIR

Row = dict[str, Any]
REQUIRED_KEYS = ("prompt", "chosen", "rejected")


class RawDataset:
    """Accessors over rows; `train` and `eval` are lists of rows."""

    name = ""

    def __init__(self, train: list[Row], eval: list[Row]) -> None:
        self.train, self.eval = train, eval

    def prompt(self, row: Row) -> str:
        return row["prompt"]

    def chosen(self, row: Row) -> str:
        return row["chosen"]

    def rejected(self, row: Row) -> str:
        return row["rejected"]

    def prompt_and_chosen(self, row: Row) -> str:
        return self.prompt(row) + self.chosen(row)

    def prompt_and_rejected(self, row: Row) -> str:
        return self.prompt(row) + self.rejected(row)


# ---- local files -------------------------------------------------------------------------------
def read_rows(path: Path, required: tuple[str, ...] = REQUIRED_KEYS) -> list[Row]:
    """Rows of a .json (list) / .jsonl / .parquet file, each checked for the required string keys."""
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    rows = check_data_file(path)
    if not isinstance(rows, list):
        raise UserError(f"{path} must hold a list of rows with keys {', '.join(required)}")
    for index, row in enumerate(rows):
        missing = [key for key in required if not isinstance(row, dict) or not isinstance(row.get(key), str)]
        if missing:
            raise UserError(f"{path}: row {index} has no string {missing[0]!r} (every row needs {', '.join(required)})")
    return rows


def split_files(directory: Path) -> tuple[Path, Path]:
    for suffix in (".json", ".jsonl", ".parquet"):
        train, evaluation = directory / f"train{suffix}", directory / f"eval{suffix}"
        if train.exists():
            return train, evaluation if evaluation.exists() else directory / f"test{suffix}"
    raise UserError(f"data directory {directory} has no train.json, train.jsonl or train.parquet")


class LocalDataset(RawDataset):
    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        self.name = f"local:{path}"
        if path.is_dir():
            train_file, eval_file = split_files(path)
            train = read_rows(train_file)
            evaluation = read_rows(eval_file) if eval_file.exists() else []
        else:
            train, evaluation = read_rows(path), []
        if not evaluation:  # carve a small eval set out of train, deterministically
            cut = max(1, len(train) // 10)
            train, evaluation = train[cut:], train[:cut]
        super().__init__(train, evaluation)


# ---- hub datasets ------------------------------------------------------------------------------
def _load_hub(name: str) -> tuple[list[Row], list[Row]]:
    try:
        import datasets

        ds = datasets.load_dataset(name)
    except Exception as err:  # offline, unknown name, or auth: one line either way
        raise UserError(
            f"cannot load dataset {name!r} from the hub ({str(err).splitlines()[0][:160]}); "
            "use a local path or local/jsonfile when no hub is reachable"
        ) from None
    eval_split = "test" if "test" in ds else ("validation" if "validation" in ds else None)
    train = list(ds["train"])
    evaluation = list(ds[eval_split]) if eval_split else []
    if not evaluation:
        cut = max(1, len(train) // 10)
        train, evaluation = train[cut:], train[:cut]
    return train, evaluation


class HubDataset(RawDataset):
    """Rows already in prompt/chosen/rejected form (Dahoas/rm-static, Dahoas/full-hh-rlhf, …)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(*_load_hub(name))


class SyntheticInstructGptjPairwise(HubDataset):
    def prompt(self, row: Row) -> str:
        return " Human: " + row["prompt"] + " Assistant:"

    def chosen(self, row: Row) -> str:
        return " " + row["chosen"]

    def rejected(self, row: Row) -> str:
        return " " + row["rejected"]


class YitingxieRlhfReward(HubDataset):
    def prompt(self, row: Row) -> str:
        return row["prompt"] + "Assistant:"

    def chosen(self, row: Row) -> str:
        return row["chosen"].split("Assistant:")[-1]

    def rejected(self, row: Row) -> str:
        return row["rejected"].split("Assistant:")[-1]


class WebGptComparisons(HubDataset):
    @staticmethod
    def _clean(text: str) -> str:
        return " " + re.sub(r" [\(\[].*?[\)\]]", "", text).replace("[", "").replace("]", "")

    def prompt(self, row: Row) -> str:
        return " Human: " + row["question"]["full_text"] + " Assistant:"

    def _pair(self, row: Row) -> tuple[str, str]:
        first, second = row["answer_0"], row["answer_1"]
        return (first, second) if float(row["score_0"]) >= float(row["score_1"]) else (second, first)

    def chosen(self, row: Row) -> str:
        return self._clean(self._pair(row)[0])

    def rejected(self, row: Row) -> str:
        return self._clean(self._pair(row)[1])


class StanfordSHP(HubDataset):
    def prompt(self, row: Row) -> str:
        return " Human: " + row["history"] + " Assistant:"

    def chosen(self, row: Row) -> str:
        return " " + (row["human_ref_A"] if int(row["labels"]) == 1 else row["human_ref_B"])

    def rejected(self, row: Row) -> str:
        return " " + (row["human_ref_B"] if int(row["labels"]) == 1 else row["human_ref_A"])


HUB_DATASETS: dict[str, type[HubDataset]] = {
    "Dahoas/rm-static": HubDataset,
    "Dahoas/full-hh-rlhf": HubDataset,
    "Dahoas/synthetic-instruct-gptj-pairwise": SyntheticInstructGptjPairwise,
    "yitingxie/rlhf-reward-datasets": YitingxieRlhfReward,
    "openai/webgpt_comparisons": WebGptComparisons,
    "stanfordnlp/SHP": StanfordSHP,
}


def get_raw_dataset(name_or_path: str) -> RawDataset:
    """Resolve a registry name, `local/jsonfile`, or an existing local path."""
    if name_or_path == "local/jsonfile":
        return LocalDataset(DATA_DIR)
    if name_or_path in HUB_DATASETS:
        return HUB_DATASETS[name_or_path](name_or_path)
    if Path(name_or_path).expanduser().exists():
        return LocalDataset(name_or_path)
    known = ", ".join(["local/jsonfile", *HUB_DATASETS])
    raise UserError(f"--data_path {name_or_path!r} is neither a known dataset ({known}) nor an existing path")
