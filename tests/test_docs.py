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


def readme_section(title):
    """The README's `## title` section, up to the next `## ` heading."""
    readme = read("README.md")
    section = readme[readme.index(f"\n## {title}\n") :]
    end = section.find("\n## ", 1)
    return section if end < 0 else section[:end]


def test_readme_layout_names_every_subpackage_and_top_level_module():
    layout = readme_section("Layout")
    package = ROOT / "nam_keras"
    subpackages = [
        f"nam_keras/{init.parent.relative_to(package).as_posix()}/"
        for init in sorted(package.rglob("__init__.py"))
        if init.parent != package
    ]
    modules = [
        f"nam_keras/{p.name}" for p in sorted(package.glob("*.py")) if p.name != "__init__.py"
    ]
    missing = [name for name in subpackages + modules if f"`{name}`" not in layout]
    assert not missing, f"the README's layout does not name {missing}"
    # the module files a sub-package's row lists are in that sub-package
    rows = re.findall(r"^\| `(nam_keras/[\w/]+/)` \| (.+?) \|", layout, re.M)
    assert len(rows) == len(subpackages)
    wrong = [
        folder + name
        for folder, cell in rows
        for name in re.findall(r"`(\w+\.py)`", cell)
        if not (ROOT / folder / name).is_file()
    ]
    assert not wrong, f"the README's layout lists files that do not exist: {wrong}"


REPO_PATH = re.compile(r"(?<![\w/.$-])((?:nam_keras|docs|bench|tests)/[\w./*-]*)")
RUN_MODULE = re.compile(r"python -m (nam_keras(?:\.\w+)+)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", ["README.md", "docs/performance.md"])
def test_every_path_module_and_link_a_doc_names_exists(doc):
    text = read(doc)
    paths = {path.rstrip(".").rstrip("/") for path in REPO_PATH.findall(text)}
    missing = [path for path in sorted(paths) if not any(ROOT.glob(path))]
    for module in sorted(set(RUN_MODULE.findall(text))):
        source = ROOT / (module.replace(".", "/") + ".py")
        if not source.is_file() or 'if __name__ == "__main__":' not in source.read_text():
            missing.append(f"python -m {module}")
    folder = (ROOT / doc).parent
    links = [link for link in LINK.findall(text) if not link.startswith(("http://", "https://"))]
    missing += [link for link in links if not (folder / link).exists()]
    assert not missing, f"{doc} names what the repository does not hold: {missing}"


def test_readme_is_short_and_the_measurements_live_in_docs():
    readme = read("README.md")
    assert len(readme.splitlines()) < 260
    assert "](docs/performance.md)" in readme
    assert "SPEC" not in readme  # the specification is not part of the repository


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
