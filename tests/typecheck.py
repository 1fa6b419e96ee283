"""The tests run with a runtime type checker (jaxtyping's import hook with beartype, set in
pyproject.toml); users do not. A test of what tdb itself says about a wrongly typed argument
switches the checker off for that call, which the checker would otherwise refuse first."""

from __future__ import annotations

from collections.abc import Callable

import jaxtyping


def unchecked(call: Callable[[], object]) -> None:
    """Call with the tests' runtime type checker off, as users run tdb."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        call()
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)
