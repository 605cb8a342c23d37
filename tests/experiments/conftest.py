"""Fixtures the experiments tests share."""
import sys
import textwrap

import pytest

from experiments import plugins


@pytest.fixture
def user_module_from(tmp_path, monkeypatch):
    """``user_module_from(name, source)``: a user's module on sys.path (as PYTHONPATH puts it there), fresh for every
    test, with the cache of the users' datasets cleared before and after. Returns the module file."""
    names = []

    def write(name: str, source: str):
        folder = tmp_path / "pkg"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.delitem(sys.modules, name, raising=False)
        plugins._user_splits.cache_clear()
        names.append(name)
        return path

    yield write
    for name in names:
        sys.modules.pop(name, None)
    plugins._user_splits.cache_clear()
