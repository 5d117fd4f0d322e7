"""beit3/log.py: the library's messages, progress on stdout and warnings on stderr, rank 0's info only."""

import logging

import pytest

from beit3 import log


@pytest.fixture(autouse=True)
def _restore():
    logger = logging.getLogger(log.LIBRARY)
    level = logger.level
    yield
    logger.setLevel(level)
    log._console.rank = None


def test_progress_goes_to_stdout_and_warnings_to_stderr_named_as_such(capsys):
    logger = log.get_logger("beit3.data.example")
    logger.info("resumed from step 3")
    logger.warning("a.jpg cannot be read; skipped")
    captured = capsys.readouterr()
    assert captured.out == "resumed from step 3\n"
    assert captured.err == "warning: a.jpg cannot be read; skipped\n"


def test_other_ranks_keep_their_warnings_named_by_rank_and_drop_progress(capsys):
    log.for_rank(1, 2)
    logger = log.get_logger("example")  # a name outside the package is put below it
    assert logger.name == "beit3.example"
    logger.info("resumed from step 3")
    logger.warning("shard 7 could not be read")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "[rank 1] warning: shard 7 could not be read\n"


def test_verbosity_silences_progress_and_rejects_unknown_levels(capsys):
    log.set_verbosity("warning")
    log.get_logger("beit3.x").info("done")
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="use one of debug"):
        log.set_verbosity("loud")
