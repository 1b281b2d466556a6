"""The registry is the one list of methods: every registered method has its config, its
documentation section and a place in the methods sweep; nothing else lists methods."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftlab.errors import ConfigError
from ftlab.methods import available, build_method, method_from_spec
from ftlab.methods.base import Traits
from ftlab.settings import config_dir

DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_every_registered_method_has_a_config_and_every_config_a_method():
    configs = {p.stem for p in (config_dir() / "method").glob("*.yaml")}
    assert configs == set(available())


def test_every_registered_method_has_a_section_in_the_docs():
    sections = set(re.findall(r"^## (\w+)", DOCS.read_text(), flags=re.M))
    missing = sorted(set(available()) - sections)
    assert not missing, f"docs/methods.md has no section for {missing}"


def test_the_methods_sweep_runs_every_registered_method():
    from ftlab.sweeps import expand_sweep

    argv = expand_sweep(["sweep=methods"])
    method = next(a for a in argv if a.startswith("method="))
    assert method.split("=", 1)[1].split(",") == available()


@pytest.mark.parametrize("name", available())
def test_every_method_declares_its_traits(name):
    method = build_method(name)
    assert isinstance(method.traits, Traits)
    assert method.traits.artifact in ("adapter", "model")
    assert method.traits.artifact_format in ("peft", "model", "own")
    assert method.traits.mergeable or method.traits.merge_note, f"{name}: say why it cannot merge"


def test_building_from_a_run_spec_checks_names_and_keys():
    assert method_from_spec({"name": "lora", "r": 4}).name == "lora"
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*did you mean 'lora'"):
        method_from_spec({"name": "lorra"})
    with pytest.raises(ConfigError, match="method.rank is not a setting of method 'lora'"):
        method_from_spec({"name": "lora", "rank": 4})
