import re

import pytest
import torch

from xception import create_model, list_models, model_config
from xception.layers import SeparableConv2d


def test_list_models_has_the_presets():
    names = list_models()
    for name in ["xception", "xception-nonresidual", "xception-mid-relu", "xception-mid-elu",
                 "xception-compact", "inception-v3"]:  # fmt: skip
        assert name in names
    assert list_models("mid") == ["xception-mid-elu", "xception-mid-relu"]


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'xcepton'.*did you mean xception"):
        create_model("xcepton")
    # No close match: both ways to list the names (the hint was Python-only, for CLI users too).
    with pytest.raises(
        ValueError, match=r"unknown model 'qq': .*list_models\(\) \(`xception models`"
    ):
        create_model("qq")
    # A weights file given as the model: where it goes instead.
    for name in ("mine.safetensors", "runs/best.pt", "w.h5"):
        with pytest.raises(ValueError, match="that is a weights file, not a model name; give it as "
                           r"weights \(--weights in the CLI;"):  # fmt: skip
            create_model(name)


def test_unknown_override_lists_valid_fields():
    with pytest.raises(ValueError, match=r"unknown option\(s\) resdual.*residual"):
        create_model("xception", resdual=False)


def test_presets_set_their_switch():
    assert model_config("xception-nonresidual").residual is False
    assert model_config("xception-mid-relu").mid_activation == "relu"
    assert model_config("xception-mid-elu").mid_activation == "elu"
    assert model_config("xception-pointwise-first").order == "pointwise_first"
    assert model_config("xception-fc").fc_layers == (4096, 4096)
    m = create_model("xception-mid-elu", num_classes=3, width=0.25, middle_blocks=1)
    assert all(s.mid_act is not None for s in m.modules() if isinstance(s, SeparableConv2d))


def test_compact_preset_for_small_images():
    model = create_model("xception-compact", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_inception_v3_baseline_behind_the_same_factory():
    model = create_model("inception-v3", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 299, 299)).shape == (1, 10)
    with pytest.raises(ValueError, match="inception-v3 accepts only"):
        create_model("inception-v3", residual=False)


def test_inception_v3_without_classes_returns_pooled_features():
    """num_classes=0 built torchvision's Linear(2048, 0): every output row was empty."""
    model = create_model("inception-v3", num_classes=0).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 75, 75)).shape == (2, 2048)
    assert model.fc.out_features == 0  # what predict and the CLI read the class count from
    assert not any(k.startswith("fc.") for k in model.state_dict())


@pytest.mark.parametrize(
    "kw,match",
    [(dict(num_classes=-1), "num_classes=-1 is not valid"),
     (dict(num_classes=True), "num_classes=True is not valid"),
     (dict(drop_rate=1.0), r"drop_rate=1.0 is not valid: use a probability in \[0, 1\)"),
     (dict(drop_rate="half"), "drop_rate='half' is not valid")],
)  # fmt: skip
def test_inception_v3_bad_values_are_named_before_torchvision_sees_them(kw, match):
    with pytest.raises(ValueError, match=match):
        create_model("inception-v3", **kw)


def test_timm_pretrained_flag_says_to_use_weights():
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) pretrained .* pass weights='imagenet'"
    ):
        create_model("xception", pretrained=True)
    for name in ("inception-v3", "inception-v3-compact", "xception-compact"):
        with pytest.raises(ValueError, match=f"pass weights= a weights file for {name}"):
            create_model(name, pretrained=True)


def test_list_models_takes_timms_wildcards():
    """timm's list_models('*xception*') filters with shell wildcards; here it found nothing
    (no name contains a '*'), so a timm user was told there were no such models."""
    assert list_models("*xception*") == list_models("xception") == list_models("XCEPTION")
    assert list_models("xception-mid*") == ["xception-mid-elu", "xception-mid-relu"]
    assert list_models("*-compact") == ["inception-v3-compact", "xception-compact"]
    assert list_models("xception-?ompact") == ["xception-compact"]
    assert list_models("mid*") == []  # a wildcard pattern matches whole names, as in timm


def test_timm_features_only_gives_the_backbone_maps_with_timm_feature_info(tmp_path):
    """timm's `features_only=True, out_indices=...` (the backbone of a detector or segmenter)
    was an unknown option. It returns the maps the full model's feature_maps gives, from the
    same weights, without the blocks past the last map or the head."""
    from safetensors.torch import save_file

    from xception.model import XceptionFeatures

    torch.manual_seed(0)
    full = create_model("xception", num_classes=3).eval()
    save_file(full.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        expected = full.feature_maps(x)
        backbone = create_model("xception", features_only=True, weights=tmp_path / "w.safetensors")
        maps = backbone.eval()(x)
        assert [m.shape[1] for m in maps] == backbone.feature_info.channels()
        assert backbone.feature_info.channels() == [64, 128, 256, 728, 2048]
        assert backbone.feature_info.reduction() == [2, 4, 8, 16, 32]
        assert all(torch.equal(a, b) for a, b in zip(maps, expected, strict=True))
        # Two maps: the exit flow and the head are not built into the backbone's weights.
        part = create_model("xception", features_only=True, out_indices=(1, -2),
                            weights=tmp_path / "w.safetensors").eval()  # fmt: skip
        assert isinstance(part, XceptionFeatures) and part.out_indices == (1, 3)
        assert part.feature_info.module_name() == ["block2", "block12"]
        names = set(part.state_dict())
        assert not any(n.startswith(("block13.", "block14.", "fc.")) for n in names)
        assert all(torch.equal(a, b) for a, b in zip(part(x), (expected[1], expected[3]),
                                                     strict=True))  # fmt: skip
    compact = create_model("xception-compact", features_only=True, in_chans=1)
    assert [m.shape[-1] for m in compact(torch.randn(1, 1, 28, 28))] == [28, 14, 7, 4, 2]
    for bad, message in [((5,), "0 to 4 .strides 2, 4, 8, 16, 32."), ((3, 1), "shallow to deep"),
                         ((), "0 to 4"), ("a", "0 to 4"), ((1.5,), "0 to 4")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"out_indices={re.escape(repr(bad))} .*{message}"):
            create_model("xception", features_only=True, out_indices=bad)
    with pytest.raises(ValueError, match="pass features_only=True too"):
        create_model("xception", out_indices=(1, 2))
    with pytest.raises(ValueError, match="features_only is offered for the Xception presets"):
        create_model("inception-v3", features_only=True)


def test_timm_global_pool_names_the_pooling():
    """timm's `global_pool=` was an unknown option; it is our `pooling` by timm's name."""
    assert create_model("xception-compact", global_pool="max").config.pooling == "max"
    unpooled = create_model("xception-compact", num_classes=0, global_pool="")
    assert unpooled.config.pooling is None
    assert unpooled(torch.randn(1, 3, 28, 28)).ndim == 4  # maps, as timm gives them
    with pytest.raises(ValueError, match="pass num_classes=0 too"):
        create_model("xception-compact", global_pool="")
    with pytest.raises(ValueError, match="global_pool='avgmax' is not valid: use 'avg', 'max'"):
        create_model("xception-compact", global_pool="avgmax")
    with pytest.raises(ValueError, match="global_pool .timm's name. or pooling, not both"):
        create_model("xception-compact", global_pool="max", pooling="avg")


def test_timm_data_config_of_our_models_prepares_images_as_the_weights_expect():
    """timm's pipeline (`resolve_model_data_config(model)`, `create_transform(**config)`) read
    no pretrained_cfg from our models and assumed 224 px and ImageNet's mean and std, where
    Keras' weights take 299 px in [-1, 1]. It now gives exactly the weights' own transforms."""
    import numpy as np
    from PIL import Image

    from xception.weights import Weights

    timm_data = pytest.importorskip("timm.data")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8))
    model = create_model("xception-compact", num_classes=3)
    config = timm_data.resolve_model_data_config(model)  # no weights: the recipes' inputs
    assert config["input_size"] == (3, 28, 28) and config["mean"] == (0.5, 0.5, 0.5)
    for crop, interpolation in ((1.0, "bilinear"), (0.8975, "bicubic")):  # Keras', timm's
        meta = Weights(name="w", format="xception", num_classes=3, input_size=32,
                       crop_fraction=crop, interpolation=interpolation, mean=(0.4, 0.5, 0.6),
                       std=(0.2, 0.3, 0.4))  # fmt: skip
        model.weights_meta = meta
        config = timm_data.resolve_model_data_config(model)
        assert config["input_size"] == (3, 32, 32) and config["std"] == (0.2, 0.3, 0.4)
        assert torch.equal(timm_data.create_transform(**config)(image), meta.transforms()(image))
    assert model.pretrained_cfg["classifier"] == "fc"
    assert model.pretrained_cfg["first_conv"] == "block1.conv1.conv"
    backbone = create_model("xception", features_only=True, in_chans=1)
    assert backbone.pretrained_cfg["num_classes"] == 0
    assert backbone.pretrained_cfg["input_size"] == (1, 299, 299)


def test_list_models_takes_a_bracket_wildcard_too():
    assert list_models("[xi]*-compact") == ["inception-v3-compact", "xception-compact"]
    assert list_models("xception-mid-[r]elu") == ["xception-mid-relu"]
    assert list_models("xception-mid-?lu") == ["xception-mid-elu"]  # one character: not `relu`


def test_a_weights_path_in_any_case_or_without_a_suffix_is_named_as_one():
    for name in ("W.H5", "Model.SafeTensors", "runs/latest"):
        with pytest.raises(ValueError, match="that is a weights file, not a model name"):
            create_model(name)


def test_overrides_beat_the_presets_own_settings():
    assert model_config("xception-nonresidual", residual=True).residual is True
    assert model_config("xception-compact", middle_blocks=5).middle_blocks == 5
    assert model_config("xception-compact").middle_blocks == 3  # the preset's own


def test_inception_v3_takes_drop_rate_and_refuses_what_it_would_ignore():
    assert create_model("inception-v3", num_classes=2, drop_rate=0.2).dropout.p == 0.2
    assert create_model("inception-v3", num_classes=2).dropout.p == 0.5  # torchvision's
    for kw, named in ((dict(width=0.5), "width"), (dict(in_chans=1), "in_chans")):
        with pytest.raises(ValueError, match=rf"accepts only num_classes and drop_rate \(got "
                           rf"{named}\)"):  # fmt: skip
            create_model("inception-v3", num_classes=2, **kw)
    rgb = create_model("inception-v3", num_classes=2, in_chans=3)  # the one it takes: accepted
    assert rgb.Conv2d_1a_3x3.conv.in_channels == 3


def _compact_inception_file(tmp_path, **config):
    from xception.weights import Weights, save_safetensors

    model = create_model("inception-v3-compact", num_classes=4, blocks=(1, 1, 1), **config)
    meta = Weights(name="w", format="xception", num_classes=4, categories=("a", "b", "c", "d"),
                   input_size=28)  # fmt: skip
    return model, save_safetensors(model, tmp_path / "inc.safetensors", meta)


def test_a_compact_inception_file_restores_its_config_under_the_callers_overrides(tmp_path):
    model, path = _compact_inception_file(tmp_path, width=0.125)
    again = create_model("inception-v3-compact", weights=path)  # not the preset's width 0.2
    assert again.config.width == 0.125 and again.config.blocks == (1, 1, 1)
    assert again.config.num_classes == 4 and again.weights_meta.categories == ("a", "b", "c", "d")
    state = again.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    changed = create_model("inception-v3-compact", weights=path, drop_rate=0.3)
    assert changed.config.drop_rate == 0.3 and changed.config.width == 0.125


def test_a_compact_inception_file_with_the_same_head_loads_it_when_num_classes_is_given(tmp_path):
    model, path = _compact_inception_file(tmp_path, width=0.125)
    same = create_model("inception-v3-compact", weights=path, num_classes=4)
    assert torch.equal(same.fc.weight, model.fc.weight)
    assert same.weights_meta.categories == ("a", "b", "c", "d")
    other = create_model("inception-v3-compact", weights=path, num_classes=3)
    assert other.fc.out_features == 3 and other.weights_meta.categories is None  # a new head
    assert torch.equal(other.stem[0].conv.weight, model.stem[0].conv.weight)


def test_a_compact_inception_file_holding_nan_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from xception.weights import WeightsError

    _, path = _compact_inception_file(tmp_path, width=0.125)
    sd = load_file(path)
    sd["stem.0.conv.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(WeightsError, match=r"stem\.0\.conv\.weight holds 1 NaN"):
        create_model("inception-v3-compact", num_classes=4, blocks=(1, 1, 1), width=0.125,
                     weights=tmp_path / "nan.safetensors")  # fmt: skip


def _conv_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in model.parameters() if p.ndim == 4]


def test_compact_inception_at_width_1_has_torchvisions_channel_plan():
    """Width 1.0 is the paper's channel plan: every conv (in order) has the shape of its
    torchvision Inception V3 counterpart, except Mixed_5*'s 5x5, which this model factorises
    into the paper's 3x3 (module docstring); the blocks give torchvision's channel counts."""
    from torchvision.models import inception_v3

    with torch.device("meta"):  # shapes only: nothing allocated
        theirs = inception_v3(weights=None, aux_logits=False, init_weights=False)
        ours = create_model("inception-v3-compact", width=1.0, num_classes=1000)
    expected = [s[:2] + (3, 3) if s[2:] == (5, 5) else s for s in _conv_shapes(theirs)]
    assert _conv_shapes(ours) == expected
    assert ours.fc.weight.shape == theirs.fc.weight.shape == (1000, 2048)
    bns = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == len(expected) and {m.eps for m in bns} == {1e-3}  # torchvision's eps
    widths = {}
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_6a", "Mixed_6e", "Mixed_7a", "Mixed_7c"):
        getattr(theirs, name).register_forward_hook(
            lambda m, i, out, name=name: widths.__setitem__(name, out.shape[1]))  # fmt: skip
    theirs.eval()(torch.empty(1, 3, 299, 299, device="meta"))
    x = torch.empty(1, 3, 32, 32, device="meta")
    ours_widths = {}
    for name in ours.block_names:
        x = ours.get_submodule(name)(x)
        ours_widths[name.replace("mixed", "Mixed")] = x.shape[1]
    assert {k: ours_widths[k] for k in widths} == widths


@pytest.mark.parametrize("block", ["C", "E"])
def test_compact_inception_modules_compute_what_torchvisions_do(block):
    """Each module at width 1.0, with torchvision's module given its weights (same order, same
    shapes), gives torchvision's outputs: branches wired to the right inputs, in the right
    order. The pool branch is left out: this model's average pool does not count the padding
    (as Keras' does not), torchvision's does. (The reductions pad, for small images, where
    torchvision's do not: their convs' shapes are checked above.)"""
    from helpers import trained_like
    from torchvision.models import inception as tv

    from xception import inception as ours_module

    cfg = ours_module.InceptionConfig(width=1.0)
    ours, theirs, cin, pool = {
        "C": (ours_module.InceptionC(768, 160, cfg), tv.InceptionC(768, 160), 768, 192),
        "E": (ours_module.InceptionE(1280, cfg), tv.InceptionE(1280), 1280, 192),
    }[block]
    trained_like(ours)
    values = list(ours.state_dict().values())
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert [tuple(v.shape) for v in values] == list(shapes.values())
    theirs.load_state_dict(dict(zip(shapes, values, strict=True)))
    x = torch.randn(2, cin, 9, 9)
    with torch.no_grad():
        a, b = ours(x), theirs.eval()(x)
    assert a.shape == b.shape
    keep = a.shape[1] - pool
    assert torch.allclose(a[:, :keep], b[:, :keep], atol=1e-5)
    assert a[:, :keep].std() > 0.1


def test_compact_inception_average_pools_leave_out_the_padding():
    """Keras' Inception V3 (AveragePooling2D, padding='same') averages only the pixels inside
    the image: a constant image stays constant at its borders."""
    model = create_model("inception-v3-compact", num_classes=2, width=0.125)
    pools = [m for m in model.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert len(pools) == sum(model.config.blocks)  # one per InceptionA, C and E
    for pool in pools:
        assert torch.equal(pool(torch.full((1, 2, 5, 5), 3.0)), torch.full((1, 2, 5, 5), 3.0))


def test_compact_inception_maps_have_the_compact_xceptions_resolution():
    """Both compact models are fed the same 28-64 px images: their last feature maps match in
    size, as in the paper's comparison at one input size."""
    inception = create_model("inception-v3-compact", num_classes=2, width=0.125).eval()
    xception = create_model("xception-compact", num_classes=2, width=0.25).eval()
    for size in (28, 32, 64):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            a, b = inception.forward_features(x), xception.forward_features(x)
        assert a.shape[-2:] == b.shape[-2:] == ((size + 15) // 16,) * 2, size


def test_compact_inception_drop_rate_drops_features_in_training_only():
    model = create_model("inception-v3-compact", num_classes=3, width=0.125, drop_rate=0.5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.train()  # batch norm in training mode is deterministic: only dropout varies
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
        plain = create_model("inception-v3-compact", num_classes=3, width=0.125).train()
        assert torch.equal(plain(x), plain(x))


def test_an_xception_file_restores_its_config_under_the_callers_overrides(tmp_path):
    from xception.weights import save_safetensors

    model = create_model("xception-compact", num_classes=3, width=0.25, middle_blocks=1)
    path = save_safetensors(model, tmp_path / "x.safetensors")
    again = create_model("xception-compact", weights=path, drop_rate=0.3)
    assert again.config.drop_rate == 0.3  # given: the caller's
    assert (again.config.width, again.config.middle_blocks) == (0.25, 1)  # the file's
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_inception_v3_weights_for_another_preset_are_refused_naming_the_preset(tmp_path):
    from xception.weights import WeightsError

    path = tmp_path / "inception.pt"
    torch.save(create_model("inception-v3", num_classes=2).state_dict(), path)
    for name in ("xception", "inception-v3-compact"):
        with pytest.raises(WeightsError, match=rf"Inception V3 weights \(torchvision's layout\), "
                           rf"not {name}'s: use --model inception-v3"):  # fmt: skip
            create_model(name, weights=path)
    assert create_model("inception-v3", weights=path).fc.out_features == 2


def test_a_compact_inception_file_given_to_an_xception_preset_names_the_preset_it_needs(tmp_path):
    from xception.weights import WeightsError

    _, path = _compact_inception_file(tmp_path, width=0.125)
    with pytest.raises(WeightsError, match="inception-v3-compact weights, not xception-compact's: "
                       "use --model inception-v3-compact"):  # fmt: skip
        create_model("xception-compact", weights=path)
