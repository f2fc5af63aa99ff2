"""kvtier's log setup: one handler per package however often it runs, and a level engine subprocesses inherit."""

from __future__ import annotations

import logging

import pytest

from kv_runtime.logs import LOG_LEVEL_ENV, PACKAGES, log_to_stderr


@pytest.fixture
def clean_loggers(monkeypatch):
    monkeypatch.delenv(LOG_LEVEL_ENV, raising=False)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level) for n in PACKAGES}
    yield
    for name, (handlers, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = True


def test_level_is_set_and_exported(clean_loggers):
    import os

    log_to_stderr("info")
    assert os.environ[LOG_LEVEL_ENV] == "INFO"
    assert all(logging.getLogger(n).level == logging.INFO for n in PACKAGES)
    log_to_stderr()  # a spawned engine process: the level comes from the environment
    assert logging.getLogger("kv_runtime.backends").getEffectiveLevel() == logging.INFO


def test_repeated_setup_keeps_one_handler(clean_loggers, capsys):
    log_to_stderr("INFO")
    log_to_stderr("INFO")
    logging.getLogger("kv_runtime.x").info("one line")
    assert capsys.readouterr().err.count("one line") == 1


def test_default_is_warning(clean_loggers):
    log_to_stderr()
    assert logging.getLogger("kv_io").level == logging.WARNING
