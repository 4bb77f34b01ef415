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
