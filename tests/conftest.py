from __future__ import annotations

import sys
from collections.abc import Generator
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


@pytest.fixture(scope="session")
def demo() -> LoadedModel:
    """The built-in demo model, loaded once per run. Tests only read it: hooks and ablations are
    scoped to one call, and nothing changes its weights or mode."""
    return load_model()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test item (`item.report_call`), so a fixture can tell
    in its teardown whether the test failed (the browser tests then save a screenshot)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
