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
