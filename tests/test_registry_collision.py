"""A third-party plugin that registers a pretrained name a first-party or core plugin already
uses never changes the default path: `run` with no --model takes the intended model by its
qualified name, warns once naming both plugins, and `--model PLUGIN:NAME` picks either.

The third-party plugin is installed the way pip would: a package and a ``*.dist-info`` with
its entry point, on ``sys.path``."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from cliutil import assert_clean_error, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffplug.checkpoint import file_sha256
from diffplug.output import read_recipe
from diffplug.registry import default_registry

#: sorts before every diffplug-* distribution, so plain name order would pick it first
DIST, MODULE = "acme-models", "acme_models"
FAST = ["--steps", "2", "--num-samples", "2", "-q"]

PLUGIN = '''"""A third-party plugin whose model names collide with installed ones."""

from diffplug import hookimpl


@hookimpl
def register_pretrained(register):
{registrations}


@hookimpl
def register_denoisers(register):
    register("acme-unet", "diffplug_ddpm.unet:UNet", "acme's copy of a UNet")
'''


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install({name: weights file}) -> an installed third-party plugin registering them."""

    def make(models: dict[str, object]) -> None:
        site = tmp_path / "site"
        package = site / MODULE
        (package / "weights").mkdir(parents=True)
        lines = []
        for name, source in models.items():
            shutil.copy(source, package / "weights" / f"{name}.safetensors")
            lines.append(f'    register("{name}", "{MODULE}:weights/{name}.safetensors", "acme")')
        (package / "__init__.py").write_text(PLUGIN.format(registrations="\n".join(lines)))
        info = site / f"{MODULE}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[diffplug]\n{DIST} = {MODULE}\n")
        monkeypatch.syspath_prepend(str(site))

    yield make
    sys.modules.pop(MODULE, None)


def _genuine() -> str:
    return default_registry().get("pretrained", "diffplug-ddpm:ddpm-digits").load()


def _variant(tmp_path, plugin: str | None = None):
    """The shipped DDPM weights, changed (so the two models differ), recorded as a component
    of ``plugin`` (default: the file's own, a re-registration of diffplug-ddpm's UNet)."""
    with safe_open(_genuine(), "pt") as fh:
        meta = fh.metadata()
    if plugin is not None:
        meta |= {"diffplug.plugin": plugin, "diffplug.name": "acme-unet"}
    state = load_file(_genuine())
    state = {k: v * 0.5 if k == sorted(state)[-1] else v for k, v in state.items()}
    path = tmp_path / "variant.safetensors"
    save_file(state, str(path), metadata=meta)
    return path


def _warning(err: str) -> str:
    [line] = [line for line in err.splitlines() if "registered by several plugins" in line]
    return line


@pytest.mark.parametrize("own", [False, True], ids=["reregistered", "own-component"])
def test_a_colliding_model_name_keeps_the_default_and_both_stay_reachable(tmp_path, install, own):
    variant = _variant(tmp_path, plugin=DIST if own else None)
    install({"ddpm-digits": variant})
    out = tmp_path / "default.png"
    result = run_cli("run", "--sampler", "ddim", *FAST, "-o", str(out))
    assert result.code == 0, result.err
    line = _warning(result.err)
    assert line.startswith("diffplug: warning: pretrained 'ddpm-digits'")
    assert "acme-models" in line and "diffplug-ddpm" in line
    assert "the default is diffplug-ddpm:ddpm-digits" in line
    assert "using model diffplug-ddpm:ddpm-digits (diffplug-ddpm)" in result.err
    recipe = read_recipe(out)["model"]
    assert recipe["source"] == "diffplug-ddpm:ddpm-digits"
    assert recipe["sha256"] == file_sha256(_genuine())
    # the replay of a default run names the model it used, so it resolves despite the clash
    assert run_cli("run", "--recipe", str(out), "-o", str(tmp_path / "again.png")).code == 0
    # either one by its qualified name; the bare name is refused, naming both
    for name, weights in (("acme-models:ddpm-digits", variant),
                          ("diffplug-ddpm:ddpm-digits", _genuine())):  # fmt: skip
        picked = tmp_path / f"{name.split(':')[0]}.png"
        result = run_cli("run", "--sampler", "ddim", "--model", name, *FAST, "-o", str(picked))
        assert result.code == 0, result.err
        assert read_recipe(picked)["model"]["sha256"] == file_sha256(weights)
        assert "registered by several plugins" not in result.err  # chosen: nothing to warn
    result = run_cli("run", "--sampler", "ddim", "--model", "ddpm-digits", *FAST,
                     "-o", str(tmp_path / "bare.png"))  # fmt: skip
    assert_clean_error(result, "acme-models:ddpm-digits", "diffplug-ddpm:ddpm-digits")
    assert not (tmp_path / "bare.png").exists()


def test_a_model_name_that_collides_with_cores_keeps_cores(tmp_path, install):
    """With no plugin model installed, core's reference model is the default; a plugin
    loaded by module name that reuses its name does not displace it."""
    install({"gmm-digits": default_registry().get("pretrained", "diffplug:gmm-digits").load()})
    env = {"DIFFPLUG_DISABLE_PLUGIN_AUTOLOAD": "1",
           "DIFFPLUG_PLUGINS": f"fixture_vp_sampler,{MODULE}"}  # fmt: skip
    out = tmp_path / "o.png"
    result = run_cli("run", "--sampler", "fixture-ddim", *FAST, "-o", str(out), env=env)
    assert result.code == 0, result.err
    assert "the default is diffplug:gmm-digits" in _warning(result.err)
    assert read_recipe(out)["model"]["source"] == "diffplug:gmm-digits"
    listing = json.loads(run_cli("list", "models", "--json", env=env).out)["pretrained"]
    assert {row["name"] for row in listing} >= {"diffplug:gmm-digits", "acme-models:gmm-digits"}


def test_a_colliding_autoencoder_name_does_not_break_the_latent_models(tmp_path, install):
    """A latent model records its autoencoder by bare name (`vae-digits`); with a second
    plugin registering that name, the recorded one still resolves (the intended one, whose
    fingerprint the model checks), from the CLI and from Python."""
    import diffplug

    genuine = default_registry().get("pretrained", "diffplug-vae:vae-digits").load()
    install({"vae-digits": genuine})
    out = tmp_path / "latent.png"
    result = run_cli("run", "--sampler", "ddim", "--model", "imagen-latent-digits",
                     "--prompt", "seven", *FAST, "-o", str(out))  # fmt: skip
    assert result.code == 0, result.err
    run = diffplug.load(model="imagen-latent-digits", sampler="ddim", steps=2)
    assert run.sample(2, seed=0, prompt="seven").tensor.shape[0] == 2
