"""`diffplug list samplers`: each sampler's order, denoiser calls per step, noise and whether
it takes --schedule (its class attributes, as `diffplug info` shows them), in text and JSON;
a sampler whose class cannot be imported is listed with its error and breaks nothing; every
other listing stays free of plugin code (and torch)."""

from __future__ import annotations

import json
import textwrap

import pytest
from cliutil import modules_after, run_cli

from diffplug.registry import default_registry

FACTS = ("order", "evaluations_per_step", "stochastic", "default_steps", "walks_noise_levels",
         "default_schedule")  # fmt: skip


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A plugin whose samplers fail only when imported: a missing module, a module that
    raises, one that calls sys.exit, and an attribute that is no class."""
    (tmp_path / "fixture_lazy_samplers.py").write_text(
        textwrap.dedent(
            """
            from diffplug import hookimpl

            @hookimpl
            def register_schedulers(register):
                register("missing-module", "fixture_lazy_nowhere.samplers:Thing", "not there")
                register("raises-at-import", "fixture_lazy_raises:Thing", "raises")
                register("exits-at-import", "fixture_lazy_exits:Thing", "exits")
                register("no-such-class", "fixture_lazy_samplers:Nothing", "no attribute")
            """
        )
    )
    (tmp_path / "fixture_lazy_raises.py").write_text("raise RuntimeError('broken on purpose')\n")
    (tmp_path / "fixture_lazy_exits.py").write_text("import sys\nsys.exit(4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return {"DIFFPLUG_PLUGINS": "fixture_lazy_samplers"}


def expected(name: str) -> dict:
    cls = default_registry().load("scheduler", name)
    walks = bool(cls.walks_noise_levels)
    default = getattr(cls, "default_schedule", None) if walks else None
    return {
        "order": None if cls.order is None else float(cls.order),
        "evaluations_per_step": cls.evaluations_per_step,
        "stochastic": cls.stochastic,
        "default_steps": cls.default_steps,
        "walks_noise_levels": walks,
        "default_schedule": default.__name__.lower() if default is not None else None,
    }


def test_json_gives_every_installed_samplers_class_attributes():
    result = run_cli("list", "samplers", "--json")
    assert result.code == 0, result.err
    rows = {row["name"]: row for row in json.loads(result.out)["scheduler"]}
    assert set(rows) == set(default_registry().names("scheduler"))
    for name, row in rows.items():
        assert row["error"] is None, row
        assert {k: row[k] for k in FACTS} == expected(name), name
    assert rows["heun"]["order"] == 2.0 and rows["heun"]["evaluations_per_step"] == 2
    assert rows["heun"]["stochastic"] is False and rows["heun"]["default_schedule"] == "karras"
    assert rows["ddim"]["stochastic"] is None  # eta decides
    assert rows["ddpm"]["stochastic"] is True
    assert rows["diffusers"]["walks_noise_levels"] is False


def test_text_shows_order_calls_noise_and_schedule_in_columns():
    result = run_cli("list", "samplers")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "samplers:"
    assert lines[1].split() == ["name", "order", "calls", "noise", "schedule", "summary",
                                "[plugin]"]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == set(default_registry().names("scheduler"))
    assert rows["heun"].split()[:5] == ["heun", "2", "2", "deterministic", "yes"]
    assert rows["dpm2-ancestral"].split()[:5] == ["dpm2-ancestral", "2", "2", "stochastic", "yes"]
    assert rows["ddpm"].split()[:5] == ["ddpm", "-", "1", "stochastic", "yes"]  # no order
    assert rows["ddim"].split()[:6] == ["ddim", "1", "1", "set", "by", "options"]
    assert rows["diffusers"].split()[5:8] == ["options", "no", "any"]  # refuses --schedule
    assert rows["heun"].endswith("[diffplug-ksamplers]")

    # the columns line up whatever the name's length
    def second_column(line: str) -> int:
        return len(line) - len(line[2 + len(line.split()[0]) :].lstrip())

    assert len({second_column(line) for line in lines[1:]}) == 1


def test_a_sampler_that_fails_to_import_is_listed_with_its_error(broken_plugin):
    result = run_cli("list", "samplers", env=broken_plugin)
    assert result.code == 0, result.err
    rows = {line.split()[0]: line for line in result.out.splitlines()[2:]}
    assert "cannot load:" in rows["missing-module"]
    assert "fixture_lazy_nowhere" in rows["missing-module"]
    assert "RuntimeError: broken on purpose" in rows["raises-at-import"]
    assert "SystemExit: 4" in rows["exits-at-import"]
    assert "cannot load" in rows["no-such-class"]
    for name in ("missing-module", "raises-at-import", "exits-at-import", "no-such-class"):
        assert rows[name].endswith("[fixture-lazy-samplers]"), rows[name]
    assert rows["heun"].split()[:5] == ["heun", "2", "2", "deterministic", "yes"]  # the rest
    data = json.loads(run_cli("list", "samplers", "--json", env=broken_plugin).out)
    by_name = {row["name"]: row for row in data["scheduler"]}
    broken = by_name["raises-at-import"]
    assert "broken on purpose" in broken["error"] and all(broken[k] is None for k in FACTS)
    assert by_name["ddim"]["error"] is None


def test_fixture_plugins_that_break_their_interface_are_listed_too():
    result = run_cli("list", "samplers", env={"DIFFPLUG_PLUGINS": "fixture_bad_components"})
    assert result.code == 0, result.err
    rows = {line.split()[0]: line for line in result.out.splitlines()[2:]}
    assert "is not a subclass" in rows["not-a-scheduler"]
    assert "does not implement plan" in rows["abstract"]
    # a class that only explodes when built still has its attributes to show
    assert rows["explodes"].split()[:2] == ["explodes", "-"]


def test_info_still_says_the_same():
    out = run_cli("info", "heun").out
    assert "order 2.0, 2 denoiser call(s) per step, deterministic, default 25 steps" in out
    assert "takes --schedule NAME (default: karras)" in out
    assert "noise set by its options" in run_cli("info", "ddim").out
    assert "chooses its own steps (no --schedule)" in run_cli("info", "diffusers").out


def test_the_other_listings_import_no_plugin_code():
    """`list` (every kind) and `list --json` name the samplers from the registry alone, as
    before: no sampler module, and not torch, is imported."""
    probe = ("sorted(m for m in sys.modules if m == 'torch' or m.startswith('diffplug_')"
             " and not m.endswith('.plugin') and '.' in m)")  # fmt: skip
    _, loaded = modules_after(["list"], ["list", "--json"], ["list", "schedules"], probe=probe)
    assert loaded == "[]"
    rows = json.loads(run_cli("list", "--json").out)["scheduler"]
    assert rows and all(set(row) == {"name", "plugin", "summary"} for row in rows)
