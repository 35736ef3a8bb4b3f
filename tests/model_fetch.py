"""What a test does when the model it needs cannot be fetched: locally it is skipped with the reason (the
machine may be offline); in CI (`CI=true`) it fails, so a broken fetch is not hidden behind a skip."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def model_unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason}\n(CI=true: a model that cannot be fetched fails the run instead of skipping)",
                    pytrace=False)
    pytest.skip(reason)
