"""Where a pytest run keeps the plugin's objects: its settings, its :class:`SlmDeploySession` and, when it checks
several models, its :class:`SlmDeployRun`.

The plugin's hooks, its case items and the built-in suite all reach the run's session through here, so none of
them imports another (pytest imports the plugin in every run: this module stays small).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from pytest_slmdeploy.settings import Settings

if TYPE_CHECKING:
    from pytest_slmdeploy.run import SlmDeployRun
    from pytest_slmdeploy.session import SlmDeploySession

SESSION_KEY = pytest.StashKey["SlmDeploySession"]()
SETTINGS_KEY = pytest.StashKey[Settings]()
RUN_KEY: pytest.StashKey[SlmDeployRun] = pytest.StashKey()  # only in a run of several models


def slm_session(config: pytest.Config) -> SlmDeploySession:
    """The run's :class:`SlmDeploySession` (for plugins and the plugin's own test items); in a run of several
    models, the session of the model whose test is running."""
    run = config.stash.get(RUN_KEY, None)
    if run is not None:
        return run.active()
    session = config.stash.get(SESSION_KEY, None)
    if session is None:  # a run without a model: made on first use, to answer fixtures with NO_MODEL skips
        from pytest_slmdeploy.session import SlmDeploySession

        session = config.stash[SESSION_KEY] = SlmDeploySession(config, config.stash[SETTINGS_KEY])
    return session
