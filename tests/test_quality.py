"""The codebase's own checks: ruff (lint and format) and mypy --strict on relay/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_ruff_lint_is_clean() -> None:
    """ruff check passes on relay/ and tests/."""
    result = run("ruff", "check", "relay", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    """ruff format --check passes on relay/ and tests/."""
    result = run("ruff", "format", "--check", "relay", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    """mypy --strict (configured in pyproject.toml) passes on relay/."""
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
