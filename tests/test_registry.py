"""The plugin registry: names, qualification, ambiguity, isolation of broken plugins."""

import pytest

from diffplug.errors import AmbiguousComponentError, PluginError, UnknownComponentError
from diffplug.registry import Registry
from diffplug.testing import fresh_registry, registered


def test_first_party_plugins_register_by_bare_and_qualified_name():
    reg = Registry(autoload=True, blocked=())
    assert reg.get("scheduler", "ddim").dist == "diffplug-ddim"
    assert reg.get("sampler", "diffplug-ddim:ddim").name == "ddim"
    assert reg.get("scheduler", "ddpm").target == "diffplug_ddpm.scheduler:DDPM"
    assert reg.get("process", "vp").dist == "diffplug"
    assert "ddim" in reg.names("samplers")


def test_unknown_name_lists_installed_and_says_where_to_look():
    reg = fresh_registry()
    with pytest.raises(UnknownComponentError) as info:
        reg.get("scheduler", "ddim")
    message = str(info.value)
    assert "unknown sampler 'ddim'" in message
    assert "No installed plugin registers it; `diffplug plugins` lists" in message
    with pytest.raises(UnknownComponentError, match="installed: gmm-oracle"):
        reg.get("denoiser", "nope")


class _AnotherDdim:
    """A second plugin (a hook object) registering the bare name 'ddim'."""

    __name__ = "another-ddim"

    from diffplug import hookimpl

    @hookimpl
    def register_schedulers(self, register):
        register("ddim", "fixture_vp_sampler:FixtureDDIM", "a ddim of its own")


def test_two_plugins_with_one_bare_name_are_ambiguous_never_last_wins():
    for order in ([_AnotherDdim(), "fixture_clash"], ["fixture_clash", _AnotherDdim()]):
        reg = fresh_registry(*order)
        with pytest.raises(AmbiguousComponentError) as info:
            reg.get("scheduler", "ddim")
        assert "another-ddim:ddim" in str(info.value)
        assert "fixture-clash:ddim" in str(info.value)
        assert reg.get("scheduler", "another-ddim:ddim").target == "fixture_vp_sampler:FixtureDDIM"
        assert reg.get("scheduler", "fixture-clash:ddim").summary == "an impostor ddim"
        assert reg.get("scheduler", "clash-unique").dist == "fixture-clash"
        assert {"another-ddim:ddim", "fixture-clash:ddim"} <= set(reg.names("scheduler"))


@pytest.mark.parametrize(
    "module, error",
    [
        ("fixture_broken_import", "a_dependency_that_is_not_installed"),
        ("fixture_raises_in_hook", "registration exploded"),
        ("fixture_bad_name", "invalid scheduler name 'Bad Name!'"),
        ("fixture_bad_target", "target must be 'package.module:attr'"),
    ],
)
def test_a_broken_plugin_is_reported_and_the_others_keep_working(module, error, capsys):
    reg = fresh_registry("fixture_vp_sampler", module, strict=False)
    info = reg.plugins[module.replace("_", "-")]
    assert error in info.error
    assert info.entries == []  # all or nothing: a half-registered plugin contributes nothing
    assert reg.get("scheduler", "fixture-ddim").dist == "fixture-vp-sampler"
    assert reg.plugins["fixture-vp-sampler"].error is None
    assert "half-registered" not in reg.names("scheduler")
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and module.replace("_", "-") in stderr


def test_strict_mode_turns_a_broken_plugin_into_an_error(monkeypatch):
    monkeypatch.setenv("DIFFPLUG_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="fixture-broken-import failed to load"):
        Registry(autoload=False, modules=["fixture_broken_import"], blocked=())


def test_block_and_autoload_switches(monkeypatch):
    monkeypatch.setenv("DIFFPLUG_BLOCK_PLUGINS", "diffplug-ddim")
    reg = Registry()
    assert "ddim" not in reg.names("scheduler") and "ddpm" in reg.names("scheduler")
    monkeypatch.delenv("DIFFPLUG_BLOCK_PLUGINS")
    monkeypatch.setenv("DIFFPLUG_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry()
    assert set(reg.plugins) == {"diffplug"}
    monkeypatch.setenv("DIFFPLUG_PLUGINS", "fixture_clash")
    reg = Registry()
    assert reg.get("scheduler", "ddim").dist == "fixture-clash"  # the only ddim now


def test_a_target_that_fails_to_import_is_reported_when_used():
    reg = Registry(autoload=False, modules=["fixture_bad_target"], strict=False)
    assert reg.plugins["fixture-bad-target"].error  # the denoiser registration was invalid
    reg = fresh_registry(_OnlyLazyBroken(), strict=True)
    with pytest.raises(PluginError, match="cannot load scheduler 'lazy-broken'"):
        reg.load("scheduler", "lazy-broken")


class _OnlyLazyBroken:
    """A plugin object (not a module): registries accept any object with hook methods."""

    __name__ = "only-lazy-broken"

    from diffplug import hookimpl

    @hookimpl
    def register_schedulers(self, register):
        register("lazy-broken", "fixture_does_not_exist.module:Thing")


def test_registered_context_manager_scopes_a_plugin_to_a_block():
    from diffplug.registry import default_registry

    with registered(_OnlyLazyBroken(), autoload=False) as reg:
        assert default_registry() is reg
        assert "lazy-broken" in reg.names("scheduler")
    assert "lazy-broken" not in default_registry().names("scheduler")
