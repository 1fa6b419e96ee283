from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import make_checkpoint

from tdb.checkpoint import LoadedModel, load_model


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random GPT-2 with a byte-level BPE tokenizer, saved by `transformers`."""
    directory = tmp_path_factory.mktemp("gpt2-small-random")
    make_checkpoint(directory)
    return directory


@pytest.fixture(scope="session")
def loaded(checkpoint_dir: Path) -> LoadedModel:
    return load_model(checkpoint_dir)
