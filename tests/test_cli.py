"""The CLI: listing without torch, run outputs with recipes, and every bad input -> exit 2."""

import json
import struct
from pathlib import Path

import pytest
import torch
from cliutil import assert_clean_error, modules_after, run_cli, run_subprocess
from PIL import Image
from safetensors.torch import load_file, save_file

from diffplug.checkpoint import save_component
from diffplug.components import IdentityAutoencoder
from diffplug.output import read_recipe

FAST = ("--model", "gmm-digits", "--steps", "5", "--num-samples", "4", "--quiet")


def test_listing_commands_never_import_torch():
    # `list samplers` imports the sampler classes to show their order (test_list_samplers)
    _, torch_loaded = modules_after(["--help"], ["plugins"], ["plugins", "--json"], ["list"],
                                    ["list", "models"])  # fmt: skip
    assert torch_loaded == "False"


def test_python_dash_m_works():
    result = run_subprocess("list", "samplers")
    assert result.code == 0 and "ddim" in result.out


def test_plugins_json_lists_versions_components_and_errors():
    result = run_cli("plugins", "--json", env={"DIFFPLUG_PLUGINS": "fixture_broken_import"})
    assert result.code == 0
    rows = {row["name"]: row for row in json.loads(result.out)}
    assert rows["diffplug-ddim"]["components"] == {"scheduler": ["ddim"]}
    assert rows["diffplug-ddim"]["version"] == "0.1.0"
    assert "a_dependency_that_is_not_installed" in rows["fixture-broken-import"]["error"]
    assert "fixture-broken-import failed to load" in result.err  # one line on stderr


def test_list_and_info_show_components_and_options():
    result = run_cli("list", "samplers", "--json")
    names = {row["name"] for row in json.loads(result.out)["scheduler"]}
    assert {"ddim", "ddpm"} <= names
    info = run_cli("info", "ddim")
    assert info.code == 0
    assert "--eta" in info.out and "default 0.0" in info.out and "quadratic" in info.out
    assert run_cli("info", "gmm-digits").code == 0


def test_run_writes_a_png_grid_with_the_recipe(tmp_path):
    out = tmp_path / "grid.png"
    result = run_cli(
        "run", "--sampler", "ddim", *FAST, "--eta", "0.5", "--seed", "7", "-o", str(out)
    )
    assert result.code == 0, result.err
    with Image.open(out) as im:
        assert im.mode == "L" and min(im.size) >= 2 * 32  # 2x2 grid of >= 32 px cells
    recipe = read_recipe(out)
    assert recipe["sampler"] == {
        "name": "ddim",
        "plugin": "diffplug-ddim",
        "version": "0.1.0",
        "options": {
            "eta": 0.5,
            "spacing": "leading",
            "steps_offset": 0,
            "clip_sample": False,
            "final_alpha": "one",
        },
    }
    assert recipe["seeds"] == [7, 8, 9, 10]
    assert recipe["model"]["name"] == "gmm-digits"
    assert recipe["versions"]["diffplug-ddim"] == "0.1.0"
    assert recipe["timesteps"] == [800, 600, 400, 200, 0]


def test_run_writes_safetensors_in_unit_range_and_is_reproducible(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run_cli("run", "--sampler", "ddpm", *FAST, "-o", str(a)).code == 0
    assert run_cli("run", "--sampler", "ddpm", *FAST, "--batch-size", "3", "-o", str(b)).code == 0
    x, y = load_file(a)["samples"], load_file(b)["samples"]
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, y)  # batch size does not change samples
    assert read_recipe(a)["sampler"]["name"] == "ddpm"


def test_run_without_model_uses_and_names_the_shipped_default(tmp_path):
    out = tmp_path / "x.safetensors"
    result = run_cli(
        "run", "--sampler", "ddim", "--steps", "10", "--num-samples", "6", "-q", "-o", str(out)
    )
    assert result.code == 0, result.err
    assert "using model ddpm-digits (diffplug-ddpm)" in result.err
    samples = load_file(out)["samples"]
    assert samples.shape == (6, 1, 8, 8) and torch.isfinite(samples).all()
    assert 0 <= samples.min() and samples.max() <= 1 and samples.std() > 0.2
    recipe = read_recipe(out)
    assert (
        recipe["model"]["name"] == "ddpm-digits"
        and recipe["model"]["config"]["prediction"] == "eps"
    )


def test_third_party_plugin_runs_through_the_cli(tmp_path):
    out = tmp_path / "x.png"
    result = run_cli("run", "--sampler", "example-heun", *FAST, "-o", str(out))
    assert result.code == 0, result.err
    recipe = read_recipe(out)
    assert recipe["sampler"]["name"] == "example-heun"
    assert recipe["sampler"]["plugin"] == "diffplug-heun"
    assert (recipe["steps"], recipe["evaluations"]) == (5, 9)  # 5 Heun steps, the last Euler's


# -- bad input: exit 2, one clear line, no traceback, nothing written ----------------------


def _bad(tmp_path, *args, env=None, needles=()):
    out = tmp_path / "out.png"
    result = run_cli("run", *args, "-o", str(out), env=env)
    assert_clean_error(result, *needles)
    assert list(tmp_path.iterdir()) == [] or not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    return result


def test_unknown_sampler(tmp_path):
    _bad(tmp_path, "--sampler", "ddimm", needles=("unknown sampler 'ddimm'", "ddim, ddpm"))


def test_sampler_from_a_missing_plugin_names_the_package(tmp_path):
    # the workspace installs every plugin; blocking one is what not having it looks like
    env = {"DIFFPLUG_BLOCK_PLUGINS": "diffplug-adm"}
    _bad(tmp_path, "--sampler", "adm", env=env, needles=("DIFFPLUG_BLOCK_PLUGINS: diffplug-adm",))


def test_unknown_model(tmp_path):
    _bad(
        tmp_path,
        "--sampler",
        "ddim",
        "--model",
        "nope",
        needles=("unknown pretrained 'nope'", "gmm-digits"),
    )


def test_unknown_sampler_option_lists_the_options(tmp_path):
    _bad(
        tmp_path,
        "--sampler",
        "ddim",
        *FAST,
        "--etaa",
        "1",
        needles=("no option --etaa", "--eta", "--spacing"),
    )


@pytest.mark.parametrize(
    "steps, needle", [("0", "--steps"), ("-3", "--steps"), ("1001", "between 1 and 1000")]
)
def test_steps_out_of_range(tmp_path, steps, needle):
    _bad(
        tmp_path, "--sampler", "ddim", "--model", "gmm-digits", "--steps", steps, needles=(needle,)
    )


def test_negative_eta(tmp_path):
    _bad(tmp_path, "--sampler", "ddim", *FAST, "--eta", "-0.1", needles=("--eta must be >= 0",))


def test_bad_option_value_type(tmp_path):
    _bad(tmp_path, "--sampler", "ddim", *FAST, "--eta", "lots", needles=("--eta expects float",))
    _bad(tmp_path, "--sampler", "ddim", *FAST, "--spacing", "cubic", needles=("must be one of",))
    for value in ("nan", "inf", "-inf"):  # nan passes every min/max comparison
        _bad(tmp_path, "--sampler", "ddim", *FAST, "--eta", value, needles=("--eta expects float",))


def test_num_samples_must_be_positive(tmp_path):
    _bad(tmp_path, "--sampler", "ddim", "--num-samples", "0", needles=("--num-samples",))


def test_output_in_a_missing_directory(tmp_path):
    result = run_cli("run", "--sampler", "ddim", *FAST, "-o", str(tmp_path / "nope" / "x.png"))
    assert_clean_error(result, "does not exist")
    assert not (tmp_path / "nope").exists()


def test_output_with_unknown_extension(tmp_path):
    result = run_cli("run", "--sampler", "ddim", *FAST, "-o", str(tmp_path / "x.jpg"))
    assert_clean_error(result, "unknown extension '.jpg'")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"precious")
    assert_clean_error(run_cli("run", "--sampler", "ddim", *FAST, "-o", str(out)), "--overwrite")
    assert out.read_bytes() == b"precious"
    assert run_cli("run", "--sampler", "ddim", *FAST, "-o", str(out), "--overwrite").code == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def _checkpoint_case(tmp_path, name, content):
    path = tmp_path / "models" / name
    path.parent.mkdir()
    path.write_bytes(content)
    out = tmp_path / "out.png"
    result = run_cli("run", "--sampler", "ddim", "--model", str(path), "-o", str(out))
    assert not out.exists()
    return result


def test_truncated_checkpoint(tmp_path):
    from diffplug.registry import default_registry

    good = default_registry().get("pretrained", "gmm-digits").load()
    data = Path(good).read_bytes()
    result = _checkpoint_case(tmp_path, "cut.safetensors", data[: len(data) - 100])
    assert_clean_error(result, "truncated")


def test_not_a_safetensors_file(tmp_path):
    assert_clean_error(
        _checkpoint_case(tmp_path, "x.safetensors", b"hello world, not tensors"),
        "not a safetensors file",
    )


def test_pickle_checkpoints_are_refused_by_name_and_by_content(tmp_path):
    assert_clean_error(_checkpoint_case(tmp_path, "model.ckpt", b"\x80\x04\x95"), "pickle")
    # a torch.save zip renamed to .safetensors is caught by its magic bytes
    renamed = _write(tmp_path, "z.safetensors", b"PK\x03\x04" + b"\0" * 64)
    result = run_cli(
        "run", "--sampler", "ddim", "--model", str(renamed), "-o", str(tmp_path / "o.png")
    )
    assert_clean_error(result, "pickle")


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_checkpoint_of_the_wrong_kind(tmp_path):
    path = tmp_path / "ae.safetensors"
    save_component(IdentityAutoencoder(), path, kind="autoencoder")
    result = run_cli(
        "run", "--sampler", "ddim", "--model", str(path), "-o", str(tmp_path / "o.png")
    )
    assert_clean_error(result, "autoencoder checkpoint, but a denoiser is needed")


def test_safetensors_without_diffplug_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    result = run_cli(
        "run", "--sampler", "ddim", "--model", str(path), "-o", str(tmp_path / "o.png")
    )
    assert_clean_error(result, "not a diffplug checkpoint")


def test_hostile_header_size_is_refused_before_allocation(tmp_path):
    path = _write(tmp_path, "h.safetensors", struct.pack("<Q", 2**62) + b"{}")
    result = run_cli(
        "run", "--sampler", "ddim", "--model", str(path), "-o", str(tmp_path / "o.png")
    )
    assert_clean_error(result, "bad header size")


def test_asking_for_a_component_of_a_plugin_that_raised_on_import(tmp_path):
    result = _bad(
        tmp_path,
        "--sampler",
        "broken",
        env={"DIFFPLUG_PLUGINS": "fixture_broken_import"},
        needles=(
            "unknown sampler 'broken'",
            "fixture-broken-import",
            "a_dependency_that_is_not_installed",
        ),
    )
    assert result.err.count("fixture-broken-import failed to load") == 1


def _run_fixture_model(tmp_path, module_name: str, model, steps: int):
    """Save ``model`` (a component of the fixture plugin ``module_name``) and run DDIM on it."""
    import importlib

    from diffplug.checkpoint import save_component
    from diffplug.testing import registered

    with registered(importlib.import_module(module_name)):
        path = tmp_path / "model.safetensors"
        save_component(model, path, kind="denoiser")
    out = tmp_path / "o.png"
    result = run_cli("run", "--sampler", "ddim", "--model", str(path), "--steps", str(steps),
                     "-q", "-o", str(out), env={"DIFFPLUG_PLUGINS": module_name})  # fmt: skip
    return result, out


def test_nonfinite_denoiser_output_stops_with_step_and_sample(tmp_path):
    from fixture_nan_model import NaNConfig, NaNDenoiser

    result, out = _run_fixture_model(
        tmp_path, "fixture_nan_model", NaNDenoiser(NaNConfig(size=4)), 10
    )
    assert result.code == 1
    assert "NaN or Inf at step 6/10 (t=400)" in result.err and "seed 0" in result.err
    assert not out.exists()


def test_plugins_can_add_commands_listed_without_import():
    env = {"DIFFPLUG_PLUGINS": "fixture_command"}
    assert "say hello (from a plugin)" in run_cli("--help", env=env).out
    result = run_cli("hello", "there", env=env)
    assert result.code == 0 and result.out == "hello, there\n"


@pytest.mark.parametrize(
    "sampler, needle",
    [
        ("explodes", "building scheduler 'explodes' failed: RuntimeError: constructor exploded"),
        ("not-a-scheduler", "is not a subclass of diffplug.components.Scheduler"),
        ("abstract", "does not implement plan"),
    ],
)
def test_broken_components_are_reported_with_their_plugin(tmp_path, sampler, needle):
    env = {"DIFFPLUG_PLUGINS": "fixture_bad_components"}
    result = run_cli("run", "--sampler", sampler, *FAST, "-o", str(tmp_path / "x.png"), env=env)
    assert_clean_error(result, "plugin fixture-bad-components", needle)
    assert not (tmp_path / "x.png").exists()
    ok = run_cli("run", "--sampler", "ddim", *FAST, "-o", str(tmp_path / "y.png"), env=env)
    assert ok.code == 0  # the other plugins are unaffected


def test_a_denoiser_returning_the_wrong_shape_is_reported(tmp_path):
    from fixture_bad_components import ShapeConfig, WrongShape

    result, _ = _run_fixture_model(
        tmp_path, "fixture_bad_components", WrongShape(ShapeConfig(size=4)), 3
    )
    assert_clean_error(
        result,
        "fixture_bad_components.WrongShape breaks its contract",
        "shape (64, 1, 4, 4)) but returned [(64, 1, 4, 2)]",
    )


def test_weights_that_disagree_with_their_config_are_refused_before_reading(tmp_path):
    import json

    from safetensors import safe_open

    from diffplug.registry import default_registry

    good = default_registry().get("pretrained", "ddpm-digits").load()
    with safe_open(good, "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    config = json.loads(meta["diffplug.config"])
    config["width"] = 16  # the file's tensors were built with width 32
    meta["diffplug.config"] = json.dumps(config)
    path = tmp_path / "lying.safetensors"
    save_file(tensors, str(path), metadata=meta)
    result = run_cli(
        "run", "--sampler", "ddim", "--model", str(path), "-o", str(tmp_path / "o.png")
    )
    assert_clean_error(result, "weights do not match the config", "shapes")
