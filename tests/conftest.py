"""Test-wide settings: offline hub, quiet albumentations, one torch thread per test process
(the CI machine has 2 cores), and shared fixtures for the synthetic world and tiny models."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; excluded from `make test`")
