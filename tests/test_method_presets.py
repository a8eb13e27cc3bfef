"""Paper-model configs with a method argument (``--config=configs/<model>_cf.py:<method>``): each row of a
config's ``METHOD_PRESETS`` table validates, reaches the editor and Stage I it names, and the plain config is
unchanged (configs/base.with_method)."""
from __future__ import annotations

import importlib

import pytest

from metake_jax.run_config import RunConfig
from metake_jax.runner import edit_config

PAPER = ("gpt2xl_cf", "gptj_cf", "llama3_cf")


@pytest.mark.parametrize("name", PAPER)
def test_method_presets_reach_the_editor(name):
    mod = importlib.import_module(f"configs.{name}")
    plain = mod.get_config()
    assert mod.get_config(None).to_dict() == plain.to_dict()
    for method, fields in mod.METHOD_PRESETS.items():
        c = mod.get_config(method)
        rc = RunConfig.of(c)
        ecfg = edit_config(rc)
        assert rc.method == method and ecfg.editor.name == method and c.run_dir == f"{plain.run_dir}_{method}"
        for dotted, value in fields.items():
            node = rc
            for part in dotted.split("."):
                node = getattr(node, part)
            assert node == value, dotted
        if method == "blue":  # the boundary layers: first and last of the run's critical range
            assert ecfg.layers == (plain.layers[0], plain.layers[-1])


def test_unknown_method_argument_is_named():
    mod = importlib.import_module("configs.gptj_cf")
    with pytest.raises(ValueError, match="'nope'"):
        mod.get_config("nope")
