"""Fixtures of the streaming tests (loaded with `pytest_plugins = ["stream_fixtures"]`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from stream_helpers import make_generator_dir

from genadapter import GenerativeAdapter


@pytest.fixture(scope="session")
def gen_dirs(tmp_path_factory, smollm2_tokenizer) -> tuple[Path, Path]:
    """Two generators of the same base LM with different weights (different fingerprints)."""
    root = tmp_path_factory.mktemp("generators")
    return make_generator_dir(root, smollm2_tokenizer, 0), make_generator_dir(
        root, smollm2_tokenizer, 1
    )


@pytest.fixture(scope="session")
def gen_dir(gen_dirs) -> Path:
    return gen_dirs[0]


@pytest.fixture(scope="session")
def ga(gen_dir) -> GenerativeAdapter:
    """The generator of gen_dir, loaded once (tests must not modify it)."""
    return GenerativeAdapter.from_pretrained(gen_dir)
