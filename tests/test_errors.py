"""One convention for every command: bad input (ours or Hydra's config errors) exits 2 with
one line; anything else is a crash and keeps its traceback and exit code 1."""

from __future__ import annotations

import os

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError

from finqa_exp.errors import BadInput, exit_on_bad_input, hydra_error_line, run_hydra_command


def composition_error() -> ConfigCompositionException:
    try:
        raise ConfigKeyError("Key 'lr' not in 'TrainConfig'\n    full_key: train.lr")
    except ConfigKeyError as cause:
        err = ConfigCompositionException("Could not override 'train.lr'.\nTo append use +")
        err.__cause__ = cause
        return err


def test_hydra_errors_become_one_line_naming_key_and_options():
    assert (
        hydra_error_line(composition_error())
        == "Could not override 'train.lr': Key 'lr' not in 'TrainConfig'"
    )
    missing = MissingConfigException(
        "In 'config': Could not find 'model/gpt5'\n\nAvailable options...", "model/gpt5",
        ["tiny", "tinyllama"],
    )  # fmt: skip
    assert (
        hydra_error_line(missing)
        == "In 'config': Could not find 'model/gpt5' (options: tiny, tinyllama)"
    )


def test_a_hydra_config_error_exits_2_with_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def main() -> None:
        assert os.environ["HYDRA_FULL_ERROR"] == "1"  # so that Hydra raises, not exits 1
        raise composition_error()

    with pytest.raises(SystemExit) as exit_info:
        run_hydra_command(main, "test")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: Could not override 'train.lr': Key 'lr' not in 'TrainConfig'"
    ]
    assert "HYDRA_FULL_ERROR" not in os.environ


def test_a_crash_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def main() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # Python prints it and exits 1
        run_hydra_command(main, "test")
    assert "HYDRA_FULL_ERROR" not in os.environ


def test_a_user_asking_for_full_errors_gets_them(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")

    def main() -> None:
        raise composition_error()

    with pytest.raises(ConfigCompositionException):
        run_hydra_command(main, "test")


def test_bad_input_exits_2_with_its_message(capsys):
    with pytest.raises(SystemExit) as exit_info, exit_on_bad_input("test"):
        raise BadInput("lora.r must be >= 1, got 0")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: lora.r must be >= 1, got 0\n"
