"""One module owns the run directory (issue 21 item 1): only ``experiments/store.py`` opens, parses or writes a run's
files, so that a second reader of config.json or records.jsonl, with its own idea of the schema, cannot creep back.

The check reads the package's source (ast): it finds ``json.load`` / ``json.loads`` calls, ``read_bytes`` and the
literal file names ``"records.jsonl"`` / ``"config.json"`` outside the modules allowed each of them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "experiments"

# what each module outside the store may do, and why
ALLOWED = {
    "store.py": {"json.load", "read_bytes", "records.jsonl", "config.json"},   # the run directory
    "study_files.py": {"json.load"},   # the study folder's study.json / launch.json and the user's sweep files
    "data.py": {"read_bytes"},         # the dataset's .gz archives
    "plugins.py": {"json.load", "read_bytes"},  # --model-arg KEY=VALUE values; the sha256 of a user's factory file
}
RUN_FILE_NAMES = ("records.jsonl", "config.json")


def _uses(tree: ast.AST):
    """(what, line) for every use the module makes of the things only the store may do."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in ("load", "loads") and isinstance(node.value, ast.Name) and node.value.id == "json":
                yield "json.load", node.lineno
            elif node.attr == "read_bytes":
                yield "read_bytes", node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module == "json":
            if any(alias.name in ("load", "loads") for alias in node.names):
                yield "json.load", node.lineno
        elif isinstance(node, ast.Constant) and node.value in RUN_FILE_NAMES:
            yield node.value, node.lineno


def _violations(root: Path):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        allowed = ALLOWED.get(rel, set())
        for what, line in _uses(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if what not in allowed:
                yield f"experiments/{rel}:{line}: {what}"


def test_only_the_store_reads_run_directories():
    found = list(_violations(PACKAGE))
    assert not found, ("run-directory files are read outside experiments/store.py; read them through the store "
                       "(read_config_file, read_config, iter_numbered_records, last_record, ...):\n"
                       + "\n".join(found))


@pytest.mark.parametrize("source,expected", [
    ("import json\nj = json.loads(t)\n", ["json.load"]),
    ("from json import load\n", ["json.load"]),
    ("data = path.read_bytes()\n", ["read_bytes"]),
    ("p = run / 'records.jsonl'\n", ["records.jsonl"]),
    ('p = run / "config.json"\n', ["config.json"]),
    ('message = f"no config.json in {run}"\n', []),   # words in a message are not a reader
])
def test_the_check_finds_what_it_looks_for(tmp_path, source, expected):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "reader.py").write_text(source)
    assert [v.rsplit(": ", 1)[1] for v in _violations(tmp_path)] == expected


def test_one_rule_says_what_a_run_directory_is(tmp_path):
    from experiments import status, store
    from experiments.analysis import load
    for module in (load, status):
        assert not hasattr(module, "_RUN_FILES") and not hasattr(module, "_NUMBERS")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / ".slurm").mkdir()
    (tmp_path / ".slurm" / "run.log").write_text("")
    (tmp_path / "figures").mkdir()
    assert [p.name for p in sorted(tmp_path.iterdir()) if store.is_run_dir(p)] == ["run"]
    assert store.run_files(tmp_path / "run") == ["checkpoints"]
