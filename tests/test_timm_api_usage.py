"""The model API driven as a demanding timm user drives it: list_models, reset_classifier,
features_only backbones and their feature_info, timm's model attributes, weights from timm
compared map by map, meta-device construction, layouts in training, gradient checkpointing with
dropout and dilation, tracing, and a one-image training batch."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import timm_xception
from test_model_api import TINY, randomize_bn, tiny

import xception


# ---------------------------------------------------------------------------------------------
# list_models as timm's
# ---------------------------------------------------------------------------------------------
def test_list_models_takes_a_list_of_patterns_as_timm_does():
    """timm's `list_models(filter)` takes a list of patterns too
    (`timm.list_models(['*xception*', 'inception*'])`, the union); ours crashed with
    "AttributeError: 'list' object has no attribute 'lower'", and timm's keyword `filter=` was
    a TypeError. A list gives the sorted union of its matches, and `filter=` is taken."""
    want = sorted(set(xception.list_models("*compact*")) | set(xception.list_models("inception*")))
    assert xception.list_models(["*compact*", "inception*"]) == want
    assert xception.list_models(filter="*compact*") == xception.list_models("*compact*")


def test_list_models_empty_and_none_give_every_preset_sorted():
    every = xception.list_models()
    assert every == sorted(every) and xception.list_models("") == every
    assert xception.list_models(None) == every and "xception" in every


# ---------------------------------------------------------------------------------------------
# reset_classifier as timm's
# ---------------------------------------------------------------------------------------------
def test_reset_classifier_with_global_pool_none_keeps_the_pooling_positionally_too():
    """`reset_classifier(0, None)` silently removed the global pooling (the model then
    returned (N, C, H, W) maps, and a later reset_classifier(5) was refused), while the same
    call with the keyword, `reset_classifier(0, global_pool=None)`, kept it, as timm's
    reset_classifier(num_classes, global_pool=None) does (None = keep; '' = no pooling). The
    second argument is now timm's global_pool, positional or not."""
    keyword = xception.create_model("xception-compact", num_classes=4, middle_blocks=1).eval()
    keyword.reset_classifier(0, global_pool=None)
    assert keyword.config.pooling == "avg"
    assert keyword(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    positional = xception.create_model("xception-compact", num_classes=4, middle_blocks=1).eval()
    positional.reset_classifier(0, None)  # timm's own signature: (num_classes, global_pool)
    assert positional.config.pooling == "avg"
    assert positional(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_reset_classifier_round_trips_keep_outputs_consistent_with_forward_head():
    """reset_classifier(0) then (n, 'max'): pooled features equal forward_head(pre_logits) and
    the new logits equal fc of them; the backbone is untouched."""
    model = randomize_bn(tiny(drop_rate=0.3)).eval()
    x = torch.randn(2, 3, 35, 41)
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(0)
        pooled = model(x)
        assert torch.allclose(pooled, feats.mean((2, 3)), atol=1e-6)
        model.reset_classifier(3, "max")
        assert torch.allclose(model.forward_head(feats, pre_logits=True), feats.amax((2, 3)))
        assert torch.allclose(model(x), model.fc(feats.amax((2, 3))), atol=1e-6)
        assert model.pretrained_cfg["num_classes"] == 3 and model.get_classifier() is model.fc


# ---------------------------------------------------------------------------------------------
# features_only and feature_info as timm's
# ---------------------------------------------------------------------------------------------
def test_features_only_feature_info_offers_timms_accessors():
    """README says a features_only backbone's `feature_info.channels()` and
    `.reduction()` "are timm's", but timm's FeatureInfo takes an index (`channels(-1)`,
    `reduction(idx)`, as code sizing a neck from the last map calls it), has `get_dicts()`,
    and its entries carry timm's keys `num_chs` / `reduction`. Ours took no index (TypeError),
    had no get_dicts, and its dicts held only 'channels' / 'stride'; it now offers all three."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model("legacy_xception", pretrained=False, features_only=True)
    ours = xception.create_model("xception", features_only=True)
    assert ours.feature_info.channels() == ref.feature_info.channels()  # as documented
    assert ours.feature_info.channels(-1) == ref.feature_info.channels(-1) == 2048
    assert ours.feature_info.reduction(1) == ref.feature_info.reduction(1) == 4
    assert [d["num_chs"] for d in ours.feature_info.get_dicts()] == ref.feature_info.channels()
    assert ours.feature_info[0]["num_chs"] == 64


def test_features_from_timm_weights_are_timms_maps_before_its_relu(tmp_path):
    """With timm's legacy_xception weights, our backbone's five maps equal timm's features_only
    maps at an odd size: exactly at strides 2 and 32, and at strides 4, 8 and 16 once ReLU'd
    (timm hooks the next block's leading ReLU there; ours are the block outputs, as Keras'
    'add' layers are)."""
    timm = pytest.importorskip("timm")
    reference = timm_xception(seed=1)
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    theirs = timm.create_model("legacy_xception", pretrained=False, features_only=True)
    missing = theirs.load_state_dict(
        {f"body.{k}": v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    )
    assert not missing.missing_keys
    theirs.eval()
    ours = xception.create_model("xception", weights=path, features_only=True).eval()
    x = torch.randn(1, 3, 67, 61)
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    assert [t.shape for t in a] == [t.shape for t in b]
    for i, (t, o) in enumerate(zip(a, b, strict=True)):
        o = o if i in (0, 4) else o.relu()
        assert (t - o).abs().max() <= 1e-4 * max(1.0, t.abs().max().item()), i
    assert not torch.equal(b[1], b[1].relu())  # the pre-ReLU maps do differ from timm's


# ---------------------------------------------------------------------------------------------
# timm's model attributes
# ---------------------------------------------------------------------------------------------
def test_default_cfg_is_there_as_on_every_timm_model():
    """Every timm model has `default_cfg` (the older name of `pretrained_cfg`, which
    timm keeps as an alias and code written for timm < 0.9 reads: `model.default_cfg['mean']`);
    ours raised AttributeError. It is now `pretrained_cfg`'s dict."""
    timm = pytest.importorskip("timm")
    assert timm.create_model("resnet18").default_cfg is not None
    model = xception.create_model("xception-compact", num_classes=10)
    assert model.default_cfg == model.pretrained_cfg


def test_head_hidden_size_gives_the_pre_logits_width_as_in_timm():
    """timm 1.0 models report the width of `forward_head(x, pre_logits=True)` as
    `head_hidden_size` (legacy_xception: 2048), beside `num_features` for forward_features;
    ours had no such attribute, and for xception-fc (hidden FC layers) num_features (2048) is
    not that width. It is now there, the pre-logits width."""
    timm = pytest.importorskip("timm")
    assert timm.create_model("legacy_xception").head_hidden_size == 2048
    model = tiny(fc_layers=(40, 30)).eval()
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(torch.randn(1, 3, 33, 33)), True)
    assert pre.shape == (1, 30) and model.num_features == 64
    assert model.head_hidden_size == 30


# ---------------------------------------------------------------------------------------------
# construction, layouts, checkpointing, tracing
# ---------------------------------------------------------------------------------------------
def test_meta_device_construction_then_to_empty_or_assign_loads_exactly():
    """timm's fast-init pattern: build on the meta device, then to_empty + load_state_dict
    (or load_state_dict(assign=True)); both give the source model's logits exactly."""
    src = randomize_bn(tiny()).eval()
    x = torch.randn(2, 3, 34, 33)
    with torch.no_grad():
        expected = src(x)
    with torch.device("meta"):
        a = tiny()
        b = tiny()
    a = a.to_empty(device="cpu")
    a.load_state_dict(src.state_dict())
    b.load_state_dict(src.state_dict(), assign=True)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), expected)
        assert torch.equal(b.eval()(x), expected)


def test_channels_last_model_trains_with_the_same_gradients_and_statistics():
    """model.to(memory_format=channels_last), a training step on even and odd sizes: same
    loss, gradients and batch-norm statistics as the contiguous model."""
    a = tiny().train()
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    for size in ((32, 30), (33, 35)):
        x = torch.randn(3, 3, *size)
        la = a(x).square().mean()
        lb = b(x.contiguous(memory_format=torch.channels_last)).square().mean()
        la.backward()
        lb.backward()
        assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * max(1.0, p.grad.abs().max().item()), n
    for p, q in zip(a.buffers(), b.buffers(), strict=True):
        assert torch.allclose(p.float(), q.float(), rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_with_dropout_dilation_and_hidden_fc_gives_the_plain_step():
    """The paper topology with output_stride 16, dropout and hidden FC layers: checkpointing
    on gives the same logits (the same dropout mask for the same seed), gradients and BN
    statistics; switching it off again runs plainly."""
    a = tiny(output_stride=16, drop_rate=0.5, fc_layers=(24,)).train()
    b = copy.deepcopy(a)
    b.set_grad_checkpointing()
    assert b.grad_checkpointing and not a.grad_checkpointing
    x = torch.randn(2, 3, 36, 37)
    torch.manual_seed(5)
    ya = a(x)
    torch.manual_seed(5)
    yb = b(x)
    assert torch.allclose(ya, yb, atol=1e-6)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    for p, q in zip(a.buffers(), b.buffers(), strict=True):
        assert torch.equal(p, q)
    b.set_grad_checkpointing(False)
    assert not b.grad_checkpointing


def test_jit_trace_of_model_and_backbone_matches_eager_at_the_traced_size():
    """torch.jit.trace (timm's export path) of the model and of a features_only backbone at an
    even size: the traced modules give the eager outputs."""
    model = randomize_bn(tiny()).eval()
    backbone = xception.create_model("xception", features_only=True, out_indices=(1, 3),
                                     **TINY).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 34)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(x), model(x), atol=1e-6)
        tb = torch.jit.trace(backbone, x)
        for t, e in zip(tb(x), backbone(x), strict=True):
            assert torch.allclose(t, e, atol=1e-6)


def test_double_and_half_inputs_need_the_models_dtype_and_then_agree():
    """.double() gives the float32 logits to 1e-6; the backbone follows .double() too."""
    model = randomize_bn(tiny()).eval()
    x = torch.randn(1, 3, 29, 30)
    with torch.no_grad():
        ref = model(x)
        d = copy.deepcopy(model).double()
        assert torch.allclose(d(x.double()).float(), ref, atol=1e-5)
        f = xception.create_model("xception-compact", features_only=True, middle_blocks=1).double()
        assert all(m.dtype == torch.float64 for m in f.eval()(torch.randn(1, 3, 9, 9).double()))


def test_one_image_training_batch_whose_last_map_is_one_pixel_is_named():
    """README: "Any input at least 7x7 works for the paper's model ... the compact
    presets accept any size". A one-image batch in train mode whose maps reach 1x1 (the tiny
    paper model under 33 px, xception-compact under 17 px, e.g. a last, odd-sized batch of a
    fine-tune) failed deep inside batch norm with torch's "Expected more than 1 value per
    channel when training", which names neither the batch nor a fix. The error now names the
    batch, the block and the fixes: a batch of at least 2, larger images, or model.eval()."""
    model = xception.create_model("xception-compact", num_classes=3, middle_blocks=1).train()
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)  # two images: fine
    with pytest.raises(ValueError, match=r"(?i)batch.*(eval|at least 2)"):
        model(torch.randn(1, 3, 8, 8))
