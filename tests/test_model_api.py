"""The model's Python API driven as a timm / torchvision user would: presets, timm's head and
backbone calls, copies and state dicts, dtypes and layouts, tracing, functional calls, gradients
and `deploy.optimize` over the config's switches."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import xception
from xception import deploy

# A tiny paper-topology model: every switch of the config, at a fraction of the cost.
TINY = dict(stem_channels=(8, 16), entry_channels=(16, 24, 32), middle_blocks=1,
            exit_channels=32, head_channels=(48, 64), num_classes=7)  # fmt: skip


def tiny(**overrides) -> xception.Xception:
    return xception.create_model("xception", **{**TINY, **overrides})


def randomize_bn(model: nn.Module) -> nn.Module:
    """Trained-looking batch norms, so that folding and eval-mode paths carry their statistics."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return (a.double() - b.double()).abs().max().item() <= tol * max(1.0, b.abs().max().item())


XCEPTION_PRESETS = [n for n in xception.list_models() if not n.startswith("inception")]


# ---------------------------------------------------------------------------------------------
# presets and input sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", XCEPTION_PRESETS + ["inception-v3-compact"])
def test_every_preset_runs_at_its_minimum_size_and_refuses_below(name):
    """A preset that fails at the size it states as its minimum, or accepts less, would break."""
    model = xception.create_model(name, num_classes=3).eval()
    m = model.min_input_size
    with torch.no_grad():
        assert model(torch.randn(1, 3, m, m)).shape == (1, 3)
        assert model(torch.randn(1, 3, m, m + 5)).shape == (1, 3)
    small = torch.randn(1, 3, max(m - 1, 0), m)
    with pytest.raises(ValueError, match="smaller than this model's minimum"):
        model(small)


def test_paper_model_minimum_is_7_and_compact_is_1():
    """The README's sizes (7x7 for the paper's model, any size for the compact presets)."""
    assert xception.create_model("xception").min_input_size == 7
    assert xception.create_model("xception-compact").min_input_size == 1
    assert xception.create_model("xception", stem_stride=1).min_input_size == 5


def test_compact_train_mode_batch_of_one():
    """A one-image training step on a compact preset at 28 px (BN sees 2x2 at the end)."""
    model = xception.create_model("xception-compact", num_classes=10, middle_blocks=1).train()
    out = model(torch.randn(1, 3, 28, 28))
    out.sum().backward()
    assert out.shape == (1, 10)


# ---------------------------------------------------------------------------------------------
# timm's head API, against timm's legacy_xception
# ---------------------------------------------------------------------------------------------
def test_head_api_matches_timm_legacy_xception():
    """forward_features / forward_head(pre_logits) / reset_classifier(0) shapes as timm's."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model("legacy_xception", pretrained=False).eval()
    ours = xception.create_model("xception").eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ft, fo = ref.forward_features(x), ours.forward_features(x)
        assert ft.shape == fo.shape == (2, 2048, 2, 2)
        assert ref.forward_head(ft, pre_logits=True).shape == ours.forward_head(fo, True).shape
        assert ref.forward_head(ft).shape == ours.forward_head(fo).shape == (2, 1000)
        ref.reset_classifier(0)
        ours.reset_classifier(0)
        assert ref(x).shape == ours(x).shape == (2, 2048)
        # timm's get_classifier() is an Identity then, not None: code calls it on features.
        assert type(ours.get_classifier()) is type(ref.get_classifier()) is torch.nn.Identity
        assert "fc.weight" not in ours.state_dict()
        assert ours.num_classes == ref.num_classes == 0
        ref.reset_classifier(5, "max")
        ours.reset_classifier(5, "max")
        assert ref(x).shape == ours(x).shape == (2, 5)
    assert ours.pretrained_cfg["num_classes"] == 5


def test_failed_reset_classifier_leaves_model_unchanged():
    """A refused reset_classifier must not leave a half-changed head or config."""
    model = xception.create_model("xception-compact", num_classes=4).eval()
    fc = model.fc
    for bad in [(-1,), (True,), (3, "bogus"), (3, "")]:
        with pytest.raises(ValueError):
            model.reset_classifier(*bad)
    assert model.fc is fc and model.config.num_classes == 4 and model.config.pooling == "avg"


def test_reset_classifier_keeps_dtype_and_hidden_layers():
    """The new head follows the model's dtype; pre_logits stays the hidden layer's output."""
    model = xception.create_model("xception-compact", num_classes=3, fc_layers=(16,)).half()
    model.reset_classifier(6)
    assert model.fc.weight.dtype == torch.float16 and model.fc.in_features == 16
    model.float().eval()
    x = torch.randn(2, 3, 20, 20)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 16)


def test_reset_classifier_zero_then_strict_load_refuses_classifier_keys():
    """After reset_classifier(0), load_state_dict(strict=True) silently ignored fc.*: the None
    classifier stayed a registered child, which torch's key check skips."""
    with_head = xception.create_model("xception-compact", num_classes=10).state_dict()
    fresh = xception.create_model("xception-compact", num_classes=0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(with_head, strict=True)  # a fresh headless model refuses them
    reset = xception.create_model("xception-compact", num_classes=10)
    reset.reset_classifier(0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        reset.load_state_dict(with_head, strict=True)  # ... and so should a reset one


def test_inception_compact_reset_zero_then_strict_load_refuses_classifier_keys():
    """The compact Inception's reset_classifier(0) made strict loads skip fc.* too."""
    with_head = xception.create_model("inception-v3-compact", num_classes=10).state_dict()
    reset = xception.create_model("inception-v3-compact", num_classes=10)
    reset.reset_classifier(0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        reset.load_state_dict(with_head, strict=True)


def test_reset_classifier_takes_timms_global_pool_keyword():
    """timm's reset_classifier(0, global_pool='') was a TypeError (unknown keyword), and
    reset_classifier(0, '') refused timm's '' for no pooling."""
    model = xception.create_model("xception-compact", num_classes=4).eval()
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 512, 2, 2)
    assert model.config.pooling is None and model.global_pool is None
    model.reset_classifier(5, global_pool="max")
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 5)
    assert model.config.pooling == "max"
    model.reset_classifier(0, "")  # positionally, as timm's own calls do
    assert model.config.pooling is None and model.fc is None
    model.reset_classifier(3, "avg")
    assert model.config.pooling == "avg" and model.fc.out_features == 3
    with pytest.raises(ValueError, match="global_pool .* or pooling, not both"):
        model.reset_classifier(2, "avg", pooling="max")


# ---------------------------------------------------------------------------------------------
# features_only, pretrained_cfg
# ---------------------------------------------------------------------------------------------
def test_features_only_matches_timm_channels_reductions_and_shapes():
    """features_only=True gives timm's five maps (channels, strides and shapes) for xception."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model("legacy_xception", pretrained=False, features_only=True).eval()
    ours = xception.create_model("xception", features_only=True).eval()
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == ref.feature_info.reduction()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert [t.shape for t in ours(x)] == [t.shape for t in ref(x)]


def test_features_only_out_indices_tuple_and_negative():
    """out_indices picks maps by index (negative from the end); bad ones are refused by name."""
    f = xception.create_model("xception-compact", features_only=True, out_indices=(1, -1))
    assert f.feature_info.reduction() == [2, 16]
    assert [t.shape[1] for t in f(torch.randn(1, 3, 28, 28))] == [48, 512]
    for bad in [(3, 1), (1, 1), (5,), ()]:
        with pytest.raises(ValueError, match="out_indices"):
            xception.create_model("xception-compact", features_only=True, out_indices=bad)


def test_features_only_int_out_indices_means_last_n_as_in_timm():
    """timm reads out_indices=2 as the last two maps; it silently gave map 2 only."""
    timm = pytest.importorskip("timm")
    f = xception.create_model("xception-compact", features_only=True, out_indices=2)
    assert f.feature_info.reduction() == [8, 16] and f.out_indices == (3, 4)
    ref = timm.create_model("legacy_xception", pretrained=False, features_only=True, out_indices=2)
    ours = xception.create_model("xception", features_only=True, out_indices=2)
    assert ours.feature_info.reduction() == ref.feature_info.reduction()
    assert xception.create_model("xception", features_only=True, out_indices=5).out_indices == (
        0, 1, 2, 3, 4)  # fmt: skip
    for bad in (0, 6, -1):
        with pytest.raises(
            ValueError,
            match=rf"out_indices={bad} is not valid: a number n takes "
            r"the last n of the model's 5 feature maps, 1 to 5",
        ):
            xception.create_model("xception", features_only=True, out_indices=bad)


def test_pretrained_cfg_feeds_timm_transform_for_grey_compact():
    """timm's resolve_model_data_config + create_transform prepare 1-channel 28 px images."""
    timm = pytest.importorskip("timm")
    from PIL import Image

    model = xception.create_model("xception-compact", in_chans=1, num_classes=10).eval()
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == (0.5,) and cfg["std"] == (0.5,)
    transform = timm.data.create_transform(**cfg)
    img = Image.fromarray(torch.randint(0, 256, (40, 30), dtype=torch.uint8).numpy())
    x = transform(img)
    assert x.shape == (1, 28, 28) and -1.0 <= x.min() and x.max() <= 1.0
    assert model(x[None]).shape == (1, 10)


# ---------------------------------------------------------------------------------------------
# copies, pickles, state dicts
# ---------------------------------------------------------------------------------------------
def test_deepcopy_pickle_and_torch_save_keep_outputs():
    """deepcopy, pickle and torch.save(model) round trips give the same logits and config."""
    model = xception.create_model("xception-compact", num_classes=5, middle_blocks=1).eval()
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        ref = model(x)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                      torch.load(buf, weights_only=False)):  # fmt: skip
            assert other.config == model.config
            assert torch.equal(other(x), ref)
    feats = xception.create_model("xception-compact", features_only=True, out_indices=(1, 3))
    assert [t.shape for t in pickle.loads(pickle.dumps(feats))(x)] == [t.shape for t in feats(x)]


def test_state_dict_strict_round_trip_and_preset_mismatch():
    """A strict state-dict load reproduces the model; another preset's weights are refused."""
    a = xception.create_model("xception-compact", num_classes=10).eval()
    sd = a.state_dict()
    b = xception.create_model("xception-compact", num_classes=10).eval()
    b.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    with pytest.raises(RuntimeError):
        xception.create_model("xception-compact-nonresidual", num_classes=10).load_state_dict(sd)
    with pytest.raises(RuntimeError):
        xception.create_model("xception-compact", num_classes=0).load_state_dict(sd)


def test_segments_equal_to_channels_is_depthwise():
    """segments=C (every conv having C channels) builds and computes the depthwise model."""
    same = dict(TINY, stem_channels=(16, 16), entry_channels=(16, 16, 16), exit_channels=16,
                head_channels=(16, 16))  # fmt: skip
    a = xception.create_model("xception", **same).eval()
    b = xception.create_model("xception", **same, segments=16).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# ---------------------------------------------------------------------------------------------
# dtypes, layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float16, 1e-2),
                                       (torch.bfloat16, 6e-2)])  # fmt: skip
def test_other_dtypes_on_cpu(dtype, tol):
    """.to(float64 / float16 / bfloat16) runs on the CPU, even sizes included (-inf padding)."""
    model = randomize_bn(tiny()).eval()
    x = torch.randn(2, 3, 32, 30)
    with torch.no_grad():
        ref = model(x)
        out = copy.deepcopy(model).to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert close(out, ref, tol)


def test_half_method_on_compact():
    """.half() on a compact model runs fp16 on the CPU."""
    model = xception.create_model("xception-compact", num_classes=3, middle_blocks=1).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert close(copy.deepcopy(model).half()(x.half()), model(x), 1e-2)


def test_float64_input_to_float32_model_is_refused_by_name():
    """A float64 batch (torch.from_numpy) failed deep in a conv: 'expected scalar type Double
    but found Float', not a ValueError naming both dtypes and the fix. Autocast, which casts
    for itself, still takes any float batch."""
    model = xception.create_model("xception-compact", num_classes=3).eval()
    with pytest.raises(
        ValueError,
        match=r"the batch is torch.float64 but the model's weights "
        r"are torch.float32: convert the batch, "
        r"x.to\(torch.float32\), or the model",
    ):
        model(torch.randn(1, 3, 28, 28, dtype=torch.float64))
    with pytest.raises(
        ValueError, match="the batch is torch.float32 but the model's weights are torch.bfloat16"
    ):
        copy.deepcopy(model).to(torch.bfloat16)(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="the batch is torch.float64"):
        xception.create_model("xception-compact", features_only=True)(
            torch.randn(1, 3, 28, 28, dtype=torch.float64))  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert model(torch.randn(1, 3, 28, 28, dtype=torch.bfloat16)).shape == (1, 3)
    assert model.double()(torch.randn(1, 3, 28, 28, dtype=torch.float64)).dtype == torch.float64


def test_channels_last_and_non_contiguous_inputs():
    """channels_last models/inputs, permuted, strided and expanded batches give the same logits."""
    model = randomize_bn(tiny()).eval()
    x = torch.randn(2, 3, 30, 28)
    with torch.no_grad():
        ref = model(x)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        assert close(cl(x.contiguous(memory_format=torch.channels_last)), ref, 1e-5)
        assert close(model(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)), ref, 1e-5)
        big = torch.zeros(2, 3, 60, 56)
        big[:, :, ::2, ::2] = x
        assert close(model(big[:, :, ::2, ::2]), ref, 1e-5)
        e = x[:1].expand(2, 3, 30, 28)
        assert close(model(e), model(e.contiguous()), 1e-6)


# ---------------------------------------------------------------------------------------------
# tracing, functional calls, gradients, modes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["xception-compact", "inception-v3-compact"])
def test_fx_symbolic_trace_matches_eager(name):
    """torch.fx.symbolic_trace gives a graph with the model's outputs, at other sizes too."""
    model = xception.create_model(name, num_classes=4).eval()
    graph = torch.fx.symbolic_trace(model)
    for size in [(28, 28), (33, 31)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert torch.equal(graph(x), model(x))


def test_fx_trace_tiny_paper_model_even_size_and_feature_extractor():
    """The size-dependent 'same' padding traces; torchvision's create_feature_extractor works."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = randomize_bn(tiny(order="pointwise_first", mid_activation="elu")).eval()
    x = torch.randn(1, 3, 32, 30)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))
        maps = create_feature_extractor(model, {"block3": "c2", "block2.sepconv1": "s"})(x)
    assert maps["c2"].shape[1] == 24 and maps["s"].shape[1] == 16


def test_functional_call_uses_given_parameters():
    """torch.func.functional_call runs the model with the parameters it is given."""
    model = xception.create_model("xception-compact", num_classes=4, middle_blocks=1).eval()
    params = {k: v.detach() * 1.01 for k, v in model.named_parameters()}
    x = torch.randn(2, 3, 12, 12)
    out = torch.func.functional_call(model, {**params, **dict(model.named_buffers())}, (x,))
    other = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in other.named_parameters():
            v.copy_(params[k])
        assert close(out, other(x), 1e-6)
        assert not close(out, model(x), 1e-7)


def test_gradcheck_tiny_float64_models():
    """Analytical gradients match numerical ones through every switch (float64, eval mode)."""
    narrow = dict(TINY, num_classes=3, stem_channels=(8, 8), entry_channels=(8, 8, 8),
                  exit_channels=8, head_channels=(8, 8))  # fmt: skip
    for kw in [{}, dict(order="pointwise_first", mid_activation="elu", segments=2)]:
        model = xception.create_model("xception", **narrow, **kw).double().eval()
        x = torch.randn(1, 3, 7, 8, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_grad_checkpointing_gives_same_gradients_and_statistics():
    """set_grad_checkpointing changes memory, not gradients or BN running statistics."""
    a = xception.create_model("xception-compact", num_classes=4, middle_blocks=1).train()
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x = torch.randn(3, 3, 16, 16)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    for p, q in zip(a.buffers(), b.buffers(), strict=True):
        assert torch.equal(p, q)


def test_train_eval_and_requires_grad_round_trips():
    """train()/eval() reach every submodule; a frozen backbone gets a trainable new head."""
    model = xception.create_model("xception-compact", num_classes=4)
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    model.requires_grad_(False)
    model.reset_classifier(5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    model.requires_grad_(True)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# unusual but valid configs, grey input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [dict(middle_blocks=0), dict(segments=1),
                                       dict(stem_stride=1), dict(output_stride=8),
                                       dict(width=0.5), dict(pooling=None, num_classes=0)])  # fmt: skip
def test_unusual_valid_configs_run(overrides):
    """Edge values of the config build, run and report consistent feature maps."""
    model = tiny(**overrides).eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        out = model(x)
        maps = model.feature_maps(x)
    assert out.shape[0] == 2
    assert [m.shape[1] for m in maps] == [f["channels"] for f in model.feature_info]


@pytest.mark.parametrize("name", ["xception-compact", "xception-compact-nonresidual",
                                  "inception-v3-compact"])  # fmt: skip
def test_compact_presets_with_one_input_channel(name):
    """in_chans=1 on the compact presets takes grey batches; a missing channel axis is named."""
    model = xception.create_model(name, in_chans=1, num_classes=10).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.randn(2, 28, 28))


# ---------------------------------------------------------------------------------------------
# deploy.optimize against eager, over the config's switches
# ---------------------------------------------------------------------------------------------
SWITCHES = {
    "default": {},
    "segments1": dict(segments=1),
    "segments8": dict(segments=8),
    "pointwise_first": dict(order="pointwise_first"),
    "mid_relu": dict(mid_activation="relu"),
    "mid_elu_pointwise_first": dict(mid_activation="elu", order="pointwise_first"),
    "nonresidual": dict(residual=False),
    "middle_blocks0": dict(middle_blocks=0),
    "stem_stride1": dict(stem_stride=1),
    "symmetric": dict(padding="symmetric"),
    "output_stride8": dict(output_stride=8),
    "fc_max": dict(fc_layers=(16,), pooling="max"),
    "no_pool": dict(pooling=None, num_classes=0),
    "grey": dict(in_chans=1),
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_optimize_eager_matches_model_for_each_switch(switch):
    """deploy.optimize (BN folded, batch sliced) equals the eval-mode model within 1e-4."""
    overrides = SWITCHES[switch]
    model = randomize_bn(tiny(**overrides)).eval()
    x = torch.randn(3, overrides.get("in_chans", 3), 30, 34)
    with torch.no_grad():
        ref = model(x)
    fast = deploy.optimize(model, backend="eager", slice_mib=0.01)  # forces slicing
    out = fast(x)
    assert out.shape == ref.shape and out.is_contiguous()
    assert close(out, ref, 1e-4)


def test_optimize_jit_matches_model():
    """The jit backend agrees with eager for a switch-heavy config."""
    model = randomize_bn(tiny(order="pointwise_first", residual=False, segments=2)).eval()
    x = torch.randn(2, 3, 29, 32)
    with torch.no_grad():
        ref = model(x)
    assert close(deploy.optimize(model, backend="jit")(x), ref, 1e-4)


def test_optimize_leaves_a_training_model_as_it_was():
    """optimize works on a copy: the caller's training-mode model stays in training mode."""
    model = xception.create_model("xception-compact", num_classes=3, middle_blocks=1).train()
    deploy.optimize(model, backend="eager")
    assert model.training and all(m.training for m in model.modules())


def test_optimize_refuses_a_backbone_with_a_message_that_fits():
    """optimize(create_model(..., features_only=True)) told the user to 'build the model with
    xception.create_model', which is what they did."""
    backbone = xception.create_model("xception-compact", features_only=True)
    with pytest.raises(
        TypeError,
        match=r"got XceptionFeatures \(a features_only backbone\): "
        "only Xception classifiers",
    ):
        deploy.optimize(backbone, backend="eager")
    with pytest.raises(TypeError, match=r"got InceptionV3Compact \(the Inception V3 baseline\)"):
        deploy.optimize(xception.create_model("inception-v3-compact"), backend="eager")
    with pytest.raises(TypeError, match="got Linear: build the model with xception.create_model"):
        deploy.optimize(nn.Linear(2, 2), backend="eager")


# ---------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------
def test_too_small_input_on_a_compact_model_does_not_suggest_a_compact_preset():
    """An empty image on xception-compact said 'or use a compact preset': it is one. The paper's
    model still gets the hint."""
    model = xception.create_model("xception-compact", num_classes=3).eval()
    with pytest.raises(ValueError, match=r"minimum 1x1: resize the images$"):
        model(torch.randn(1, 3, 0, 28))
    with pytest.raises(ValueError, match=r"minimum 1x1: resize the images$"):
        xception.create_model("inception-v3-compact", num_classes=3)(torch.randn(1, 3, 0, 28))
    with pytest.raises(ValueError, match=r"minimum 7x7: resize the images, or use a compact "):
        tiny().eval()(torch.randn(1, 3, 6, 28))


def test_inception_v3_preset_refuses_integer_pixels_by_name():
    """create_model('inception-v3') took uint8 pixels into torchvision's raw 'expected scalar
    type Byte but found Float', a grey batch, a numpy array or 74 px into torch's own errors,
    where every other preset names the fix."""
    model = xception.create_model("inception-v3", num_classes=3).eval()
    for batch, error, message in [
        (torch.randint(0, 255, (1, 3, 80, 80), dtype=torch.uint8), ValueError,
         "expected floating-point images, got torch.uint8"),
        (torch.rand(1, 1, 80, 80), ValueError,
         r"expected a batch of shape \(N, 3, H, W\), got \(1, 1, 80, 80\)"),
        (torch.rand(1, 3, 80, 80).numpy(), TypeError, "got a numpy.ndarray"),
        (torch.rand(1, 3, 74, 80), ValueError,
         r"input \(74, 80\) is smaller than this model's minimum 75x75: resize the images$"),
        (torch.rand(1, 3, 80, 80, dtype=torch.float64), ValueError, "the batch is torch.float64"),
    ]:  # fmt: skip
        with pytest.raises(error, match=message):
            model(batch)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 75, 75)).shape == (1, 3)
    assert pickle.loads(pickle.dumps(model))(torch.rand(1, 3, 75, 75)).shape == (1, 3)
