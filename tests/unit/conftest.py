"""Unit tier: pure logic, no network. Settings from the developer's shell must not leak in."""

import pytest


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("BEELDPORTAAL_"):
            monkeypatch.delenv(name)
