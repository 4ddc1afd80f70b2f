"""The README and docs/ in sync with the code: the README's first two commands are the ones CI and the
tests run, the README stays short, every docs page opens with a command, every relative link resolves,
and every script and `--flag` a command block names exists (step flags parsed by the steps' parsers)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import OPTIMUM_HABANA_INSTALL, ROOT

from dschat_hal.args import dpo_parser, step1_parser, step2_parser, step3_parser

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
STEP_PARSERS = {
    "training/step1_supervised_finetuning/main.py": step1_parser,
    "training/step2_reward_model_finetuning/main.py": step2_parser,
    "training/step2_dpo_finetuning/main.py": dpo_parser,
    "training/step3_rlhf_finetuning/main.py": step3_parser,
}
from training.plan import PARSERS as PLAN_PARSERS  # noqa: E402  (training/plan.py STEP ...)

INTERPRETERS = ("python", "python3")
LAUNCHERS = ("deepspeed", "torchrun")
SEPARATORS = {"&&", "||", ";", "|"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def command_blocks(path: Path) -> list[str]:
    """The bash blocks of a page, in order, continuation lines joined."""
    return [block.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)\n```", path.read_text(), re.S)]


def commands(block: str) -> list[list[str]]:
    """Each simple command of a block (lines, and `&&`/`;`/`|` chains), comments dropped."""
    found = []
    for line in block.splitlines():
        current: list[str] = []
        for token in shlex.split(line, comments=True):
            if token in SEPARATORS:
                found.append(current)
                current = []
            else:
                current.append(token)
        found.append(current)
    return [argv for argv in found if argv]


def script_call(argv: list[str]) -> tuple[str, list[str]] | None:
    """(script path, its arguments) of `python X.py ...`, `bash X.sh ...`, `deepspeed X.py ...`; else None."""
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if not argv:
        return None
    program = Path(argv[0]).name
    if program in INTERPRETERS + LAUNCHERS + ("bash",):
        scripts = [i for i, token in enumerate(argv[1:], start=1) if token.endswith((".py", ".sh"))]
        if scripts and (program in LAUNCHERS or scripts[0] == 1):
            return argv[scripts[0]], argv[scripts[0] + 1 :]
    return None


def script_calls() -> list[tuple[str, str, list[str]]]:
    """(page, script, arguments) of every script a command block of README.md or docs/ runs."""
    return [
        (rel(page), *call)
        for page in PAGES
        for block in command_blocks(page)
        for argv in commands(block)
        if (call := script_call(argv)) is not None
    ]


def flags(arguments: list[str]) -> list[str]:
    return [token.split("=", 1)[0] for token in arguments if token.startswith("--")]


def option_strings(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


# --- the README's two commands: what CI runs and what the tests assume -----------------------------------


def readme_commands() -> tuple[str, str]:
    blocks = command_blocks(README)
    assert len(blocks) >= 2, "the README opens with two commands: the demo, then the tests"
    return blocks[0], blocks[1]


def test_ci_runs_exactly_the_readme_test_command():
    demo, tests = readme_commands()
    assert "e2e_rlhf.py" in demo and "pytest" in tests
    assert "\n" not in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), ".ci/run runs the README's test command verbatim"
    assert "tests/test_readme.py" in ci, ".ci/run's comment names the test that keeps the two in sync"


def test_the_readme_commands_are_what_the_tests_assume():
    demo, tests = readme_commands()
    setup = "python3 -m venv .venv && .venv/bin/pip install -q -r requirements-cpu.txt -e . && "
    assert demo.startswith(setup) and tests.startswith(setup), "one setup for the demo and the tests"
    assert OPTIMUM_HABANA_INSTALL in tests  # where conftest looks for the real optimum-habana
    extensions = "TORCH_EXTENSIONS_DIR=$PWD/.venv/torch_extensions .venv/bin/python"
    assert extensions in demo and extensions in tests
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert 'ROOT / ".venv" / "torch_extensions"' in conftest  # the tests' default is the README's
    # the demo is what the e2e_output fixture runs (and what test_e2e.py checks)
    assert demo.endswith(".venv/bin/python training/e2e_rlhf.py --output-dir output")
    assert 'run_script("training/e2e_rlhf.py", "--output-dir"' in conftest
    from training.e2e_rlhf import parse_args

    assert parse_args(["--output-dir", "output"]).output_dir == "output"


def test_the_readme_chat_command_reads_the_demos_actor():
    chat = [argv for block in command_blocks(README) for argv in commands(block) if "training/chat.py" in argv]
    assert chat, "the README shows how to chat with the demo's result"
    from training.chat import _parser

    assert _parser().parse_args(chat[0][2:]).path == "output/rlhf/actor"  # the demo's --output-dir output


# --- shape of the pages -------------------------------------------------------------------------------------


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move details to a docs/ page"


def test_there_are_docs_pages_and_the_readme_links_each():
    assert DOCS, "docs/*.md"
    readme = README.read_text()
    for page in DOCS:
        assert f"(docs/{page.name})" in readme, f"the README's 'Read more' links {rel(page)}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_each_docs_page_starts_with_a_command(page):
    lines = [line for line in page.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{rel(page)} starts with its title"
    assert lines[1] == "```bash", f"{rel(page)}: the first thing after the title is the command a user runs"
    assert lines[2] != "```", f"{rel(page)}: its first command block is empty"


def github_anchor(heading: str) -> str:
    """GitHub's id of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().replace("`", "").lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{rel(page)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{rel(page)}: {target} (no such heading)")
    assert not broken, broken


# --- the commands name scripts and flags that exist --------------------------------------------------------


def test_command_blocks_run_scripts_that_exist():
    calls = script_calls()
    assert len({script for _, script, _ in calls}) >= 8  # the collector still finds the pages' commands
    missing = [f"{page}: {script}" for page, script, _ in calls if not (ROOT / script).is_file()]
    assert not missing, missing


def test_step_commands_use_flags_the_steps_parse():
    """Each flag of a step command is one of its parser's own options (no abbreviation), and the
    command parses (types, choices) with the parser the step's main uses; `training/plan.py STEP`
    reads the step's flags."""
    checked = 0
    for page, script, arguments in script_calls():
        if script == "training/plan.py":
            make, arguments = PLAN_PARSERS[arguments[0]], arguments[1:]
        elif script in STEP_PARSERS:
            make = STEP_PARSERS[script]
        else:
            continue
        parser = make()
        unknown = set(flags(arguments)) - option_strings(parser)
        assert not unknown, f"{page}: {script} has no {sorted(unknown)}"
        checked += 1
        if "--help" in arguments or "-h" in arguments:
            continue  # the flags exist; --help prints and exits
        try:
            parser.parse_args(arguments)
        except SystemExit:
            pytest.fail(f"{page}: {script} does not parse {shlex.join(arguments)}")
    assert checked >= 5  # the collector still finds the step commands


def test_other_python_commands_use_flags_their_scripts_define():
    """e2e, chat, plot_metrics and the benchmarks declare their flags literally (`add_argument("--x"`)."""
    for page, script, arguments in script_calls():
        if script in STEP_PARSERS or script == "training/plan.py" or not script.endswith(".py"):
            continue
        source = (ROOT / script).read_text()
        for flag in flags(arguments):
            assert f'"{flag}"' in source, f"{page}: {script} defines no {flag}"
