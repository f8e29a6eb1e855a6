"""Hooks other plugins and conftest files may implement."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_slmdeploy.settings import Settings


@pytest.hookspec(firstresult=True)
def pytest_slmdeploy_recipe(recipe: dict[str, Any], settings: Settings, config: pytest.Config) -> dict[str, Any] | None:
    """Return a changed Olive workflow config (``olive run`` format) to build with, or None to keep it.

    The returned recipe is part of the build key: changing it rebuilds the model.
    """
