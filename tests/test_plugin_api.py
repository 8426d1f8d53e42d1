"""The public plugin API: core names no plugin, and plugin authors get clear reports.

A misspelt hook, a plugin that calls sys.exit() at import, an unknown name: each is one
line naming the plugin (and the fix), while every other plugin keeps working.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from cliutil import assert_clean_error, run_cli
from safetensors.torch import save_file

from diffplug import hookimpl
from diffplug.checkpoint import read_metadata
from diffplug.errors import PluginError, UnknownComponentError
from diffplug.method import Method
from diffplug.registry import Entry, Registry, default_registry
from diffplug.testing import fresh_registry

CORE = Path(__file__).resolve().parents[1] / "core" / "src" / "diffplug"
FIRST_PARTY = ("ddpm", "ddim", "adm", "imagen", "noise-aug", "vae", "diffusers", "heun")
#: every spelling of a first-party distribution: ``diffplug-noise-aug``, ``diffplug_noise_aug``
PLUGIN_NAMES = re.compile(
    r"diffplug[-_](?:" + "|".join(n.replace("-", "[-_]") for n in FIRST_PARTY) + r")\b"
)
#: components the first-party plugins register, which a bare core does not have
ELSEWHERE = [
    ("scheduler", "ddpm"),
    ("scheduler", "ddim"),
    ("scheduler", "adm"),
    ("denoiser", "unet"),
    ("method", "vae"),
    ("pretrained", "ddpm-digits"),
    ("pipeline", "imagen"),
    ("autoencoder", "kl-vae"),
]
NO_AUTOLOAD = {"DIFFPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"}


# -- core names no plugin --------------------------------------------------------------------


def test_no_core_source_names_a_plugin_distribution():
    offending = [
        f"{path.relative_to(CORE.parent)}:{number}: {line.strip()}"
        for path in sorted(CORE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PLUGIN_NAMES.search(line)
    ]
    assert offending == [], "\n".join(offending)


@pytest.mark.parametrize("kind, name", ELSEWHERE)
def test_an_unknown_name_names_no_plugin_it_did_not_see(kind, name):
    with pytest.raises(UnknownComponentError) as info:
        fresh_registry().get(kind, name)
    message = str(info.value)
    assert PLUGIN_NAMES.search(message) is None, message
    assert "\n" not in message
    assert "No installed plugin registers it" in message
    assert "`diffplug plugins`" in message


def test_an_unknown_name_names_the_plugins_that_failed_or_were_blocked():
    reg = Registry(autoload=False, modules=["fixture_broken_import"], strict=False)
    with pytest.raises(UnknownComponentError) as info:
        reg.get("scheduler", "ddim")
    message = str(info.value)
    assert "fixture-broken-import" in message and "a_dependency_that_is_not_installed" in message
    assert PLUGIN_NAMES.search(message) is None, message
    reg = Registry(autoload=True, blocked=["diffplug-adm"])
    with pytest.raises(UnknownComponentError, match="DIFFPLUG_BLOCK_PLUGINS: diffplug-adm"):
        reg.get("scheduler", "adm")


# -- misspelt hooks --------------------------------------------------------------------------


def test_a_misspelt_hook_is_reported_and_the_plugins_correct_hooks_still_work():
    env = {**NO_AUTOLOAD, "DIFFPLUG_PLUGINS": "fixture_misspelt_hook"}
    result = run_cli("plugins", "--json", env=env)
    assert result.code == 0, result.err
    row = {r["name"]: r for r in json.loads(result.out)}["fixture-misspelt-hook"]
    assert row["error"] is None
    assert row["components"] == {"scheduler": ["misspelt-ok"]}
    [warning] = row["warnings"]
    assert "register_sampler" in warning and "did you mean register_schedulers?" in warning
    [line] = result.err.splitlines()
    assert line.startswith("diffplug: warning: plugin fixture-misspelt-hook")
    assert "register_sampler" in line and "register_schedulers" in line
    text = run_cli("plugins", env=env)
    assert "  warning: implements register_sampler" in text.out
    info = run_cli("info", "misspelt-ok", env=env)
    assert info.code == 0 and "from fixture-misspelt-hook" in info.out
    from diffplug_ddim.scheduler import DDIM

    reg = Registry(autoload=False, modules=["fixture_misspelt_hook"], strict=False)
    assert reg.load("scheduler", "misspelt-ok") is DDIM
    assert "never-registered" not in reg.names("scheduler")


def test_a_misspelt_hook_is_an_error_in_strict_mode(monkeypatch):
    monkeypatch.setenv("DIFFPLUG_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="register_sampler.*did you mean register_schedulers"):
        Registry(autoload=False, modules=["fixture_misspelt_hook"])


class _Misspelt:
    """Hooks spelt as authors get them wrong: singular, a typo, one marked optional."""

    __name__ = "misspelt-object"

    @hookimpl
    def register_denoiser(self, register):
        pass

    @hookimpl
    def register_pipline(self, register):
        pass

    @hookimpl(optionalhook=True)
    def register_from_another_plugins_spec(self, register):
        pass


def test_each_misspelt_hook_gets_the_closest_real_hook_and_optional_ones_none(capsys):
    reg = fresh_registry(_Misspelt(), strict=False)
    warnings = sorted(reg.plugins["misspelt-object"].warnings)
    assert len(warnings) == 2, warnings
    assert "register_denoiser," in warnings[0] and "register_denoisers?" in warnings[0]
    assert "register_pipline," in warnings[1] and "register_pipelines?" in warnings[1]
    assert capsys.readouterr().err.count("diffplug: warning:") == 2
    with pytest.raises(UnknownComponentError, match="misspelt hook: misspelt-object"):
        reg.get("denoiser", "nope")


# -- isolation from sys.exit() ---------------------------------------------------------------


def test_a_plugin_calling_sys_exit_at_import_is_reported_and_the_rest_works():
    env = {"DIFFPLUG_PLUGINS": "fixture_sys_exit"}
    result = run_cli("list", "samplers", env=env)
    assert result.code == 0, result.err
    assert "ddim" in result.out
    [line] = result.err.splitlines()
    assert "plugin fixture-sys-exit failed to load: SystemExit: 3" in line
    rows = {r["name"]: r for r in json.loads(run_cli("plugins", "--json", env=env).out)}
    assert "SystemExit" in rows["fixture-sys-exit"]["error"]
    assert rows["fixture-sys-exit"]["components"] == {}


def test_sys_exit_when_a_component_loads_or_is_built_is_a_plugin_error(monkeypatch):
    entry = Entry("scheduler", "exits", "fixture_sys_exit:Anything", "fixture-sys-exit")
    with pytest.raises(PluginError, match="plugin fixture-sys-exit: cannot load.*SystemExit"):
        entry.load()

    class Exits:
        def __init__(self):
            raise SystemExit(4)

    monkeypatch.setattr(Entry, "load", lambda self: Exits)
    with pytest.raises(PluginError, match="building scheduler 'exits' failed: SystemExit: 4"):
        entry.construct()


# -- diffplug info FILE, and info NAME across kinds ------------------------------------------


def test_info_describes_a_checkpoint_file_with_its_sha256():
    path = default_registry().get("pretrained", "ddpm-digits").load()
    meta = read_metadata(path)
    result = run_cli("info", path)
    assert result.code == 0, result.err
    assert f"kind: {meta['kind']}" in result.out
    assert f"component: {meta['plugin']}:{meta['name']}" in result.out
    for key, value in meta["config"].items():
        assert f"    {key} = {value!r}" in result.out
    assert f"command: {json.dumps(meta['extra']['command'])}" in result.out
    [digest] = re.findall(r"sha256: ([0-9a-f]+)$", result.out, re.MULTILINE)
    assert len(digest) == 64
    assert digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_info_on_a_missing_broken_or_foreign_file_is_one_clean_line(tmp_path):
    assert_clean_error(run_cli("info", str(tmp_path / "gone.safetensors")), "no such checkpoint")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_clean_error(run_cli("info", str(broken)), "not a safetensors file")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert_clean_error(run_cli("info", str(foreign)), "not a diffplug checkpoint")
    for result in (run_cli("info", str(broken)), run_cli("info", str(foreign))):
        assert len(result.err.splitlines()) == 1


def test_info_name_across_kinds_qualified_names_and_stray_files(tmp_path, monkeypatch):
    both = run_cli("info", "ddpm")
    assert_clean_error(both, "names a sampler and a method", "--kind sampler", "--kind method")
    assert run_cli("info", "ddpm", "--kind", "sampler").code == 0
    assert run_cli("info", "ddpm", "--kind", "method").code == 0
    assert "from diffplug-ddim" in run_cli("info", "diffplug-ddim:ddim").out
    assert_clean_error(run_cli("info", "diffplug-ddim:ddpm"), "nothing named 'diffplug-ddim:ddpm'")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ddim").write_text("a stray file named like a sampler")
    assert "ddim (sampler)" in run_cli("info", "ddim").out


# -- the default denoiser is the method plugin's, not core's ---------------------------------


def test_core_names_no_default_denoiser_and_each_method_declares_its_own():
    assert Method.default_denoiser is None
    reg = default_registry()
    for name in reg.names("method"):
        method = reg.load("method", name)
        assert method.default_denoiser is not None, name
        reg.get(method.trains, method.default_denoiser)  # a model the plugins register


def test_train_without_a_default_denoiser_asks_for_one(tmp_path, monkeypatch):
    from diffplug_ddpm.method import DDPMMethod

    monkeypatch.setattr(DDPMMethod, "default_denoiser", None)
    result = run_cli("train", "--method", "ddpm", "--steps", "1", "--out", str(tmp_path / "r"))
    assert_clean_error(result, "pass --denoiser NAME", "unet")
    assert not (tmp_path / "r").exists()
