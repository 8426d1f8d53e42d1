"""The dual UNet: contract, condition encoder, preconditioning, checkpoints, training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffplug import UserError, default_registry, load_component, read_metadata, save_component
from diffplug.testing import check_denoiser
from diffplug_adm.dual_unet import DualUNet, DualUNetConfig, grid_encoding

SIZE = 8


def _inputs(batch: int = 2, cond_channels: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, SIZE, SIZE, generator=g)
    t = torch.rand(batch, generator=g) * 0.98 + 0.01
    image = torch.randn(batch, cond_channels, 20, 20, generator=g)
    return x, t, {"image": image}


def _model(seed: int = 0, **options) -> DualUNet:
    torch.manual_seed(seed)
    return DualUNet(DualUNetConfig(**options))


def _perturb_outputs(model: DualUNet, scale: float = 0.1) -> None:
    """Give the zero-initialised final convs weights, so outputs depend on the network."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for decoder in (model.decoder_c, model.decoder_eps):
            for p in decoder.conv_out.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


ENCODERS = [
    "resnet18",
    "efficientnet_b0",
    # a 28M-parameter transformer: about 2 s to build; at 32x32 its windows cover the grid
    "swin_tiny_patch4_window7_224",
]


def test_unconditional_output_is_a_pair_of_x_shaped_tensors():
    model = _model().eval()
    x, t, _ = _inputs(batch=3)
    with torch.no_grad():
        out = model(x, t)
    assert isinstance(out, tuple) and len(out) == 2
    assert all(o.shape == x.shape and torch.isfinite(o).all() for o in out)
    check_denoiser(model)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_conditional_output_is_a_pair_and_depends_on_the_condition_image(encoder):
    model = _model(cond_encoder=encoder, cond_resize=32)
    assert model.conditioning == "image"
    assert any("relation" in n for n, _ in model.named_parameters())
    _perturb_outputs(model)
    model.eval()
    x, t, cond = _inputs()
    with torch.no_grad():
        c1, e1 = model(x, t, cond)
        c2, e2 = model(x, t, {"image": cond["image"].flip(-1) + 0.5})
    for o in (c1, e1, c2, e2):
        assert o.shape == x.shape and torch.isfinite(o).all()
    assert (c1 - c2).abs().max() > 1e-4
    assert (e1 - e2).abs().max() > 1e-4
    check_denoiser(model, cond=cond)


def test_relation_layers_and_condition_encoder_are_absent_when_unconditional():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    assert model.cond_encoder is None
    assert not any("relation" in n or "cond_encoder" in n for n in names)
    assert all(block.relation is None for block in model.down)
    assert all(block.relation is None for block in model.decoder_c.blocks)
    cond = _model(cond_encoder="resnet18")
    assert all(block.relation is not None for block in [*cond.down, *cond.decoder_eps.blocks])


def test_default_model_is_small_and_its_decoders_are_separate():
    model = _model()
    params = sum(p.numel() for p in model.parameters())
    assert 1_500_000 <= params <= 3_000_000, params
    assert model.decoder_c.conv_out.weight is not model.decoder_eps.conv_out.weight
    assert len(model.down) == len(model.decoder_c.blocks) == 4


def test_fresh_model_outputs_are_the_preconditioning_skip_terms_exactly():
    model = _model().eval()
    x, t, _ = _inputs(batch=4)
    with torch.no_grad():
        c_hat, eps_hat = model(x, t)
    tb = t[:, None, None, None]
    assert torch.equal(c_hat, (tb - 1) * x)
    assert torch.equal(eps_hat, tb.sqrt() * x)
    plain = _model(precondition=False).eval()
    with torch.no_grad():
        c_raw, eps_raw = plain(x, t)
    assert not c_raw.any() and not eps_raw.any()


def test_preconditioning_scales_the_input_and_the_raw_outputs():
    pre = _model()
    _perturb_outputs(pre)
    raw = DualUNet(DualUNetConfig(precondition=False))
    raw.load_state_dict(pre.state_dict())
    pre.eval(), raw.eval()
    x, t, _ = _inputs(batch=4)
    tb = t[:, None, None, None]
    with torch.no_grad():
        c_hat, eps_hat = pre(x, t)
        f1, f2 = raw(x / (1 + tb).sqrt(), t)
    assert f1.abs().max() > 1e-3 and f2.abs().max() > 1e-3
    torch.testing.assert_close(c_hat, (tb - 1) * x + tb / (1 + tb).sqrt() * f1)
    torch.testing.assert_close(eps_hat, tb.sqrt() * x + ((1 - tb) / (1 + tb)).sqrt() * f2)


def test_time_enters_the_network_not_only_the_preconditioning():
    model = _model(precondition=False)
    _perturb_outputs(model)
    model.eval()
    x, _, _ = _inputs()
    with torch.no_grad():
        early = model(x, torch.full((2,), 0.05))
        late = model(x, torch.full((2,), 0.95))
    assert (early[0] - late[0]).abs().max() > 1e-4
    assert (early[1] - late[1]).abs().max() > 1e-4


def test_grid_encoding_normalises_positions():
    coarse, fine = grid_encoding(1, 1, 16, torch.device("cpu")), grid_encoding(3, 3, 16, "cpu")
    assert coarse.shape == (1, 16) and fine.shape == (9, 16)
    # the centre cell of any odd grid sits where a 1x1 grid's only cell does
    torch.testing.assert_close(fine[4], coarse[0])
    assert not torch.allclose(fine[0], fine[8])


@pytest.mark.parametrize("cond_encoder", [None, "resnet18"])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, cond_encoder):
    model = _model(cond_encoder=cond_encoder, cond_resize=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "dual.safetensors"
    save_component(model, path, kind="denoiser")
    assert read_metadata(path)["name"] == "dual-unet"
    again = load_component(path, kind="denoiser")
    assert isinstance(again, DualUNet) and again.config == model.config
    x, t, cond = _inputs()
    cond = cond if cond_encoder else None
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(x, t, cond), again(x, t, cond), strict=True):
            assert torch.equal(a, b)


def _backbone_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, features_only=True, in_chans=1)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def test_cond_weights_initialise_the_backbone_and_checkpoints_do_not_need_the_file(tmp_path):
    state = _backbone_state("resnet18", seed=123)
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    config = DualUNetConfig(cond_encoder="resnet18", cond_weights=str(path))
    torch.manual_seed(0)
    model = DualUNet(config)
    loaded = model.cond_encoder.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    plain = _model(cond_encoder="resnet18").cond_encoder.backbone.state_dict()
    assert not torch.equal(plain["conv1.weight"], state["conv1.weight"])
    # the weights are now the model's own: the saved config no longer points at the file
    assert config.cond_weights == str(path) and model.config.cond_weights is None
    ckpt = tmp_path / "model.safetensors"
    save_component(model, ckpt, kind="denoiser")
    path.unlink()
    again = load_component(ckpt, kind="denoiser")
    assert torch.equal(again.cond_encoder.backbone.conv1.weight, state["conv1.weight"])


def test_bad_cond_weights_are_user_errors(tmp_path):
    wrong = tmp_path / "effnet.safetensors"
    save_file(_backbone_state("efficientnet_b0", seed=0), str(wrong))
    with pytest.raises(UserError, match=r"missing \['conv1.weight'.*unexpected \['blocks"):
        _model(cond_encoder="resnet18", cond_weights=str(wrong))
    rgb = tmp_path / "rgb.safetensors"
    save_file(_backbone_state("resnet18", seed=0), str(rgb))  # 1 input channel, not 3
    with pytest.raises(UserError, match="shapes"):
        _model(cond_encoder="resnet18", cond_weights=str(rgb), cond_channels=3)
    with pytest.raises(UserError, match="no such file"):
        _model(cond_encoder="resnet18", cond_weights=str(tmp_path / "absent.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04 not safetensors at all")
    with pytest.raises(UserError):
        _model(cond_encoder="resnet18", cond_weights=str(junk))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"size": 12}, "divisible"),
        ({"mults": [1, 2], "size": 7}, "divisible"),
        ({"width": 12}, "groups"),
        ({"width": 4, "mults": [2, 4]}, "groups"),
        ({"heads": 3}, "heads"),
        ({"conditioning": "class"}, "cond-encoder"),
        ({"conditioning": "image"}, "cond-encoder"),
        ({"cond_encoder": "resnet18", "conditioning": "text"}, "'image'"),
        ({"cond_weights": "w.safetensors"}, "cond-encoder"),
        ({"cond_encoder": "resnet18", "cond_dim": 30}, "multiple of 4"),
        ({"prediction": "eps"}, "c_eps"),
        ({"prediction": "v"}, "x0 with one head"),
        ({"mults": []}, "mults"),
    ],
)
def test_bad_configs_are_user_errors(options, match):
    with pytest.raises(UserError, match=match):
        DualUNetConfig(**options)


def test_bad_inputs_and_components_are_user_errors():
    with pytest.raises(UserError, match="no model"):
        _model(cond_encoder="resnet_does_not_exist")
    with pytest.raises(UserError, match="decoupled"):
        _model(process={"name": "vp"})
    model = _model().eval()
    with pytest.raises(UserError, match="divisible"):
        model(torch.randn(2, 1, 6, 6), torch.rand(2))
    cond_model = _model(cond_encoder="resnet18").eval()
    x, t, cond = _inputs()
    with pytest.raises(UserError, match="image-conditional"):
        cond_model(x, t)
    with pytest.raises(UserError, match="expected"):
        cond_model(x, t, {"image": torch.randn(2, 3, 16, 16)})
    with pytest.raises(UserError, match="condition images"):
        cond_model(x, t, {"image": torch.randn(3, 1, 16, 16)})
    with torch.no_grad():  # one image for the whole batch broadcasts
        assert cond_model(x, t, {"image": cond["image"][:1]})[0].shape == x.shape


def test_gradients_reach_both_decoders_and_the_condition_encoder():
    model = _model(cond_encoder="resnet18")
    _perturb_outputs(model)
    x, t, cond = _inputs(batch=4)
    c_hat, eps_hat = model(x, t, cond)
    c_hat.square().mean().backward(retain_graph=True)

    def grads(module):
        return [p.grad for p in module.parameters() if p.grad is not None and p.grad.any()]

    # the c loss trains the shared parts and the c decoder only
    assert grads(model.decoder_c) and not grads(model.decoder_eps)
    assert grads(model.cond_encoder.backbone) and grads(model.cond_encoder.proj)
    eps_hat.square().mean().backward()
    assert grads(model.decoder_eps) and grads(model.decouple_eps)
    assert grads(model.decoder_eps.blocks[0].relation)
    assert model.cond_encoder.backbone.conv1.weight.grad.abs().sum() > 0


def test_a_few_adamw_steps_decrease_the_adm_loss():
    torch.manual_seed(0)
    model = _model()
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(16, 1, SIZE, SIZE)
    x0[:, :, 2:6, 2:6] = 1.0  # a square: learnable from one batch
    x0 = x0 + 0.1 * torch.randn(x0.shape, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.rand(16, generator=g) * 0.98 + 0.01
    tb = t[:, None, None, None]
    x_t = (1 - tb) * x0 + tb.sqrt() * eps

    def loss() -> torch.Tensor:
        c_hat, eps_hat = model(x_t, t)
        return (c_hat + x0).square().mean() + (eps_hat - eps).square().mean()

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = loss().item()
    for _ in range(30):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.7 * before, (before, after)


def test_registry_builds_it_from_options():
    cls = default_registry().load("denoiser", "dual-unet")
    assert cls is DualUNet
    model = cls.from_options(size="8", mults="1,2", width="16", cond_encoder="none")
    assert model.config.mults == [1, 2] and model.config.cond_encoder is None
    assert model.prediction == "c_eps" and model.process.name == "decoupled"
    check_denoiser(model)
    cond = cls.from_options(cond_encoder="resnet18", cond_resize="32", cond_dim="32")
    assert cond.conditioning == "image"
    check_denoiser(cond, cond={"image": torch.randn(2, 1, 8, 8)})


def test_the_one_head_ablation_is_the_c_branch_alone_giving_x0():
    """``prediction="x0"``: the same network less the eps branch; it outputs -c_hat, with
    identical weights identical to the pair's c output, and the loop derives eps_hat."""
    pair = _model()
    _perturb_outputs(pair)
    one = _model(prediction="x0")
    assert not hasattr(one, "decoder_eps") and not hasattr(one, "decouple_eps")
    own = one.state_dict()
    assert set(own) < set(pair.state_dict())
    one.load_state_dict({k: v for k, v in pair.state_dict().items() if k in own})
    pair.eval(), one.eval()
    x, t, _ = _inputs(batch=3)
    with torch.no_grad():
        c_hat, _ = pair(x, t)
        x0_hat = one(x, t)
    assert torch.equal(x0_hat, -c_hat)
    check_denoiser(one)
    halved = sum(p.numel() for p in pair.parameters()) - sum(p.numel() for p in one.parameters())
    decoder = sum(p.numel() for m in (pair.decoder_eps, pair.decouple_eps) for p in m.parameters())
    assert halved == decoder


def test_the_one_head_model_trains_with_the_adm_method_on_x0_only():
    from diffplug_adm.method import ADMMethod, ADMMethodConfig

    model = _model(prediction="x0")
    method = ADMMethod(ADMMethodConfig(weighting="authors"))
    x0 = torch.rand(4, 1, SIZE, SIZE) * 2 - 1
    loss = method.loss(model, x0, None, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.decoder_c.conv_out.weight.grad.abs().sum() > 0
    t = torch.tensor([0.5])
    assert [w.tolist() for w in method.weights(t, model)] == [[2.0]]
