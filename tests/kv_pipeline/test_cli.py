"""The `kvtier` command turns user mistakes into one-line errors before any work starts, never tracebacks."""

from __future__ import annotations

import pytest

from kv_pipeline.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--log-level", "LOUD", "demo"], "--log-level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        (["demo", "--block-size", "0"], "--block-size: must be > 0, got 0"),
        (["demo", "--sessions", "two"], "--sessions: expected a whole number, got 'two'"),
        (["demo", "--ddr-sessions", "nan"], "--ddr-sessions: must be a finite number > 0"),
        (["bench", "prefix", "--repeats", "-3"], "--repeats: must be > 0, got -3"),
        (["serve", "m", "--server-port", "0"], "--server-port: must be > 0"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_unwritable_report_directory_is_refused_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "prefix", "--out", str(blocker / "reports")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--out: cannot write to" in err
    assert not (blocker.parent / "prefix.json").exists()


def test_a_configuration_mistake_found_while_running_is_one_line(tmp_path, capsys):
    # The settings file names an unknown key: found once the command builds its configuration, before the
    # engine (LMDeploy, absent on a CPU machine) is imported.
    config = tmp_path / "kvtier.toml"
    config.write_text('ddr_size = "1GiB"\n')
    assert main(["serve", "m", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvtier: error: unknown configuration keys: ddr_size") and "Traceback" not in err
