"""The docs match the code: docstring examples, the README's commands, API
signatures and layout, the public API, and short functions."""

import ast
import doctest
import inspect
import pathlib
import re

import pytest

import nam_keras
from nam_keras import config
from nam_keras.data import pipeline
from nam_keras.layers import attention
from nam_keras.models import resnet

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "nam_keras").rglob("*.py")), ROOT / "train.py", ROOT / "evaluate.py"]


def read(name):
    return (ROOT / name).read_text()


@pytest.mark.parametrize("module", [attention, resnet, pipeline], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_readme_has_exactly_the_two_make_commands_and_ci_calls_one():
    readme = read("README.md")
    block = re.search(r"## The two commands\n\n```\n(.*?)```", readme, re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == [
        "make train",
        "make test",
    ]
    ci = [
        line
        for line in read(".ci/run").splitlines()
        if line and not line.startswith(("#", "set", "cd"))
    ]
    assert ci == ["make test"]


def readme_signature(name):
    """The README's `name(...)` as [(parameter, default or '<none>')]."""
    text = " ".join(read("README.md").split())  # signatures wrap across lines
    match = re.search(rf"`{name}\((.*?)\)`", text)
    assert match, f"the README shows no `{name}(...)` signature"
    tree = ast.parse(f"def f({match.group(1)}): pass").body[0].args
    plain = tree.args
    defaults = [None] * (len(plain) - len(tree.defaults)) + tree.defaults
    out = [(a.arg, "<none>" if d is None else ast.literal_eval(d)) for a, d in zip(plain, defaults)]
    if tree.kwarg:
        out.append(("**" + tree.kwarg.arg, "<none>"))
    return out


def code_signature(obj):
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            out.append(("**" + p.name, "<none>"))
        else:
            default = "<none>" if p.default is p.empty else p.default
            out.append((p.name, default))
    return out


@pytest.mark.parametrize(
    "name",
    [
        "build_resnet",
        "NAMAttention",
        "TorchSGD",
        "WarmupCosine",
        "create_attention",
        "batch_normalization",
    ],
)
def test_readme_signatures_match_the_code(name):
    assert readme_signature(name) == code_signature(getattr(nam_keras, name))


def test_readme_layout_describes_every_module_in_one_line():
    readme = read("README.md")
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 1)]
    modules = {p.name for p in (ROOT / "nam_keras").rglob("*.py") if p.name != "__init__.py"}
    rows = re.findall(r"^\| `nam_keras/(\w+\.py)` \| (.+) \|$", layout, re.M)
    assert {m for m, _ in rows} == modules
    assert all(len(text) > 20 for _, text in rows)


def test_public_api_is_exported():
    assert all(hasattr(nam_keras, name) for name in nam_keras.__all__)
    assert len(set(nam_keras.__all__)) == len(nam_keras.__all__)
    for name in ("NAMAttention", "build_resnet", "TorchSGD", "TrainConfig", "register_attention"):
        assert name in nam_keras.__all__


def function_lengths():
    """(file, function, lines of code after the docstring) for every function."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                body = node.body
                docstring = ast.get_docstring(node) is not None
                start = body[1].lineno if docstring and len(body) > 1 else body[0].lineno
                yield path.name, node.name, node.end_lineno - start + 1


def test_no_function_is_longer_than_50_lines():
    long = [f"{f}:{name} ({n} lines)" for f, name, n in function_lengths() if n > 50]
    assert not long, f"split these: {long}"


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for path in sorted((ROOT / "nam_keras").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            is_def = isinstance(node, (ast.FunctionDef, ast.ClassDef))
            if is_def and not node.name.startswith("_") and not ast.get_docstring(node):
                missing.append(f"{path.name}:{node.name}")
    assert not missing


def test_settings_tables_document_every_field():
    for cls in (config.TrainConfig, config.EvalConfig):
        for field in cls.__dataclass_fields__.values():
            assert field.metadata["help"], field.name
