"""The docstring examples of the public API run (make test runs this file, so the
examples stay true without a --doctest-modules flag in the Makefile)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["checks", "distilled", "preprocess", "data", "archs", "stax", "krr", "label_solve", "kip",
           "rfad", "frepo", "experts", "augment", "train", "loop", "evaluate", "nets", "checkpoint"]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(f"kipnb.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"kipnb.{name} has no examples"
    assert result.failed == 0, f"{result.failed} example(s) of kipnb.{name} failed (see above)"
