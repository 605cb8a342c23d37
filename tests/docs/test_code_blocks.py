"""Nothing drifts: every ```python block of the README and of the docs' pages runs (the blocks of one page in order,
each in a fresh interpreter, in one temporary folder holding a copy of the committed studies the page names), except
those whose first line says they need what this machine lacks (``# needs: gpu|slurm|ray-cluster``, or lightning or
ray where they are not installed), which are compiled; every ``smoothness-lab`` command and option of a bash block
exists in the command line."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from docs_blocks import NEEDS, ROOT, all_blocks, command_lines, pages

from experiments.cli import main

OWN_LOOP_MARKER = "<!-- own-loop script"    # run by tests/experiments/test_own_loop_docs.py
SLOW_PAGES = {"README.md", "docs/how-to/feature-from-outside.md", "docs/how-to/image-folder.md",
              "docs/tutorials/main-study.md"}


def _python_pages():
    by_page = {}
    for b in all_blocks("python"):
        by_page.setdefault(b.page, []).append(b)
    return by_page


def _missing(needs):
    module = NEEDS[needs]
    return module is None or importlib.util.find_spec(module) is None


def _copy_studies(code: str, into: Path) -> None:
    """The committed studies a page names (results/<study>), without checkpoints, so that it may write into them."""
    for study in sorted(set(re.findall(r"results/([\w.-]+)", code))):
        src = ROOT / "results" / study
        if (src / "study.json").exists():
            shutil.copytree(src, into / "results" / study, ignore=shutil.ignore_patterns("checkpoints", "*.pt"))


def test_every_block_says_its_language_and_markers_are_known():
    for lang in ("", "sh", "shell", "console", "py"):
        for b in all_blocks(lang):
            code_like = [line for line in b.code.splitlines()
                         if re.match(r"\s*(\$ )?(smoothness-lab [a-z-]+( |$)|import \w|from [\w.]+ import )", line)]
            assert lang == "" and not code_like, f"{b}: say ```bash or ```python, so that tests/docs checks the block"
    for b in all_blocks("python"):
        assert b.needs is None or b.needs in NEEDS, f"{b}: unknown '# needs: {b.needs}'; known: {', '.join(NEEDS)}"


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p
                                  for p in sorted(_python_pages())])
def test_the_python_blocks_of_a_page_run(page, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "SMOOTHNESS_QUICK": "1", "MPLBACKEND": "Agg"}
    skipped = []
    for i, b in enumerate(_python_pages()[page]):
        if b.snippet:   # an included file: it must exist (mkdocs --strict checks too), compile, and be run by a test
            path = ROOT / b.snippet
            compile(path.read_text(), str(path), "exec")
            assert any(b.snippet in t.read_text() for t in (ROOT / "tests").rglob("test_*.py")
                       if t.parent.name != "docs"), f"{b}: no test runs {b.snippet}"
            continue
        compile(b.code, str(b), "exec")
        if b.before.startswith(OWN_LOOP_MARKER):
            assert b.code == (ROOT / "examples" / "own_loop.py").read_text(), f"{b}: differs from examples/own_loop.py"
            continue
        if b.file_name:
            (tmp_path / b.file_name).write_text(b.code)
            continue
        if b.needs and _missing(b.needs):
            skipped.append(f"{b} (needs {b.needs})")
            continue
        _copy_studies(b.code, tmp_path)
        script = tmp_path / f"_block{i}.py"
        script.write_text(b.code)
        out = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"{b} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    if skipped:
        pytest.skip("compiled only, this machine lacks what they need: " + "; ".join(skipped))


def _check_command(args, where):
    ctx = click.Context(main, info_name="smoothness-lab")
    words = [a for a in args if a not in ("-q", "--quiet")]
    if not words or words[0] in ("-h", "--help") or words[0].isupper():   # a placeholder: `smoothness-lab ARGS`
        return
    name = words[0]
    assert not name.startswith("-"), f"{where}: unknown option {name} of smoothness-lab"
    command = main.get_command(ctx, name)
    assert command is not None, f"{where}: `smoothness-lab {name}` is not a command"
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    for w in words[1:]:
        if w.startswith("-") and not re.fullmatch(r"-\d.*", w):
            option = w.split("=", 1)[0]
            assert option in known, f"{where}: `smoothness-lab {name}` has no option {option}"


def test_every_smoothness_lab_command_and_option_in_a_bash_block_exists():
    checked = 0
    for b in all_blocks("bash"):
        for args in command_lines(b.code):
            _check_command(args, str(b))
            checked += 1
    assert checked > 20


def test_every_make_target_in_a_bash_block_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    for b in all_blocks("bash"):
        for target in re.findall(r"^\s*make ([\w-]+)", b.code, flags=re.MULTILINE):
            assert target in targets, f"{b}: `make {target}` is not a target of the Makefile"


def test_every_smoothness_lab_command_in_the_prose_exists():
    for page in pages():
        for span in re.findall(r"`(smoothness-lab [^`]+)`", page.read_text()):
            for args in command_lines(span):
                _check_command(args, f"{page.relative_to(ROOT)}: `{span}`")


def test_the_checks_catch_a_vanished_option_and_command():
    with pytest.raises(AssertionError, match="no option --no-such-option"):
        _check_command(["run", "--no-such-option", "1"], "here")
    with pytest.raises(AssertionError, match="is not a command"):
        _check_command(["no-such-command"], "here")


def test_the_command_line_reference_lists_every_command():
    """docs/reference/cli.md generates `main`'s own commands from experiments.cli and each feature's command from
    its module (mkdocs-click reads a group's built-in commands only): every command must have its block."""
    from experiments.features import FEATURES
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    blocks = set(re.findall(r":module: (\S+)\n\s+:command: (\S+)", page))
    assert ("experiments.cli", "main") in blocks
    for feature in FEATURES.values():
        for ref in feature.commands:
            if isinstance(ref, str):
                module, _, attr = ref.partition(":")
            else:
                module, attr = ref.callback.__module__, ref.callback.__name__
            assert (module, attr) in blocks, f"docs/reference/cli.md lacks a mkdocs-click block for {module}:{attr}"


def test_every_link_of_the_readme_resolves():
    """The README is GitHub's front page, outside the site (which mkdocs --strict checks): its relative links and
    images must name files of the repository."""
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(targets) > 20
    for target in targets:
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (ROOT / target.split("#")[0]).exists(), f"README.md links to {target}, which does not exist"


def _section(text: str, start: str, end: str) -> str:
    assert start in text, f"lost the section starting {start!r}"
    body = text.split(start, 1)[1]
    body = body.split(end, 1)[0] if end in body else body
    return re.sub(r"\]\((\.\./)+", "](", body).strip()   # the page's links are relative to docs/tutorials/


def test_the_readme_s_quick_start_and_findings_are_the_main_study_page_s():
    """The README shows the quick start and the reference run's findings, docs/tutorials/main-study.md the same text
    and more: an edit to one must reach the other (the numbers are checked against the results by
    tests/test_result_numbers.py)."""
    readme = (ROOT / "README.md").read_text()
    page = (ROOT / "docs" / "tutorials" / "main-study.md").read_text()
    assert _section(readme, "## Quick start\n", "## Documentation") == _section(page, "## Quick start\n", "## Step")
    no_figures = lambda text: re.sub(r"^!\[.*\n", "", text, flags=re.MULTILINE)   # noqa: E731 (the README shows one)
    assert no_figures(_section(readme, "## What the reference run shows\n", "\nThe whole discussion")) == \
        no_figures(_section(page, "## What the reference run shows\n", "**What changed in this regeneration**"))
