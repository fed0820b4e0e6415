"""The documentation is tested: the site builds strictly, and every command, snippet and printed
output in README.md and docs/ runs, composes, or says why it cannot (docs/development.md).

A fenced block is checked by its language and by an HTML comment on the line before it:

- ``bash``: each ``python -m yolotune ...`` line is composed and validated in-process as the CLI does
  before Ray starts (``-m`` sweeps expanded); ``--help`` and ``yolotune results ...`` run. Any other
  command fails the test unless the block is marked ``skip REASON`` (nothing runs) or
  ``compose REASON`` (yolotune's commands are composed only; the others are skipped).
- ``python``: run, in order with the page's other blocks, in a folder that holds a small experiment
  at ``runs/tune/NAME``; ``yolotune.tune`` stops after validation.
- a block without a language: ``output errors`` (``$ command`` lines and the error line each prints),
  ``output console`` / ``output results`` (compared with a real small sweep's console and
  ``yolotune results``, times, numbers, ids and paths aside: slow), ``plan ...`` (the resource plan),
  ``messages`` (lines of tests/bad_input_messages.json), or ``skip REASON``.
- ``yaml`` with ``file PATH``: written to PATH in that folder before the page's commands run.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
import yaml
from hydra import compose, initialize_config_module

from conftest import REPO
from yolotune import train_args
from yolotune.cli import help_text, prepare
from yolotune.config import register_configs
from yolotune.errors import ConfigError
from yolotune.overrides import composition_error, group_options, normalize, replace_space_entries

register_configs()

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
MARK = re.compile(r"<!--\s*doctest:\s*(\w+)\s*(.*?)\s*-->")
KINDS = {"skip", "compose", "output", "plan", "messages", "file"}
MESSAGES = REPO / "tests" / "bad_input_messages.json"
HYDRA_FLAGS = {"--cfg": 1, "-m": 0, "--multirun": 0, "--config-dir": 1, "-cd": 1}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    kind: Optional[str]  # the doctest mark, if any
    arg: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> List[Block]:
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        mark = MARK.search(lines[i - 1]) if i else None
        found.append(Block(page, i + 1, fence.group(2), mark and mark.group(1), mark.group(2) if mark else "",
                           "\n".join(lines[i + 1:end])))
        i = end + 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]


def commands(text: str) -> List[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in (shlex.join(shlex.split(raw, comments=True)) for raw in joined.splitlines()) if line]


def yolotune_args(command: str) -> Optional[List[str]]:
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "yolotune"]:
        return words[3:]
    if words[:1] == ["yolotune"]:
        return words[1:]
    return None


def command_cases(kinds=(None, "compose")):
    return [pytest.param(block, command, id=f"{block.where}:{command[:60]}")
            for block in ALL if block.lang == "bash" and block.kind in kinds
            for command in commands(block.text) if yolotune_args(command) is not None]


# --- the folder the pages' commands and snippets run in -----------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """runs/tune/NAME (a small finished experiment, as tests/test_results_fast.py writes one), a data
    YAML for the pages' example paths, and the pages' ``file`` blocks."""
    from test_results_fast import TRIALS, build, history_rows

    root = tmp_path_factory.mktemp("docs")
    build(root / "runs" / "tune" / "NAME",
          rows=lambda trial_id: [{**row, "metrics/mAP50-95(B)": row["fitness"]} for row in history_rows(trial_id)],
          trials={trial_id: spec for trial_id, spec in TRIALS.items() if trial_id != "t_running"})
    data = root / "data.yaml"
    data.write_text("path: .\ntrain: images\nval: images\nnames: {0: thing}\n")
    for block in ALL:
        if block.kind == "file":
            (root / block.arg).parent.mkdir(parents=True, exist_ok=True)
            (root / block.arg).write_text(block.text + "\n")
    return root


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return workdir


@pytest.fixture
def unrendered(monkeypatch):
    """Figures are made but not rendered: a PNG's drawing is most of a plot's time, and not what the docs say."""
    from matplotlib.figure import Figure

    def savefig(self, target, **kwargs):
        if hasattr(target, "write"):
            target.write(b"")
        else:
            Path(target).write_bytes(b"")

    monkeypatch.setattr(Figure, "savefig", savefig)


def _example_paths(override: str, workdir: Path) -> str:
    """An absolute data YAML in an example (``data.yaml=/data/my.yaml``) is the test's own."""
    key, _, value = override.partition("=")
    if key.endswith("data.yaml") and value.startswith("/") and value.endswith((".yaml", ".yml")):
        return f"{key}={workdir / 'data.yaml'}"
    return override


def sweep(overrides: List[str]) -> List[List[str]]:
    """A multirun's jobs: every combination of the comma-separated values (simple values only)."""
    choices = []
    for override in overrides:
        key, eq, value = override.partition("=")
        simple = eq and "," in value and not re.search(r"[\[\]{}()'\"]", value)
        choices.append([f"{key}={v}" for v in value.split(",")] if simple else [override])
    return [list(job) for job in itertools.product(*choices)]


def check(args: List[str], workdir: Path, validate: bool = True) -> None:
    """What ``python -m yolotune ARGS`` checks before Ray starts, in-process; raises ConfigError."""
    overrides, multirun, i = [], False, 0
    while i < len(args):
        if args[i] in HYDRA_FLAGS:
            multirun |= args[i] in ("-m", "--multirun")
            if args[i] in ("--config-dir", "-cd"):
                overrides.append(f"hydra.searchpath=[file://{(workdir / args[i + 1]).resolve()}]")
            i += 1 + HYDRA_FLAGS[args[i]]
            continue
        assert not args[i].startswith("-"), f"an option the doc test does not know: {args[i]}"
        overrides.append(_example_paths(args[i], workdir))
        i += 1
    for job in sweep(overrides) if multirun else [overrides]:
        argv = normalize(job)
        try:
            with initialize_config_module("yolotune.conf", version_base="1.3"):
                cfg = compose("config", overrides=argv)
        except Exception as e:  # noqa: BLE001 - Hydra's errors, translated as the CLI does
            error = composition_error(e, argv)
            if error is None:
                raise
            raise error from None
        if not validate:
            continue
        replace_space_entries(cfg, argv)
        try:
            exp, _, _ = prepare(cfg, argv)
        except ConfigError as e:
            # No experiment here that Ray started: a resume's composed config is all that can be checked.
            if not (cfg.resume and e.key in ("resume", "name")):
                raise
            continue
        train_args.check_values(exp)  # preflight's first check: Ultralytics' own rules, before weights and data


def run_yolotune(args: List[str], workdir: Path, validate: bool = True) -> str:
    """Runs what is cheap (--help, results) and checks the rest; returns what it printed."""
    if args[:1] == ["results"]:
        if not validate:
            return ""  # in a compose block: the experiment is where the test cannot reach (a store, a cluster)
        from yolotune.results_cli import main as results_main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = results_main(args[1:])
        assert code == 0 or "--convert" in args, out.getvalue()[-2000:]
        return out.getvalue()
    if "--help" in args or "-h" in args:
        return help_text()
    check(args, workdir, validate)
    return ""


# --- commands -------------------------------------------------------------------------------------

@pytest.mark.parametrize("block,command", command_cases())
def test_command_composes_and_validates(block, command, in_workdir, monkeypatch):
    """A bash block's yolotune command: composed and validated (``compose`` blocks: composed only)."""
    import yolotune.report

    monkeypatch.setattr(yolotune.report, "write_all", lambda results, top=None: {})  # plots: seconds, and not the point
    try:
        run_yolotune(yolotune_args(command), in_workdir, validate=block.kind is None)
    except ConfigError as e:
        pytest.fail(f"{block.where}: {command}\nyolotune: error: {e}")


def test_every_block_runs_or_says_why():
    """Every command is yolotune's or its block is marked; every block without a language is marked."""
    problems = []
    for block in ALL:
        if block.kind is not None and block.kind not in KINDS:
            problems.append(f"{block.where}: unknown doctest mark {block.kind!r}")
        if block.kind in ("skip", "compose") and not block.arg:
            problems.append(f"{block.where}: {block.kind} needs a reason")
        if block.lang == "bash" and block.kind is None:
            problems += [f"{block.where}: {c!r} is not a yolotune command; mark the block skip or compose REASON"
                         for c in commands(block.text) if yolotune_args(c) is None]
        if block.lang == "" and block.kind is None:
            problems.append(f"{block.where}: a block without a language needs a doctest mark")
        if block.lang not in ("", "bash", "python", "yaml"):
            problems.append(f"{block.where}: language {block.lang!r}: use bash, python or yaml")
    assert not problems, "\n".join(problems)


def test_help_points_to_each_groups_page_and_its_examples_compose(in_workdir):
    text = help_text()
    for group in group_options():
        page = f"docs/configuration/{group}.md"
        assert f"({page})" in text and (REPO / page).is_file(), group
    for page in re.findall(r"docs/[\w/.-]+\.md", text):
        assert (REPO / page).is_file(), page
    examples = [line.strip() for line in text.split("Examples:")[1].splitlines()
                if line.strip().startswith("python -m yolotune ")]
    assert examples
    for example in examples:
        run_yolotune(yolotune_args(example), in_workdir)


# --- python snippets ------------------------------------------------------------------------------

PYTHON_PAGES = sorted({block.page for block in ALL if block.lang == "python"})


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[str(p.relative_to(REPO)) for p in PYTHON_PAGES])
def test_python_snippets_run(page, in_workdir, monkeypatch, unrendered):
    """A page's python blocks, in order, in one namespace; yolotune.tune stops after validation."""
    import yolotune.cli

    validated = []

    def validate_only(cfg, overrides):
        exp, exp_dir, _ = prepare(cfg, overrides)
        validated.append(exp)
        return exp_dir, None

    monkeypatch.setattr(yolotune.cli, "run_experiment", validate_only)
    namespace = {"__name__": "__doc__"}
    for block in blocks(page):
        if block.lang != "python" or block.kind == "skip":
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(block.text, block.where, "exec"), namespace)  # noqa: S102 - the docs' own snippets
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{block.where}: {type(e).__name__}: {e}")
    import matplotlib.pyplot as plt

    plt.close("all")
    assert validated or "tune(" not in page.read_text()


def test_api_page_names_every_argument_of_tune():
    """docs/api.md names each argument of yolotune.tune (the reference below it gives their defaults)."""
    import inspect

    from yolotune.api import tune

    text = (REPO / "docs" / "api.md").read_text()
    missing = [name for name, parameter in inspect.signature(tune).parameters.items()
               if parameter.kind is not parameter.VAR_KEYWORD and f"`{name}`" not in text]
    assert not missing, f"docs/api.md does not name these arguments of yolotune.tune: {missing}"


# --- printed output -------------------------------------------------------------------------------

def _output_blocks(kind: str, arg: str = ""):
    return [pytest.param(b, id=b.where) for b in ALL if b.kind == kind and b.arg.startswith(arg)]


@pytest.mark.parametrize("block", _output_blocks("output", "errors"))
def test_error_lines_are_what_yolotune_prints(block, in_workdir):
    lines = block.text.splitlines()
    pairs = [(lines[i][2:], lines[i + 1]) for i in range(len(lines)) if lines[i].startswith("$ ")]
    assert pairs and len(pairs) * 2 == len(lines), f"{block.where}: '$ command' lines, each followed by its error"
    for command, printed in pairs:
        with pytest.raises(ConfigError) as err:
            run_yolotune(yolotune_args(command), in_workdir)
        assert f"yolotune: error: {err.value}" == printed, f"{block.where}: {command}"


@pytest.mark.parametrize("block", _output_blocks("plan"))
def test_plan_lines_are_what_the_plan_prints(block):
    from compose import experiment
    from yolotune.resources import plan

    settings = dict(word.split("=", 1) for word in block.arg.split())
    for line in block.text.splitlines():
        gpus, cpus = map(int, re.search(r"\((\d+) GPUs?, (\d+) CPUs? on 1 node\)", line).groups())
        resources = experiment(f"resources={settings['resources']}").resources
        assert plan(resources, [(cpus, gpus)], int(settings["iterations"])).summary() == line, block.where


def _checked_messages() -> dict:
    """The table's messages that tests/test_bad_input.py still produces (the table keeps old cases)."""
    source = (REPO / "tests" / "test_bad_input.py").read_text()
    return {case: message for case, message in json.loads(MESSAGES.read_text()).items()
            if f'"{case}"' in source or f"'{case}'" in source}


def test_troubleshooting_has_every_refusal_message():
    page = REPO / "docs" / "troubleshooting.md"
    listed = [line.removeprefix("yolotune: error: ") for block in blocks(page) if block.kind == "messages"
              for line in block.text.splitlines()]
    messages = _checked_messages()
    missing = sorted(case for case, message in messages.items() if message not in listed)
    assert not missing, f"docs/troubleshooting.md lacks the message of {missing}: add each under its cause"
    unknown = [line for line in listed if line not in messages.values()]
    assert not unknown, f"docs/troubleshooting.md lists messages yolotune no longer prints: {unknown}"


def _prose(page: Path) -> str:
    """A page's text outside its fenced blocks (a code line that starts with # is no heading)."""
    return re.sub(r"^(```+).*?^\1\s*$", "", page.read_text(), flags=re.M | re.S)


def test_troubleshooting_lists_each_entry_once_and_indexes_its_sections():
    """Each message once, each heading once, and the list at the top links every section: a user looks
    up what they see in one place."""
    page = REPO / "docs" / "troubleshooting.md"
    listed = [line for block in blocks(page) if block.kind == "messages" for line in block.text.splitlines()]
    assert not sorted({line for line in listed if listed.count(line) > 1}), "messages listed twice"
    headings = re.findall(r"^#+ (.+)$", _prose(page), re.M)
    assert not sorted({h for h in headings if headings.count(h) > 1}), "headings used twice"
    index = _prose(page).split("\n## ")[0]
    for heading in re.findall(r"^## (.+)$", _prose(page), re.M):
        slug = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())
        assert f"](#{slug})" in index, f"docs/troubleshooting.md: the list at the top lacks '{heading}'"


# Times, numbers, trial ids and paths differ from run to run; the parameter and metric names with the
# experiment. What is left is the shape of each line, which must be one yolotune prints.
PARAMS = r"\b(lr0|lrf|momentum|weight_decay|warmup_epochs)\b"
METRICS = r"(fitness|val/box_loss|metrics/mAP50-95\(B\))"


def template(line: str) -> str:
    line = line.lstrip("█░▏▎▍▌▋▊▉ ")
    line = re.sub(r"\b[0-9a-f]{5}_\d{5}\b", "ID", line)
    line = re.sub(r"(^|\s)(/|runs/)\S*", r"\1PATH", line)
    line = re.sub(METRICS, "METRIC", line)
    line = re.sub(r"\((higher|lower) is better\)", "(BETTER)", line)
    line = re.sub(PARAMS, "PARAM", line)
    line = re.sub(r"(\d+h)?(\d+m)?\d+s\b", "T", line)
    line = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", line)
    line = re.sub(r"(PARAM=N ?)+", "PARAMS ", line)
    line = re.sub(r"(PARAM\s+)+", "PARAMS ", line)
    line = re.sub(r"(N\s+)+N\b", "N...", line)
    line = re.sub(r", top N of N:", ":", line)  # how many trials the table shows
    line = re.sub(r"trials?\b", "trials", line)
    line = re.sub(r"epochs?\b", "epochs", line)
    return " ".join(line.split())


def compare_output(block: Block, printed: str) -> None:
    """Each line of the block is a line yolotune printed, as templates; "..." leaves the rest of a line out."""
    shapes = {template(line) for line in printed.splitlines()}

    def printed_like(line: str) -> bool:
        if "..." not in line:
            return template(line) in shapes
        start = template(line.split("...")[0])
        return any(shape.startswith(start) for shape in shapes)

    missing = [line for line in block.text.splitlines() if line.strip() not in ("", "...") and not printed_like(line)]
    assert not missing, (f"{block.where}: lines yolotune does not print (as templates):\n"
                         + "\n".join(f"  {line}\n    {template(line)}" for line in missing)
                         + "\nwhat it printed:\n" + printed[-4000:])


@pytest.mark.slow
@pytest.mark.parametrize("block", _output_blocks("output", "console"))
def test_console_output_is_what_a_sweep_prints(block, small_sweep):
    """Compared with the console of the shared small sweep (its yolotune.log)."""
    compare_output(block, (small_sweep / "yolotune.log").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("block", _output_blocks("output", "results"))
def test_results_output_is_what_yolotune_results_prints(block, small_sweep, tmp_path, unrendered):
    import shutil

    copy = tmp_path / "small"
    shutil.copytree(small_sweep, copy)  # results writes plots and the report: the shared sweep stays as it is
    compare_output(block, run_yolotune(["results", str(copy), "--top", "3"], tmp_path))


# --- the site -------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_site_builds_strictly(tmp_path):
    """No broken link, anchor, nav entry or API reference; no network (theme.font: false)."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count('class="doc doc-heading"') >= 5


def test_site_config_needs_no_network_and_lists_every_page():
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    assert config["theme"]["font"] == "false"
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.M))
    pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert pages == listed, f"pages not in the nav: {pages - listed}; nav entries without a page: {listed - pages}"
    assert (REPO / "docs" / "architecture.md").read_text().strip() == '--8<-- "ARCHITECTURE.md"'  # included, no copy


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_ci_runs_the_readme_install_and_test_commands_as_written():
    """.ci/run runs, in order: the quickstart's install and its config checked (dry_run=true: the sweep would
    take minutes), then Development's commands; so a README step that does not work fails CI, not a user."""
    readme = [block for block in ALL if block.page.name == "README.md" and block.lang == "bash"]
    install, quickstart = commands(readme[0].text)
    development = commands(next(block for block in readme if "pytest" in block.text).text)
    ci = commands((REPO / ".ci" / "run").read_text())
    for expected in ([install, f"{quickstart} dry_run=true"], development):
        found = [line for line in ci if line in expected]
        assert found == expected, f".ci/run runs {found}, README.md gives {expected}"
    assert ci.index(install) < ci.index(development[-1])  # the quickstart checked before the suite
