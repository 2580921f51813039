"""The examples in the README and the public docstrings run as written."""
from __future__ import annotations

import doctest
import re

import pytest

from conftest import REPO


def readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("i", range(len(readme_python_blocks())))
def test_readme_example_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = readme_python_blocks()[i]
    exec(compile(code, f"README.md python block {i}", "exec"), {})


@pytest.mark.parametrize("module", ["fastmu.solver", "fastmu.estimator", "fastmu.nn.functional", "fastmu.nn.models",
                                    "fastmu.baselines.coordinate_descent", "fastmu.baselines.dnmf",
                                    "fastmu.baselines.snmf_net"])
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
