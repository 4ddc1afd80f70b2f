"""Raw preference datasets: one small class per source schema, all exposing the same five accessors.

Every source goes through `datasets`: hub names through `datasets.load_dataset(name)` (wherever a hub
is reachable), local data the way `load_dataset` resolves a directory: split names from file names
(train / test|eval / validation, sharded `train-00000-of-00002.parquet`, a hub snapshot root or its
`data/` folder) or from a dataset card's `configs:`, json/jsonl/parquet/csv/arrow files, and
directories written by `save_to_disk`.
`local/jsonfile` is the bundled set. Splits stay Arrow tables (memory-mapped), never Python lists.

Unregistered data is read by its columns (renamed by `--prompt_key/--chosen_key/--rejected_key`):
prompt/chosen/rejected, TRL's prompt/completion and `text` (step 1 only: no rejected answer), and
TRL's conversational formats (`messages`, or prompt/chosen/rejected as message lists, rendered with
the tokenizer's chat template). Chosen/rejected without a prompt column (TRL's implicit prompt) hold
the prompt as the start both share (`split_implicit_prompt`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from dschat_hal.data.checks import check_readable, check_utf8
from dschat_hal.data.json_array import array_to_lines, is_json_array
from dschat_hal.errors import UserError
from dschat_hal.faults import is_disk_full
from dschat_hal.models.tiny import DATA_DIR

log = logging.getLogger(__name__)
Row = dict[str, Any]
REQUIRED_KEYS = ("prompt", "chosen", "rejected")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
EVAL_SPLITS = ("test", "validation", "eval", "valid", "dev")


class RawDataset:
    """Accessors over rows of `train` and `eval` (Arrow-backed `datasets.Dataset`s).

    `columns` are the string columns a source of this schema must have; `files` are the data
    files actually read (empty for hub names): the cache key fingerprints exactly these.
    """

    name = ""
    columns: tuple[str, ...] = REQUIRED_KEYS
    text_columns: tuple[str, ...] = REQUIRED_KEYS
    conversational = False  # rows are message lists, rendered with the chat template

    def __init__(self, train, eval, files: tuple[str, ...] = (), keys: dict[str, str] | None = None) -> None:
        self.train, self.eval, self.files = train, eval, files
        self.keys = dict(zip(REQUIRED_KEYS, REQUIRED_KEYS, strict=True)) if keys is None else keys

    @property
    def has_rejected(self) -> bool:
        """Whether rows hold a rejected answer (step-1 data such as prompt/completion does not)."""
        return "rejected" in self.keys

    @property
    def implicit_prompt(self) -> bool:
        """Chosen and rejected without a prompt column: each holds the prompt (TRL's implicit prompt)."""
        return "prompt" not in self.keys and "rejected" in self.keys

    def _split(self, row: Row) -> tuple[Any, Any, Any]:
        return split_implicit_prompt(row[self.keys["chosen"]], row[self.keys["rejected"]])

    def prompt(self, row: Row) -> str:
        if "prompt" in self.keys:
            return row[self.keys["prompt"]]
        return self._split(row)[0] if self.implicit_prompt else ""

    def chosen(self, row: Row) -> str:
        return self._split(row)[1] if self.implicit_prompt else row[self.keys["chosen"]]

    def rejected(self, row: Row) -> str:
        return self._split(row)[2] if self.implicit_prompt else row[self.keys["rejected"]]

    def prompt_and_chosen(self, row: Row) -> str:
        return self.prompt(row) + self.chosen(row)

    def prompt_and_rejected(self, row: Row) -> str:
        return self.prompt(row) + self.rejected(row)


Messages = list[dict[str, str]]


class Conversations(RawDataset):
    """TRL's conversational formats: prompt and answers as lists of {role, content} messages; without
    a prompt column, chosen/rejected conversations share their prompt's turns (`split_implicit_prompt`),
    and a single `messages` conversation's turns before the last are its prompt."""

    conversational = True

    def prompt(self, row: Row) -> Messages:
        if "prompt" in self.keys or self.implicit_prompt:
            return super().prompt(row)
        return row[self.keys["chosen"]][:-1]

    def chosen(self, row: Row) -> Messages:
        if "prompt" in self.keys or self.implicit_prompt:
            return super().chosen(row)
        return row[self.keys["chosen"]][-1:]


# Where an assistant's turn starts in text: DeepSpeed-Chat's marker, ChatML, Llama 3, Llama 2, Phi-3.
ANSWER_STARTS = re.compile(
    r"Assistant:|<\|im_start\|>assistant\n|<\|start_header_id\|>assistant<\|end_header_id\|>\n*|\[/INST\]|<\|assistant\|>\n?"
)


def _prompt_end(chosen: str, rejected: str) -> int:
    """Where the prompt of two texts that share it ends: after the last answer marker (`ANSWER_STARTS`)
    in their common prefix; without one, at the word where they part (TRL's `extract_prompt` cuts at the
    first different character, mid-word), the whitespace before it going to the answers."""
    end = len(os.path.commonprefix([chosen, rejected]))
    markers = list(ANSWER_STARTS.finditer(chosen, 0, end))
    if markers:
        return markers[-1].end()
    parted_mid_word = (
        end > 0 and chosen[end - 1].isalnum() and any(end < len(t) and t[end].isalnum() for t in (chosen, rejected))
    )
    if parted_mid_word:
        end = max((m.start() for m in re.finditer(r"\s", chosen[:end])), default=0)
    while end > 0 and chosen[end - 1].isspace():
        end -= 1
    return end


def split_implicit_prompt(chosen: str | Messages, rejected: str | Messages) -> tuple[Any, Any, Any]:
    """(prompt, chosen answer, rejected answer) of a preference pair whose prompt is implicit, held by
    both (TRL's "preference with implicit prompt" data, its `extract_prompt`): for conversations the
    leading messages both share, up to their last turn that is not the assistant's, leaving each at
    least one message of answer; for text the common start up to the answer's turn (`_prompt_end`)."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        end = _prompt_end(chosen, rejected)
        return chosen[:end], chosen[end:], rejected[end:]
    shared, limit = 0, min(len(chosen), len(rejected)) - 1
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1].get("role") == "assistant":
        shared -= 1
    return list(chosen[:shared]), list(chosen[shared:]), list(rejected[shared:])


def as_text(value: str | Messages) -> str:
    """A text, or the contents of a message list joined (to see whether there is any text)."""
    return value if isinstance(value, str) else "\n".join(m.get("content") or "" for m in value)


def is_messages(feature: Any) -> bool:
    """Whether an Arrow column feature is a list of {role, content} structs (a conversation)."""
    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    return isinstance(inner, dict) and {"role", "content"} <= set(inner)


# ---- resolving local data the way `datasets.load_dataset` does -----------------------------------
def _first_line(err: BaseException) -> str:
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:  # datasets wraps the real error
        cause = cause.__cause__ or cause.__context__
    text = (str(cause) or type(cause).__name__).strip().splitlines()
    return (text[0] if text else type(cause).__name__)[:200]


def split_of(path: Path) -> str:
    """The split a data file's name means: train, test (also eval/evaluation) or validation."""
    name = path.name.lower()
    for split, words in (
        ("validation", ("validation", "valid", "val", "dev")),
        ("test", ("test", "testing", "eval", "evaluation")),
        ("train", ("train", "training")),
    ):
        if any(re.search(rf"(^|[-._ ]){word}([-._ 0-9]|$)", name) for word in words):
            return split
    return "train"


def data_files_of(paths: list[Path]) -> dict[str, list[str]]:
    """Files grouped by split (named by the file names); files in no named split are train."""
    files: dict[str, list[str]] = {}
    for path in sorted(paths):
        files.setdefault(split_of(path), []).append(str(path))
    return files


def _raise_for_folder_named_as_file(directory: Path) -> None:
    """One line when what looks like a data file (train.json/) is a folder (error path only)."""
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and p.suffix in BUILDERS)
    if folders:
        raise UserError(f"data file {folders[0]} is a directory; pass a .json, .jsonl or .parquet file")


def card_patterns(directory: Path) -> dict[str, list[str]] | None:
    """The data-file patterns of the default config in a dataset card's YAML (`configs:` in
    README.md or .huggingface.yaml, as a hub snapshot has them); None without one."""
    from datasets.data_files import sanitize_patterns
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    readme, standalone = directory / "README.md", directory / ".huggingface.yaml"
    if not readme.is_file() and not standalone.is_file():
        return None
    try:
        card = DatasetCard.load(readme).data.to_dict() if readme.is_file() else {}
        if standalone.is_file():
            import yaml

            card.update(yaml.safe_load(standalone.read_text(encoding="utf-8")) or {})
        configs = MetadataConfigs.from_dataset_card_data(DatasetCardData(**card))
        name = configs.get_default_config_name() or next(iter(configs), None)
    except Exception as err:  # a card that does not parse: the file names still say the splits
        log.warning("warning: ignoring the dataset card in %s (%s)", directory, _first_line(err))
        return None
    if name is None or "data_files" not in configs[name]:
        return None
    return sanitize_patterns(configs[name]["data_files"])


def _directory_files(directory: Path) -> dict[str, list[str]]:
    from datasets.data_files import DataFilesDict, get_data_patterns

    card = card_patterns(directory)
    try:
        resolved = DataFilesDict.from_patterns(card or get_data_patterns(str(directory)), base_path=str(directory))
        if card and not all(resolved.values()):
            missing = ", ".join(p for split, found in resolved.items() if not found for p in card[split])
            raise FileNotFoundError(f"nothing matches {missing}")
    except Exception as err:  # empty directory, nothing matching
        if card:
            raise UserError(
                f"the dataset card of {directory} (configs: in README.md) names data files that do not exist "
                f"({_first_line(err)}); fix its data_files paths or download the files it names"
            ) from None
        _raise_for_folder_named_as_file(directory)
        held = "is empty" if not any(directory.iterdir()) else "holds no data files"
        raise UserError(
            f"data directory {directory} {held}; put train/test "
            f"files ({', '.join(sorted(set(BUILDERS)))}) or a save_to_disk dataset there"
        ) from None
    files = {str(split): [f for f in found if Path(f).suffix in BUILDERS] for split, found in resolved.items()}
    return {split: found for split, found in files.items() if found}


def _builder(files: dict[str, list[str]], where: str) -> str:
    kinds = {BUILDERS.get(Path(f).suffix) for found in files.values() for f in found}
    if None in kinds or len(kinds) != 1:
        suffixes = sorted({Path(f).suffix or "(none)" for found in files.values() for f in found})
        raise UserError(
            f"{where}: data files of one dataset must share one format ({', '.join(sorted(set(BUILDERS)))}); "
            f"found {', '.join(suffixes)}"
        )
    return kinds.pop()


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def resolve_local(sources: list[Path]) -> dict[str, list[str]] | None:
    """The data files of a local dataset by split; None for a `save_to_disk` directory."""
    where = ", ".join(str(p) for p in sources)
    for path in sources:
        if not path.exists():
            raise UserError(f"data path {path} does not exist")
    if len(sources) == 1 and _is_saved_dataset(sources[0]):
        return None
    if len(sources) == 1 and sources[0].is_dir():
        files = _directory_files(sources[0])
    elif any(p.is_dir() for p in sources):
        raise UserError(f"--data_path {where}: give one directory, or data files, per dataset")
    else:
        files = data_files_of(sources)
    if not files:
        if sources[0].is_dir():
            _raise_for_folder_named_as_file(sources[0])
        raise UserError(f"data directory {where} holds no {', '.join(sorted(set(BUILDERS)))} files")
    return files


def local_entries(source: str | list[str]) -> list[Path] | None:
    """The local paths of a `--data_path` group (`local/jsonfile` is the bundled set); None for a name."""
    entries = [source] if isinstance(source, str) else list(source)
    if entries == ["local/jsonfile"]:
        return [DATA_DIR]
    paths = [Path(e).expanduser() for e in entries]
    if all(p.exists() for p in paths):
        return paths
    if len(entries) == 1 and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", entries[0]) and paths[0].suffix not in BUILDERS:
        return None  # a name for `datasets.load_dataset`: registered, on a hub, or in its cache
    missing = next(e for e, p in zip(entries, paths, strict=True) if not p.exists())
    raise UserError(
        f"--data_path {missing!r} is neither a known dataset nor an existing path; check the path "
        "(a dataset name, owner/name, is given on its own)"
    )


def source_files(source: str | list[str]) -> tuple[str, ...]:
    """The files a dataset is read from (what its cache key fingerprints); () for hub names."""
    paths = local_entries(source)
    if paths is None:
        return ()
    files = resolve_local(paths)
    if files is None:
        return tuple(sorted(str(p) for p in paths[0].rglob("*") if p.is_file()))
    return tuple(f for found in files.values() for f in found)


def _raise_for_bad_json(files: list[str]) -> None:
    """Name the first file that is not valid JSON / JSON lines, with the line (error path only)."""
    for name in files:
        text = Path(name).read_text(encoding="utf-8")
        whole = not name.endswith(".jsonl") and text.lstrip().startswith("[")
        for offset, chunk in [(0, text)] if whole else enumerate(text.splitlines()):
            try:
                if chunk.strip():
                    json.loads(chunk)
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{name} is not valid JSON (line {offset + err.lineno}, column {err.colno}: {err.msg}); "
                    "fix the file or regenerate it"
                ) from None


def _holds_no_rows(name: str) -> bool:
    """Whether a (small) text data file is blank or an empty JSON array; large files are not read."""
    size = os.stat(name).st_size
    if size == 0 or size > 4096 or Path(name).suffix not in (".json", ".jsonl", ".csv"):
        return size == 0
    return Path(name).read_text(encoding="utf-8", errors="replace").strip(" \ufeff\t\r\n") in ("", "[]")


def _raise_for_no_rows(files: dict[str, list[str]], readable: dict[str, list[str]]) -> None:
    """One line when the train split, or one data file, holds no rows (error path only)."""
    empty = {
        original
        for split, found in files.items()
        for original, read in zip(found, readable.get(split, found), strict=True)
        if _holds_no_rows(original) or _holds_no_rows(read)
    }
    if files.get("train") and empty.issuperset(files["train"]):
        raise UserError(
            f"the dataset is too small: 0 training rows ({', '.join(files['train'])} holds no rows); add rows"
        )
    if empty:
        raise UserError(f"data file {sorted(empty)[0]} holds no rows; add rows or remove the file")


def _raise_for_bad_parquet(files: list[str]) -> None:
    """Name the first parquet file whose footer cannot be read (error path only; reads metadata)."""
    import pyarrow.parquet as pq

    for name in files:
        try:
            pq.ParquetFile(name).close()
        except Exception as err:
            raise UserError(f"{name} is not a readable parquet file ({_first_line(err)}); regenerate it") from None


def _as_json_lines(files: dict[str, list[str]], directory: Path) -> dict[str, list[str]]:
    """The files with each JSON-array file swapped for a JSON-lines copy in `directory` (kept by
    path, size and mtime, so a later run reuses it)."""
    converted: dict[str, list[str]] = {}
    for split, found in files.items():
        converted[split] = []
        for name in found:
            path = Path(name)
            if is_json_array(path):
                stat = path.stat()
                tag = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]
                lines = directory / f"{path.stem}-{tag}.jsonl"
                if lines.exists() or array_to_lines(path, lines):
                    name = str(lines)
            converted[split].append(name)
    return converted


def read_options(builder: str) -> dict[str, Any]:
    """`datasets` builder options that keep reading's memory flat (benchmarks/RESULTS_data.md): JSON lines
    parsed 1 MB at a time (the 10 MB default held 80-110 MB more reading a 158 MB file), parquet read
    without pre-buffering whole row groups (75 MB more for a 75 MB file)."""
    if builder == "json":
        return {"chunksize": 1 << 20}
    if builder == "parquet":
        import pyarrow.dataset as pds

        return {"fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False)}
    return {}


def load_splits(sources: list[Path], cache_dir: str | None = None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """{split: datasets.Dataset} of local data, and the data files read."""
    import datasets

    where = ", ".join(str(p) for p in sources)
    files = resolve_local(sources)
    if files is None:
        try:
            loaded = datasets.load_from_disk(str(sources[0]))
        except Exception as err:
            raise UserError(f"cannot read the saved dataset {where} ({_first_line(err)})") from None
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return splits, tuple(sorted(str(p) for p in sources[0].rglob("*") if p.is_file()))
    builder = _builder(files, where)
    every = [f for found in files.values() for f in found]
    for name in every:
        check_readable(Path(name))
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # our one error line replaces datasets' own error log
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # "Generating train split" bars would share the error's line
    scratch = None if cache_dir else tempfile.TemporaryDirectory(prefix="dschat_json_lines_")
    readable = files
    try:
        if builder == "json":
            readable = _as_json_lines(files, Path(cache_dir) / "json_lines" if cache_dir else Path(scratch.name))
        loaded = datasets.load_dataset(builder, data_files=readable, cache_dir=cache_dir, **read_options(builder))
    except Exception as err:  # malformed JSON, not UTF-8, no rows, a corrupt parquet file, mismatched shards
        if cache_dir and is_disk_full(err, cache_dir):
            raise  # the data cache's disk, not the data: said by the cache's writer
        if builder in ("json", "csv"):
            for name in every:
                check_utf8(Path(name))
            _raise_for_no_rows(files, readable)
        if builder == "json":
            _raise_for_bad_json(every)
        if builder == "parquet":
            _raise_for_bad_parquet(every)
        raise UserError(
            f"cannot read {where} as {builder} data ({_first_line(err)}); fix or regenerate the file"
        ) from None
    finally:
        quiet.setLevel(level)
        if bars:
            datasets.utils.enable_progress_bars()
        if scratch is not None:
            scratch.cleanup()
    return dict(loaded), tuple(f for found in files.values() for f in found)


def eval_split_name(splits: dict[str, Any]) -> str | None:
    return next((name for name in EVAL_SPLITS if name in splits), None)


def train_and_eval(splits: dict[str, Any], where: str, saved: bool = False) -> tuple[Any, Any]:
    """The train split and the test/validation split; without one, the first tenth of train (fixed).
    `saved`: the splits come from a `save_to_disk` DatasetDict (named by its keys, not file names)."""
    if "train" not in splits:
        fix = (
            "save it with a 'train' key (DatasetDict({'train': ...}).save_to_disk)" if saved else "name a file train.*"
        )
        raise UserError(f"{where} has no train split (splits: {', '.join(splits) or 'none'}); {fix}")
    train, eval_name = splits["train"], eval_split_name(splits)
    if eval_name is not None and len(splits[eval_name]):
        return train, splits[eval_name]
    cut = max(1, len(train) // 10)
    if cut >= len(train):  # a single row: it is both
        return train, train
    return train.select(range(cut, len(train))), train.select(range(cut))


def check_columns(schema: type[RawDataset], dataset, where: str, keys: dict[str, str] | None = None) -> None:
    """One line naming what is missing: absent columns, non-string columns, or empty (null) values.
    `keys`: the columns read (a generic schema's role -> column), in place of `schema.columns`."""
    present = dataset.column_names
    columns = tuple(keys.values()) if keys is not None else schema.columns
    missing = [c for c in columns if c not in present]
    if missing:
        others = "; ".join(f"{', '.join(s.columns)}" for s in LOCAL_SCHEMAS if s is not schema)
        raise UserError(
            f"{where} has columns {', '.join(present) or '(none)'} but needs {', '.join(columns)} "
            f"(other accepted schemas: {others}); rename the columns, map them with {KEY_FLAGS}, "
            "or convert the data"
        )
    for column in columns:
        if keys is None and column not in schema.text_columns:
            continue
        if schema.conversational:
            if not is_messages(dataset.features[column]):
                raise UserError(
                    f"{where}: column {column!r} holds {dataset.features[column]}, not a list of "
                    "{role, content} messages as the other conversational columns; give every column as messages"
                )
            continue
        dtype = getattr(dataset.features[column], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise UserError(f"{where}: column {column!r} holds {dtype or 'non-text'} values, not strings")
        values = dataset.data.column(column)
        if values.null_count:
            import pyarrow.compute as pc

            first = pc.index(pc.is_null(values), True).as_py()
            raise UserError(
                f"{where}: row {first} has no string {column!r} ({values.null_count} such rows); "
                f"every row needs {', '.join(columns if keys is not None else schema.text_columns)}"
            )


# ---- schemas of the registered sources --------------------------------------------------------
class SyntheticInstructGptjPairwise(RawDataset):
    def prompt(self, row: Row) -> str:
        return " Human: " + row["prompt"] + " Assistant:"

    def chosen(self, row: Row) -> str:
        return " " + row["chosen"]

    def rejected(self, row: Row) -> str:
        return " " + row["rejected"]


class YitingxieRlhfReward(RawDataset):
    def prompt(self, row: Row) -> str:
        return row["prompt"] + "Assistant:"

    def chosen(self, row: Row) -> str:
        return row["chosen"].split("Assistant:")[-1]

    def rejected(self, row: Row) -> str:
        return row["rejected"].split("Assistant:")[-1]


class WebGptComparisons(RawDataset):
    columns = ("question", "answer_0", "answer_1", "score_0", "score_1")
    text_columns = ("answer_0", "answer_1")

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


class StanfordSHP(RawDataset):
    columns = ("history", "human_ref_A", "human_ref_B", "labels")
    text_columns = ("history", "human_ref_A", "human_ref_B")

    def prompt(self, row: Row) -> str:
        return " Human: " + row["history"] + " Assistant:"

    def chosen(self, row: Row) -> str:
        return " " + (row["human_ref_A"] if int(row["labels"]) == 1 else row["human_ref_B"])

    def rejected(self, row: Row) -> str:
        return " " + (row["human_ref_B"] if int(row["labels"]) == 1 else row["human_ref_A"])


HUB_DATASETS: dict[str, type[RawDataset]] = {
    "Dahoas/rm-static": RawDataset,
    "Dahoas/full-hh-rlhf": RawDataset,
    "Dahoas/synthetic-instruct-gptj-pairwise": SyntheticInstructGptjPairwise,
    "yitingxie/rlhf-reward-datasets": YitingxieRlhfReward,
    "openai/webgpt_comparisons": WebGptComparisons,
    "stanfordnlp/SHP": StanfordSHP,
}
# Local data is matched to a schema by a registry name in its path (a snapshot keeps it), else by columns.
LOCAL_SCHEMAS: tuple[type[RawDataset], ...] = (RawDataset, WebGptComparisons, StanfordSHP)


KEY_FLAGS = "--prompt_key/--chosen_key/--rejected_key"
ANSWER_COLUMNS = ("chosen", "completion", "response", "text")


def schema_for(sources: list[Path], columns: list[str]) -> type[RawDataset]:
    text = "/".join(str(p.resolve()) for p in sources)
    for name, schema in HUB_DATASETS.items():
        if name.replace("/", "--") in text or f"/{name}" in text:
            return schema
    return next((s for s in LOCAL_SCHEMAS if all(c in columns for c in s.columns)), RawDataset)


def generic_schema(features: dict[str, Any], keys: dict[str, str], where: str) -> tuple[type[RawDataset], dict]:
    """(schema, role -> column) of data read by its columns: `keys` (from the --*_key flags) first,
    then prompt, chosen (or TRL's completion, response, text), rejected; a `messages` column is a
    conversation whose last turn is the answer. One line naming the columns found otherwise."""
    found = ", ".join(features) or "(none)"
    for role, column in keys.items():
        if column not in features:
            raise UserError(
                f"{where}: --{role}_key {column!r} names no column; its columns are {found}; "
                "pass the name of one of them"
            )
    mapped = dict(keys)
    if "chosen" not in mapped:
        answer = next((c for c in ANSWER_COLUMNS if c in features), None)
        if answer is None and "messages" in features and is_messages(features["messages"]):
            answer = "messages"
        if answer is not None:
            mapped["chosen"] = answer
    for role in ("prompt", "rejected"):
        if role not in mapped and role in features and mapped.get("chosen") != "messages":
            mapped[role] = role
    if "chosen" not in mapped:
        raise UserError(
            f"{where} has columns {found}, none of which this project reads; map them with --prompt_key COLUMN "
            "--chosen_key COLUMN (and --rejected_key COLUMN for step 2), or name them prompt/chosen/rejected, "
            "prompt/completion, messages or text"
        )
    conversational = is_messages(features[mapped["chosen"]])
    if conversational and "prompt" not in mapped and "rejected" not in mapped:
        mapped = {"chosen": mapped["chosen"]}  # one conversation: its last turn is the answer
    if "prompt" not in mapped and "rejected" in mapped:
        log.info(
            "%s: no prompt column: the prompt is the start that %s and %s share (TRL's implicit prompt; "
            "--prompt_key COLUMN names a prompt column)",
            where,
            mapped["chosen"],
            mapped["rejected"],
        )
    return (Conversations if conversational else RawDataset), {r: mapped[r] for r in REQUIRED_KEYS if r in mapped}


def _from_splits(
    schema: type[RawDataset] | None,
    name: str,
    splits: dict,
    files: tuple[str, ...],
    saved: bool = False,
    keys: dict[str, str] | None = None,
) -> RawDataset:
    """The raw dataset of loaded splits; `schema` None: read by columns (`generic_schema`)."""
    columns = None
    if schema is None:
        first = splits["train"] if "train" in splits else next(iter(splits.values()), None)
        features = dict(first.features) if first is not None else {}
        schema, columns = generic_schema(features, keys or {}, name)
    for split, dataset in splits.items():
        check_columns(schema, dataset, f"{name} ({split} split)", columns)
    train, evaluation = train_and_eval(splits, name, saved)
    raw = schema(train, evaluation, files, columns)
    raw.name = name
    return raw


def _load_hub(name: str, cache_dir: str | None) -> dict:
    """The splits `datasets.load_dataset(name)` gives: a registered name, any hub name, or whatever
    else it resolves (a hub cache when offline)."""
    try:
        import datasets

        return dict(datasets.load_dataset(name, cache_dir=cache_dir))
    except Exception as err:  # offline, unknown name, or auth: one line either way
        if name in HUB_DATASETS:
            raise UserError(
                f"cannot load dataset {name!r} from the hub ({_first_line(err)[:160]}); "
                "use a local path or local/jsonfile when no hub is reachable"
            ) from None
        raise UserError(
            f"--data_path {name!r} is neither a known dataset nor an existing path, and datasets.load_dataset "
            f"cannot load it ({_first_line(err)[:160]}); check the name, or pass a local path"
        ) from None


def group_sources(data_path: list[str]) -> list[list[str]]:
    """`--data_path` entries as datasets: data files of one folder and format (train + test files,
    shards) form one dataset; each directory or name is a dataset of its own."""
    groups: list[list[str]] = []
    by_folder: dict[tuple[str, str], list[str]] = {}
    for entry in data_path:
        path = Path(entry).expanduser()
        if path.is_file() and path.suffix in BUILDERS:
            key = (str(path.parent.resolve()), BUILDERS[path.suffix])
            if key not in by_folder:
                by_folder[key] = []
                groups.append(by_folder[key])
            by_folder[key].append(entry)
        else:
            groups.append([entry])
    return groups


def get_raw_dataset(
    source: str | list[str], cache_dir: str | None = None, keys: dict[str, str] | None = None
) -> RawDataset:
    """Resolve a registry name, `local/jsonfile`, a local directory, data files of one dataset, or
    any name `datasets.load_dataset` resolves.

    `cache_dir` holds `datasets`' Arrow conversion of the files (its default cache when None).
    `keys` (role -> column, from --prompt_key/--chosen_key/--rejected_key) rename the columns read;
    with them, data is read by its columns, never by a registered schema.
    """
    name = source if isinstance(source, str) else " ".join(source)
    paths = local_entries(source)
    if paths is None:
        schema = None if keys or HUB_DATASETS.get(name, RawDataset) is RawDataset else HUB_DATASETS[name]
        return _from_splits(schema, name, _load_hub(name, cache_dir), (), keys=keys)
    splits, files = load_splits(paths, cache_dir)
    columns = splits["train"].column_names if "train" in splits else []
    saved = len(paths) == 1 and _is_saved_dataset(paths[0])
    schema = None if keys else schema_for(paths, columns)
    return _from_splits(None if schema is RawDataset else schema, name, splits, files, saved, keys)
