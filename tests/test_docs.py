"""The runnable examples in the docstrings and the README hold."""

import doctest
import re

import pytest

from nam_keras import attention, data, resnet


@pytest.mark.parametrize("module", [attention, resnet, data], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_readme_has_exactly_the_two_make_commands_and_ci_calls_one():
    readme = open("README.md").read()
    block = re.search(r"## The two commands\n\n```\n(.*?)```", readme, re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make train", "make test"]
    ci = [line for line in open(".ci/run").read().splitlines() if line and not line.startswith(("#", "set", "cd"))]
    assert ci == ["make test"]
