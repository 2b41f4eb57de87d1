"""Flags that mirror config fields take their help text and default from the dataclass field."""

from __future__ import annotations

import dataclasses

import pytest

from vfx_ray import config
from vfx_ray.cli.app import build_parser
from vfx_ray.cli.train_flags import train_config_from_args


def subparser(name: str):
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[name]


def test_help_shows_the_field_default_and_text():
    helps = {a.dest: a.help for a in subparser("train-cv")._actions}
    fields = {f.name: f for f in dataclasses.fields(config.TrainConfig)}
    assert helps["max_epochs"] == f"{fields['max_epochs'].metadata['help']} (paper: {config.TrainConfig().max_epochs})"
    assert helps["n_folds"].endswith("(paper: 10)") and helps["pretrained_path"].endswith("(paper: none)")
    crops = {a.dest: a.help for a in subparser("crops")._actions}
    assert crops["crop_size"].endswith(f"(paper: {config.CropConfig().crop_size})")


def test_given_flags_change_their_fields_and_unset_ones_keep_the_profile():
    parser = build_parser()
    args = parser.parse_args(["train-cv", "--crops", "c", "--out", "o", "--profile", "demo", "--epochs", "3",
                              "--folds", "4", "--no-gpu"])
    cfg = train_config_from_args(args)
    demo = config.profile("demo").train
    assert (cfg.max_epochs, cfg.n_folds, cfg.use_gpu) == (3, 4, False)
    assert dataclasses.replace(cfg, max_epochs=demo.max_epochs, n_folds=demo.n_folds, use_gpu=demo.use_gpu) == demo


def test_a_bad_value_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["crops", "--archive", "a", "--annotations", "b", "--out", "o",
                                   "--thickness-mm", "0"])
    assert exit_.value.code == 2 and "expected a number > 0" in capsys.readouterr().err
