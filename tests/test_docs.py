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


@pytest.mark.parametrize("module", ["fastmu.solver", "fastmu.estimator", "fastmu.metrics", "fastmu.nn.functional", "fastmu.nn.models",
                                    "fastmu.baselines.coordinate_descent", "fastmu.baselines.dnmf",
                                    "fastmu.baselines.snmf_net"])
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def _documented_parameters(obj) -> set[str] | None:
    """Names in the numpy-style ``Parameters`` section of obj's docstring (None without one)."""
    import inspect

    doc = inspect.getdoc(obj) or ""
    section = re.search(r"^Parameters\n-+\n(.*?)(?:^\S[^\n]*\n-+\n|\Z)", doc, flags=re.S | re.M)
    if section is None:
        return None
    names: set[str] = set()
    for line in section.group(1).splitlines():
        if line and not line[0].isspace():  # an entry's head, "a, b : type"; descriptions are indented
            names.update(n.strip().lstrip("*") for n in line.split(" : ")[0].split(",") if n.strip())
    return names


def _public_callables():
    import importlib
    import inspect

    wanted = {"fastmu": ["mu", "NMF", "NALMU", "ALMU"]}
    for mod in ("fastmu.baselines", "fastmu.metrics", "fastmu.data", "fastmu.nn", "fastmu.losses",
                "fastmu.training", "fastmu.experiments"):
        wanted[mod] = importlib.import_module(mod).__all__
    for mod, names in wanted.items():
        m = importlib.import_module(mod)
        for name in names:
            obj = getattr(m, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{mod}.{name}", obj


@pytest.mark.parametrize("name, obj", list(_public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_docstring_lists_the_signature(name, obj):
    import dataclasses
    import inspect

    func = obj.__init__ if inspect.isclass(obj) else obj
    params = {p.name for p in inspect.signature(func).parameters.values()
              if p.name != "self" and not p.name.startswith("_") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    documented = _documented_parameters(obj)
    if documented is not None:  # a documented **kwargs is not a parameter name
        documented -= {p.name for p in inspect.signature(func).parameters.values() if p.kind == p.VAR_KEYWORD}
    if documented is None and inspect.isclass(obj) and dataclasses.is_dataclass(obj) and "Attributes" in obj.__doc__:
        documented = _documented_parameters(type("_", (), {"__doc__": obj.__doc__.replace("Attributes", "Parameters")}))
    if not params and documented is None:
        return  # nothing to document (autograd Functions, constants' classes)
    assert documented is not None, f"{name} has no 'Parameters' section; its signature takes {sorted(params)}"
    assert documented == params, (f"{name}: documented but not taken {sorted(documented - params)}, "
                                  f"taken but not documented {sorted(params - documented)}")
