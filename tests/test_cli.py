"""The command line's parsing: config overrides on both sides of a subcommand's options, and
anything else unknown refused with argparse's message and exit code."""

from __future__ import annotations

import pytest

from pipeline.cli import parse


def test_overrides_are_taken_before_and_after_the_options():
    a = parse(["evaluate", "configs/local.yaml", "name=x", "--checkpoint", "runs/e", "seed=1", "eval.k_shot=4"])
    assert (a.command, a.config, a.checkpoint) == ("evaluate", "configs/local.yaml", "runs/e")
    assert a.overrides == ["name=x", "seed=1", "eval.k_shot=4"]  # in the order given: a later one wins
    assert parse(["evaluate", "--checkpoint", "runs/e", "configs/local.yaml", "seed=1"]).overrides == ["seed=1"]
    assert parse(["pretrain", "configs/local.yaml", "seed=2", "--profile"]).overrides == ["seed=2"]


@pytest.mark.parametrize("argv, bad", [
    (["evaluate", "configs/local.yaml", "--checkpoint", "runs/e", "--frobnicate"], "--frobnicate"),
    (["evaluate", "configs/local.yaml", "--checkpoint", "runs/e", "stray"], "stray"),
])
def test_anything_else_unknown_is_refused(argv, bad, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {bad}" in capsys.readouterr().err
