import numpy as np
import pytest
import torch
from torch import nn

from xception.inception import InceptionConfig, InceptionV3Compact
from xception.layers import SeparableConv2d
from xception.model import Xception, XceptionConfig, count_macs, summary

# The paper's separable convs by input channels (depthwise first): entry blocks 2-4, 8 middle
# blocks of 3, exit blocks 13 and 14. Written out by hand from Figure 5, not read off the model.
SEP_IN = [64, 128, 128, 256, 256, 728] + [728] * 24 + [728, 728, 1024, 1536]
PAPER = 22_855_952


def trainable(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_paper_parameter_counts():
    assert trainable(Xception()) == PAPER
    assert trainable(Xception(num_classes=0)) == 20_806_952


@pytest.mark.parametrize("segments", [1, 4, 8])
def test_segments_parameter_count_by_formula(segments):
    # Only the spatial convs change: 9*C per conv depthwise, 9*C*C/k with k segments.
    expected = PAPER - 9 * sum(SEP_IN) + 9 * sum(c * c // segments for c in SEP_IN)
    assert trainable(Xception(segments=segments)) == expected


def test_segments_must_divide_every_width_error_names_the_widths_and_the_counts_that_do():
    with pytest.raises(ValueError, match=r"segments=16 is not valid: it must divide the channels "
                       r"of every separable conv's spatial conv \(64, 128, 256, 728, 1024, "
                       r"1536\): use one of 1, 2, 4, 8 or 'depthwise'"):  # fmt: skip
        Xception(segments=16)
    # A block's own check still names the block, for a segment count the config cannot see.
    from xception.layers import resolve_segments

    with pytest.raises(ValueError, match="segments=3 does not divide 64 channels"):
        resolve_segments(3, 64)


def test_nonresidual_has_no_shortcuts_and_fewer_params():
    model = Xception(residual=False)
    assert not any("shortcut" in name for name, _ in model.named_modules())
    shortcut_params = sum(
        cin * cout + 2 * cout for cin, cout in [(64, 128), (128, 256), (256, 728), (728, 1024)]
    )
    assert trainable(model) == PAPER - shortcut_params
    x = torch.randn(1, 3, 71, 71)
    assert model.eval()(x).shape == (1, 1000)


def test_residual_adds_the_shortcut():
    torch.manual_seed(1)
    cfg = XceptionConfig(width=0.25, middle_blocks=1, num_classes=0, pooling=None)
    model = Xception(cfg).eval()
    block = model.block5  # identity shortcut
    x = torch.randn(1, block.out_channels, 5, 5)
    block.residual = False
    plain = block(x)
    block.residual = True
    assert torch.allclose(block(x), plain + x)


@pytest.mark.parametrize("act,cls", [("relu", nn.ReLU), ("elu", nn.ELU)])
def test_mid_activation_switch(act, cls):
    model = Xception(mid_activation=act)
    seps = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    assert len(seps) == len(SEP_IN)
    assert all(isinstance(s.mid_act, cls) for s in seps)
    assert all(s.mid_act is None for s in Xception().modules() if isinstance(s, SeparableConv2d))


def test_order_pointwise_first_moves_the_spatial_conv():
    model = Xception(order="pointwise_first", width=0.25, middle_blocks=1)
    sep = model.block2.sepconv1
    assert sep.spatial.in_channels == sep.pointwise.out_channels
    assert list(dict(sep.named_children())) == ["pointwise", "spatial"]


def test_module_names_follow_the_paper():
    names = dict(Xception().named_modules())
    for name in ["block1.conv1.conv", "block2.sepconv1.spatial", "block2.sepconv2_bn",
                 "block2.shortcut.conv", "block5.sepconv3", "block13.sepconv2",
                 "block14.sepconv2_bn", "fc"]:  # fmt: skip
        assert name in names
    assert "block15" not in names


@pytest.mark.parametrize("size", [224, 299])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_stride_shapes(size, output_stride):
    model = Xception(output_stride=output_stride, num_classes=0, pooling=None).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    # 'same' downsampling after the VALID stem: ceil division from the stem's output.
    stem = (size - 3) // 2 + 1 - 2
    expected = stem
    for _ in range({32: 4, 16: 3, 8: 2}[output_stride]):
        expected = -(-expected // 2)
    assert out.shape == (1, 2048, expected, expected)


def test_feature_maps_match_feature_info():
    model = Xception().eval()
    with torch.no_grad():
        maps = model.feature_maps(torch.randn(1, 3, 224, 224))
    info = model.feature_info
    assert [i["stride"] for i in info] == [2, 4, 8, 16, 32]
    assert [m.shape[1] for m in maps] == [i["channels"] for i in info] == [64, 128, 256, 728, 2048]
    assert [m.shape[-1] for m in maps] == [109, 55, 28, 14, 7]


@pytest.mark.parametrize("size", [7, 8, 33, 71, 100, 150])
def test_any_input_size_the_architecture_allows(size):
    model = Xception(width=0.25, middle_blocks=1, num_classes=5).eval()
    assert model.min_input_size == 7
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size + 3)).shape == (2, 5)


def test_too_small_input_and_wrong_channels_are_named():
    model = Xception(width=0.25, middle_blocks=1)
    with pytest.raises(ValueError, match=r"smaller than this model's minimum 7x7"):
        model(torch.randn(1, 3, 6, 50))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*in_chans"):
        model(torch.randn(1, 1, 50, 50))


def test_compact_stem_keeps_small_images():
    cfg = XceptionConfig(stem_stride=1, stem_padding="same", width=0.25, middle_blocks=1,
                         in_chans=1, num_classes=10)  # fmt: skip
    model = Xception(cfg).eval()
    assert model.min_input_size == 1
    with torch.no_grad():
        maps = model.feature_maps(torch.randn(2, 1, 28, 28))
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert [m.shape[-1] for m in maps] == [28, 14, 7, 4, 2]


def test_head_api():
    model = Xception(width=0.25, middle_blocks=1, fc_layers=(32, 16), drop_rate=0.5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 16)
        assert model.forward_head(feats).shape == (2, 1000)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(0)
        assert model(x).shape == (2, 16)
        plain = Xception(width=0.25, middle_blocks=1).eval()
        plain.reset_classifier(0, pooling=None)
        assert plain(x).shape == feats.shape
        with pytest.raises(ValueError, match="fc_layers"):
            model.reset_classifier(0, pooling=None)
    fc = [m for m in model.fc_hidden if isinstance(m, nn.Linear)]
    assert [m.out_features for m in fc] == [32, 16]


def test_max_pooling_and_dropout():
    model = Xception(width=0.25, middle_blocks=1, num_classes=0, pooling="max").eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_features(x).amax((2, 3)))
    assert isinstance(Xception(drop_rate=0.5).dropout, nn.Dropout)


@pytest.mark.parametrize(
    "field,value",
    [("pooling", "sum"), ("output_stride", 4), ("padding", "same"), ("order", "x"),
     ("mid_activation", "tanh"), ("width", 0), ("num_classes", -1), ("drop_rate", 1.0),
     ("stem_stride", 3), ("middle_blocks", -1), ("fc_layers", (0,)),
     # once taken by truthiness or as ints, or failing later in another error:
     ("residual", "false"), ("residual", None), ("num_classes", True), ("stem_stride", True),
     ("middle_blocks", True), ("fc_layers", (True,)), ("fc_layers", 4096),
     ("entry_channels", (128, 256)), ("entry_channels", (0, 256, 728)), ("stem_channels", (-8, 64)),
     ("head_channels", (1536,)), ("exit_channels", 0), ("width", float("inf")), ("bn_eps", 0.0),
     ("bn_eps", -1e-3), ("bn_momentum", 1.5)],
)  # fmt: skip
def test_bad_config_values_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field}=.* is not valid"):
        XceptionConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("blocks", 3), ("blocks", (26, 1, 1)), ("n", True)])
def test_bad_inception_config_values_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field}=.* is not valid"):
        InceptionConfig(**{field: value})


@pytest.mark.parametrize(
    "shape,dtype,hint",
    [((3, 32, 32), torch.float32, r"got \(3, 32, 32\): add the batch dimension"),
     ((1, 32, 32, 3), torch.float32, r"channels-last.*permute\(0, 3, 1, 2\)"),
     ((1, 5, 32, 32), torch.float32, "set in_chans"),
     ((1, 3, 32, 32), torch.uint8, r"floating-point images, got torch.uint8")],
)  # fmt: skip
def test_wrong_input_errors_say_the_fix(shape, dtype, hint):
    model = Xception(width=0.25, middle_blocks=1)
    with pytest.raises(ValueError, match=hint):
        model(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize(
    "make", [lambda: Xception(width=0.25, middle_blocks=1), lambda: InceptionV3Compact(width=0.125)]
)
def test_reset_classifier_follows_the_model_dtype(make):
    model = make().double().eval()
    model.reset_classifier(4)
    assert model.fc.weight.dtype == torch.float64
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 4)


def test_pooling_none_requires_no_classifier():
    with pytest.raises(ValueError, match="num_classes=0"):
        XceptionConfig(pooling=None)


def test_width_multiplier_rounds_to_multiples_of_8():
    model = Xception(width=0.5)
    assert model.block4.out_channels == 368  # 728 * 0.5 = 364 -> 368
    assert model.num_features == 1024


def test_config_roundtrip_and_lists_from_yaml():
    cfg = XceptionConfig(fc_layers=[64, 64], entry_channels=[8, 16, 24])
    assert cfg.fc_layers == (64, 64)
    assert XceptionConfig(**cfg.to_dict()) == cfg


def test_macs_and_summary():
    model = Xception()
    assert abs(count_macs(model, (299, 299)) / 1e9 - 8.36) < 0.01
    assert abs(count_macs(model, (224, 224)) / 1e9 - 4.55) < 0.01
    rows = summary(model, (299, 299))
    assert rows[0] == dict(name="block1", shape=(64, 147, 147), params=19488)
    assert sum(r["params"] for r in rows) == PAPER
    assert rows[-1]["shape"] == (1000,)


def test_summary_and_macs_take_any_size_without_running_the_model():
    """They ran the model: `xception info --size 100000` printed its config, then failed for
    want of 320 GB. They now work out shapes on a meta copy, trainable flags included."""
    model = Xception(width=0.25, middle_blocks=1)
    model.block1.requires_grad_(False)
    model.register_forward_pre_hook(lambda *_: pytest.fail("the model itself ran"))
    rows = summary(model, (100_000, 100_000))
    assert rows[0]["params"] == 0 and rows[-2]["shape"][1:] == (3125, 3125)
    assert count_macs(model, (100_000, 100_000)) > 1e4 * count_macs(model, (299, 299))
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_summary_of_a_too_small_input_leaves_the_model_in_training_mode():
    model = Xception(width=0.25, middle_blocks=1).train()
    with pytest.raises(ValueError, match="smaller than this model's minimum"):
        summary(model, (3, 3))
    assert model.training


def test_a_model_larger_than_the_machine_is_refused_before_it_takes_memory(monkeypatch):
    """The count is exact (the paper's 22,855,952 at 4 bytes each fits in exactly that many
    bytes and not one fewer), extended linearly over middle blocks without building them, and
    made on the meta device: width=50 is refused at once instead of paging for minutes."""
    from xception import model as M

    paper = 22_855_952 * 4
    monkeypatch.setattr(M, "_physical_memory", lambda: paper - 1)
    with pytest.raises(ValueError, match=r"22,855,952 parameters .* lower width"):
        Xception()
    monkeypatch.setattr(M, "_physical_memory", lambda: paper)
    assert sum(p.numel() for p in Xception().parameters()) == 22_855_952
    monkeypatch.setattr(M, "_physical_memory", lambda: 24 * 2**30)
    built, init = [], Xception.__init__

    def spy(self, config=None, **overrides):
        built.append(config.middle_blocks)
        init(self, config, **overrides)

    monkeypatch.setattr(Xception, "__init__", spy)
    M._parameter_count.cache_clear()  # counts of earlier tests would hide the builds
    for config in (XceptionConfig(width=50.0), XceptionConfig(middle_blocks=100_000)):
        with pytest.raises(ValueError, match="more than this machine's 24 GiB of memory"):
            Xception(config)
    # Counted with 1 and 2 middle blocks, never 100,000 (that took 9 minutes even on meta).
    assert sorted(set(built)) == [1, 2, 8, 100_000] and built.count(100_000) == 1
    monkeypatch.undo()
    with pytest.raises(ValueError, match="parameters"):
        InceptionV3Compact(InceptionConfig(width=200.0))
    # Models built on the meta device (as the count itself does) are not checked.
    with torch.device("meta"):
        assert Xception(XceptionConfig(width=50.0)).fc.weight.is_meta


@pytest.mark.parametrize(
    "field,value",
    [("stem_stride", 2.0), ("stem_stride", 1.0), ("output_stride", 16.0), ("segments", [4]),
     ("segments", {}), ("segments", 0), ("segments", "Depthwise"), ("segments", True)],
)  # fmt: skip
def test_float_strides_and_bad_segments_are_refused_by_the_config(field, value):
    """stem_stride=2.0 passed `in (1, 2)` and failed in conv2d's forward with a TypeError;
    segments=[4] (YAML's list) failed as an unhashable config inside the memory check."""
    with pytest.raises(ValueError, match=f"{field}=.* is not valid"):
        XceptionConfig(**{field: value})
    with pytest.raises(ValueError, match=f"{field}=.* is not valid"):
        Xception(width=0.125, middle_blocks=1, **{field: value})


def test_grey_batch_without_its_channel_axis_is_told_to_add_it():
    model = Xception(width=0.125, middle_blocks=1, in_chans=1, stem_stride=1, stem_padding="same")
    with pytest.raises(ValueError, match=r"got \(8, 28, 28\): add the channel dimension, "
                       r"x\.unsqueeze\(1\)"):  # fmt: skip
        model(torch.zeros(8, 28, 28))


def test_count_macs_feeds_the_models_own_channel_count():
    grey = Xception(width=0.125, middle_blocks=1, in_chans=1, num_classes=3)
    rgb = Xception(width=0.125, middle_blocks=1, num_classes=3)
    assert count_macs(grey, (32, 32)) == count_macs(grey, (32, 32), 1)
    assert count_macs(rgb, (32, 32)) - count_macs(grey, (32, 32)) == 15 * 15 * 8 * 9 * 2
    assert count_macs(InceptionV3Compact(width=0.125, in_chans=1), (16, 16)) > 0


def test_reset_classifier_on_a_model_without_pooling_says_to_pass_pooling():
    model = Xception(width=0.125, middle_blocks=1, num_classes=0, pooling=None)
    with pytest.raises(ValueError, match=r"reset_classifier\(10\): .*pooling='avg'"):
        model.reset_classifier(10)
    assert model.config.pooling is None and model.fc is None  # left as it was
    model.reset_classifier(10, pooling="avg")
    assert model.eval()(torch.randn(1, 3, 40, 40)).shape == (1, 10)


def test_models_rebuild_from_a_config_dict_as_checkpoints_store_it():
    import json

    cfg = XceptionConfig(width=0.125, middle_blocks=1, fc_layers=(16,), num_classes=4)
    saved = json.loads(json.dumps(cfg.to_dict()))  # lists, as JSON/YAML give them back
    model = Xception(saved)
    assert model.config == cfg
    assert Xception(saved, num_classes=2).config == cfg.replace(num_classes=2)
    model.load_state_dict(Xception(cfg).state_dict())
    icfg = InceptionConfig(width=0.125, blocks=(1, 1, 1))
    assert InceptionV3Compact(json.loads(json.dumps(icfg.to_dict()))).config == icfg
    with pytest.raises(TypeError, match=r"config must be XceptionConfig\(\.\.\.\) or a dict"):
        Xception(icfg)


@pytest.mark.parametrize("size", [32, 33])
def test_stride_2_same_stem_pads_like_tensorflow(size):
    """padding='keras' promises TensorFlow's 'same': a 3x3/2 conv on an even size pads (0, 1).
    A stem_stride=2, stem_padding='same' stem padded (1, 1) at every size, so its outputs
    differed from Keras' Conv2D(strides=2, padding='same') on even inputs (by 4.3 here)."""
    import torch.nn.functional as F

    from xception.layers import tf_same_padding

    model = Xception(width=0.125, middle_blocks=1, stem_stride=2, stem_padding="same",
                     num_classes=0, pooling=None).eval()  # fmt: skip
    stem = model.block1
    x = torch.randn(2, 3, size, size + 1)
    top, bottom = tf_same_padding(size, 3, 2)
    left, right = tf_same_padding(size + 1, 3, 2)
    conv = stem.conv1.conv
    with torch.no_grad():
        ref = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, stride=2)
        ref = stem.conv2(stem.conv1.act(stem.conv1.bn(ref)))
        assert torch.allclose(stem(x), ref, atol=1e-5)
        # The timm port's symmetric padding stays symmetric.
        sym = Xception(model.config.replace(padding="symmetric")).eval()
        sym.load_state_dict(model.state_dict())
        ref = F.conv2d(x, conv.weight, stride=2, padding=1)
        assert torch.allclose(sym.block1(x), stem.conv2(stem.conv1.act(stem.conv1.bn(ref))),
                              atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    "batch,hint",
    [(np.zeros((1, 32, 32, 3), "float32"),
      r"got a numpy\.ndarray: .*torch\.from_numpy\(x\)\.permute\(0, 3, 1, 2\)\.float\(\)"),
     ([[0.0]], r"got a list"), (None, r"got a NoneType")],
    ids=["numpy", "list", "None"],
)  # fmt: skip
def test_input_that_is_not_a_tensor_is_named(batch, hint):
    """A numpy batch (what Keras takes) was told to `.permute`, which numpy lacks, or failed
    with "'numpy.ndarray' object has no attribute 'is_floating_point'"; a list or None with
    an AttributeError on `.ndim`."""
    from xception.model import check_float_images

    model = Xception(width=0.125, middle_blocks=1)
    for call in (model, model.forward_features, model.feature_maps, check_float_images):
        with pytest.raises(TypeError, match=r"expected a torch\.Tensor.*" + hint):
            call(batch)


def test_summary_and_count_macs_take_a_size_or_a_pair_and_name_anything_else():
    """count_macs(model, 299) failed with "Value after * must be an iterable"; timm's
    (3, 299, 299) was told to "set in_chans", which was not the problem."""
    model = Xception(width=0.125, middle_blocks=1)
    assert count_macs(model, 40) == count_macs(model, (40, 40)) == count_macs(model, [40, 40])
    assert summary(model, 40) == summary(model, (40, 40))
    for bad in ((3, 40, 40), (40,), 40.0, (40, 0), True, "40"):
        for call in (count_macs, summary):
            with pytest.raises(ValueError, match=r"input_size=.*: give the image height and "
                               r"width.*e\.g\. 299 or \(299, 299\)"):  # fmt: skip
                call(model, bad)


def test_meta_copy_leaves_the_callers_hooks_behind_without_copying_them():
    """The hooks were deep-copied with the model, then cleared: a hook holding a lock (or
    anything else deepcopy refuses) made count_macs and summary fail with "cannot pickle
    '_thread.lock' object", and one holding recorded activations had them copied."""
    import threading

    from xception.model import meta_copy

    class Recorder:
        def __init__(self):
            self.lock, self.maps = threading.Lock(), [torch.zeros(1000)]

        def __call__(self, module, inputs, output):
            self.maps.append(output)

        def pre(self, module, inputs):
            self.maps.append(None)

        def backward(self, module, grad_in, grad_out):
            self.maps.append(None)

    model = Xception(width=0.125, middle_blocks=1, num_classes=3)
    rec = Recorder()
    handles = [model.block2.register_forward_hook(rec), model.register_forward_pre_hook(rec.pre),
               model.block3.register_full_backward_hook(rec.backward),
               model.block4.register_forward_hook(lambda m, a, k, o: rec.maps.append(0),
                                                  with_kwargs=True)]  # fmt: skip
    replica = meta_copy(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in replica.modules())  # fmt: skip
    assert count_macs(model, (40, 40)) > 0 and summary(model, (40, 40))
    assert len(rec.maps) == 1  # the caller's hooks never ran on the replica
    model.eval()(torch.randn(1, 3, 40, 40))
    assert len(rec.maps) == 4  # and still run on the model itself
    assert len(handles) == 4 and model.block3._backward_hooks


def test_reset_classifier_drops_the_old_heads_class_names():
    """A fresh head kept the weights' class names: after reset_classifier(1000) on ImageNet
    weights, predict labelled the untrained head's outputs with ImageNet's names, as the
    classifier rule of create_model (class names dropped with a new head) forbids."""
    from xception.weights import Weights

    meta = Weights(name="w", format="xception", num_classes=3, categories=("a", "b", "c"),
                   input_size=64, mean=(0.1, 0.2, 0.3))  # fmt: skip
    for model in (Xception(width=0.125, middle_blocks=1, num_classes=3),
                  InceptionV3Compact(width=0.125, num_classes=3)):  # fmt: skip
        model.weights_meta = meta
        model.reset_classifier(3)
        assert model.weights_meta == meta.replace(categories=None)  # preprocessing kept
        model.reset_classifier(5)
        assert model.weights_meta.num_classes == 5 and model.weights_meta.categories is None
    plain = Xception(width=0.125, middle_blocks=1, num_classes=3)
    plain.reset_classifier(2)  # a model without weights metadata gets none
    assert getattr(plain, "weights_meta", None) is None


def test_numpy_and_torch_integers_are_taken_as_ints():
    """num_classes = labels.max() + 1 on a numpy array is an np.int64: create_model and
    reset_classifier refused it with "use a non-negative integer", which it is. They are now
    plain ints in the config (which goes to JSON in checkpoints and safetensors files)."""
    import json

    from xception import create_model

    model = create_model("xception", width=0.125, middle_blocks=np.int64(1),
                         num_classes=np.arange(10).max() + 1)  # fmt: skip
    assert model.config.num_classes == 10 and type(model.config.num_classes) is int
    assert type(model.config.middle_blocks) is int
    json.dumps(model.config.to_dict())
    # The same for the switch with a text value, and for widths from a numpy array: these
    # were refused ("use a positive integer", "use 2 positive widths") where ints passed.
    config = XceptionConfig(segments=np.int64(4), stem_channels=tuple(np.array([16, 32])),
                            fc_layers=[np.int32(64)], entry_channels=(torch.tensor(64), 128, 256))  # fmt: skip
    assert config == XceptionConfig(segments=4, stem_channels=(16, 32), fc_layers=(64,),
                                    entry_channels=(64, 128, 256))  # fmt: skip
    assert {type(v) for v in (config.segments, *config.stem_channels, *config.fc_layers,
                              *config.entry_channels)} == {int}  # fmt: skip
    json.dumps(config.to_dict())
    with pytest.raises(ValueError, match=r"stem_channels=.* is not valid"):
        XceptionConfig(stem_channels=(np.float64(16.0), 32))
    with pytest.raises(ValueError, match=r"segments=.* is not valid"):
        XceptionConfig(segments=np.float64(4.0))
    # A number n (timm's last n maps) as features_only takes an int: a numpy or torch one had
    # been iterated over.
    for count in (np.int64(3), torch.tensor(3)):
        backbone = create_model("xception", width=0.125, middle_blocks=1, features_only=True,
                                out_indices=count)  # fmt: skip
        assert backbone.out_indices == (2, 3, 4)
    backbone = create_model("xception", width=0.125, middle_blocks=1, features_only=True,
                            out_indices=np.array([1, 4]))  # fmt: skip
    assert backbone.out_indices == (1, 4)
    model.reset_classifier(torch.tensor(3))
    assert model.fc.out_features == 3 and type(model.config.num_classes) is int
    assert type(InceptionConfig(num_classes=np.int32(4)).num_classes) is int
    inception = InceptionV3Compact(width=0.125, blocks=(1, 1, 1), num_classes=2)
    inception.reset_classifier(np.int64(4))
    assert inception.fc.out_features == 4 and type(inception.config.num_classes) is int
    with pytest.raises(ValueError, match=r"num_classes=.* is not valid"):
        XceptionConfig(num_classes=np.float64(10.0))
    with pytest.raises(ValueError, match=r"reset_classifier\(4\): .*pooling='avg'"):
        Xception(width=0.125, middle_blocks=1, num_classes=0, pooling=None).reset_classifier(
            np.int64(4)
        )


@pytest.mark.parametrize(
    "overrides",
    [{}, {"padding": "symmetric"}, {"padding": "keras", "stem_padding": "same"}],
    ids=["paper", "symmetric", "keras-same-stem"],
)
def test_torch_fx_traces_the_model_and_feature_extraction_works(overrides):
    """torch.fx.symbolic_trace failed with a TraceError: the 'same' pools and the 'same' stem
    work out their padding from the input's size in Python, and check_input refused the Proxy.
    torchvision's create_feature_extractor, which builds on it, failed with it."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from xception.layers import same_max_pool2d, tf_same_pad

    torch.manual_seed(0)
    model = Xception(XceptionConfig(num_classes=5, **overrides)).eval()
    graph = torch.fx.symbolic_trace(model)
    leaves = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert same_max_pool2d in leaves or overrides.get("padding") == "symmetric"
    assert (tf_same_pad in leaves) == (overrides.get("stem_padding") == "same")
    with torch.no_grad():
        for size in (71, 72):  # odd and even sizes pad differently: traced once, both right
            x = torch.randn(2, 3, size, size)
            assert torch.equal(graph(x), model(x))
        features = create_feature_extractor(model, {"block4": "c3", "block14": "c5"})
        out = features(torch.randn(1, 3, 72, 72))
    assert out["c3"].shape == (1, 728, 5, 5) and out["c5"].shape == (1, 2048, 3, 3)


def test_every_preset_traces_with_torch_fx():
    """README promises fx tracing for every model, the Inception presets included."""
    from xception import create_model, list_models

    for name in list_models():
        graph = torch.fx.symbolic_trace(create_model(name).eval())
        assert any(n.op == "call_module" for n in graph.graph.nodes), name


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of `net(x)`."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return total


@pytest.mark.parametrize(
    "make",
    [lambda: Xception(XceptionConfig(num_classes=5, width=0.25, middle_blocks=2)),
     lambda: InceptionV3Compact(InceptionConfig(num_classes=5, in_chans=1, width=0.25))],
)  # fmt: skip
def test_grad_checkpointing_keeps_less_and_gives_the_same_step(make):
    """timm's `set_grad_checkpointing`: the same gradients and batch-norm statistics, bitwise
    (the recomputation must not update the running statistics a second time), for a fraction
    of the activations kept."""
    import copy

    torch.manual_seed(0)
    plain = make().train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = torch.randn(4, plain.config.in_chans, 96, 96)
    for net in (plain, ckpt):
        net(x).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        assert torch.equal(b, c), name  # num_batches_tracked 1, not 2
    assert _saved_bytes(ckpt, x) < _saved_bytes(plain, x) / 5
    # Evaluation and no_grad take the plain path; the switch goes off again.
    ckpt.eval()
    with torch.no_grad():
        assert torch.equal(ckpt(x), plain.eval()(x))
    ckpt.train().set_grad_checkpointing(False)
    assert _saved_bytes(ckpt, x) == _saved_bytes(plain.train(), x)


def test_a_features_only_backbone_checkpoints_its_blocks_too():
    from xception import create_model

    torch.manual_seed(0)
    backbone = create_model("xception", features_only=True, out_indices=(1, 2), width=0.25)
    x = torch.randn(2, 3, 96, 96)
    before = _saved_bytes(backbone.train(), x)
    backbone.set_grad_checkpointing()
    assert _saved_bytes(backbone, x) < before / 3


@pytest.mark.slow
def test_grad_checkpointing_under_torch_compile_gives_the_plain_step():
    """Under torch.compile the blocks are checkpointed without the eager path's copies of the
    batch-norm buffers (the compiled recomputation is pure): gradients match the plain step's,
    and the running statistics are updated once, not twice. Compiled by Dynamo and AOTAutograd
    (the aot_eager backend), which trace the checkpoint and decide its recomputation; inductor's
    kernels for the same graph added 35 s to the suite and nothing this test checks."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    plain = Xception(XceptionConfig(num_classes=5, width=0.25, middle_blocks=1)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = torch.randn(2, 3, 72, 72)
    plain(x).square().mean().backward()
    counters.clear()
    torch.compile(ckpt, backend="aot_eager")(x).square().mean().backward()
    assert counters["stats"]["unique_graphs"] >= 1  # it ran compiled, not eager
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-6, msg=name)  # tracked: 1, not 2


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def test_output_stride_dilates_what_follows_like_the_a_trous_algorithm():
    """A smaller output stride drops a downsampling stride and dilates every later 3x3 conv by
    2 (the 'a trous' algorithm): the same weights then compute the stride-32 network's features
    on a grid twice as dense, so every other row and column of the denser maps is exactly the
    stride-32 map. 71 px makes the maps entering the dropped strides odd (9 and 5 px), where
    'same' windows are centred on the even pixels."""
    cfg = XceptionConfig(width=0.125, middle_blocks=2, num_classes=0, pooling=None)
    torch.manual_seed(0)
    ref = _randomise_bn(Xception(cfg)).eval()
    x = torch.randn(2, 3, 71, 71)
    with torch.no_grad():
        maps32 = ref.feature_maps(x)
        for output_stride in (16, 8):
            model = Xception(cfg.replace(output_stride=output_stride)).eval()
            model.load_state_dict(ref.state_dict())
            maps = model.feature_maps(x)
            # Up to the middle flow: output stride 16 is the stride-32 network; 8 is 2x denser.
            step = 2 if output_stride == 8 else 1
            assert maps[3].shape[-1] == {16: 5, 8: 9}[output_stride]
            assert torch.allclose(maps[3][..., ::step, ::step], maps32[3], atol=1e-5)
            if output_stride == 16:  # the exit flow's pool is the only stride dropped
                assert maps[4].shape[-1] == 5 and maps32[4].shape[-1] == 3
                assert torch.allclose(maps[4][..., ::2, ::2], maps32[4], atol=1e-5)
    dilations = {n: m.spatial.dilation[0] for n, m in model.named_modules()
                 if isinstance(m, SeparableConv2d)}  # fmt: skip
    # Output stride 8 (2 middle blocks: exit block7, head block8): block4 keeps its input's
    # dilation 1, the middle flow and the exit block take 2, the head (after the exit block's
    # dropped stride) 4.
    assert {dilations[f"block{b}.sepconv1"] for b in (2, 3, 4)} == {1}
    assert {dilations[f"block{b}.sepconv2"] for b in (5, 6, 7)} == {2}
    assert dilations["block8.sepconv1"] == dilations["block8.sepconv2"] == 4


def test_a_strided_block_whose_width_does_not_change_gets_a_projection_shortcut():
    """The shortcut must downsample whenever the block does, even when the channel count stays
    (here 128 -> 128 in block2): an identity shortcut would add a map twice the size."""
    cfg = XceptionConfig(stem_channels=(32, 128), width=0.25, middle_blocks=1, num_classes=3)
    model = _randomise_bn(Xception(cfg)).eval()
    block = model.block2
    assert block.shortcut is not None and block.shortcut.conv.stride == (2, 2)
    x = torch.randn(1, 32, 9, 9)  # 0.25 x 128 channels
    with torch.no_grad():
        block.residual = False
        plain = block(x)
        block.residual = True
        assert torch.allclose(block(x), plain + block.shortcut(x), atol=1e-6)
        assert model(torch.randn(2, 3, 71, 71)).shape == (2, 3)


def test_nonresidual_blocks_compute_their_main_path_alone():
    """residual=False drops the shortcut from the computation, not just from the parameters."""
    torch.manual_seed(1)
    model = _randomise_bn(Xception(width=0.25, middle_blocks=1, residual=False)).eval()
    for name, shape in (("block2", (1, 16, 9, 9)), ("block5", (1, 184, 5, 5))):
        block = getattr(model, name)
        x = torch.randn(shape)
        expected = x
        with torch.no_grad():
            for i in range(1, block.num_convs + 1):
                act = getattr(block, f"sepconv{i}_act", None)
                expected = act(expected) if act is not None else expected
                expected = getattr(block, f"sepconv{i}_bn")(getattr(block, f"sepconv{i}")(expected))
            if block.pool is not None:
                expected = block.pool(expected)
            assert torch.allclose(block(x), expected, atol=1e-6)


def test_config_range_edges_are_accepted_and_in_chans_0_is_refused():
    """Each range is checked at its documented edges: momentum 0 and 1 are valid fractions,
    middle_blocks=0 (no middle flow) is valid, in_chans=0 and a fourth entry width are not, and
    YAML's "1e-3" (read as text) is the number 0.001."""
    assert XceptionConfig(bn_momentum=0.0).bn_momentum == 0.0
    assert XceptionConfig(bn_momentum=1.0).bn_momentum == 1.0
    assert XceptionConfig(bn_eps="1e-3").bn_eps == 0.001
    for field, value in (("in_chans", 0), ("entry_channels", (128, 256, 728, 1024)),
                         ("stem_channels", (32, 64, 64)), ("bn_momentum", -0.1)):  # fmt: skip
        with pytest.raises(ValueError, match=f"{field}=.* is not valid"):
            XceptionConfig(**{field: value})
    # True is not a class count, also where reset_classifier takes numpy's integers.
    model = Xception(width=0.125, middle_blocks=1, num_classes=3)
    with pytest.raises(ValueError, match=r"num_classes=True is not valid"):
        model.reset_classifier(True)


def test_no_middle_flow_gives_entry_exit_and_head_with_the_stride_16_map_from_block4():
    model = Xception(width=0.125, middle_blocks=0, num_classes=4).eval()
    assert model.block_names == ["block1", "block2", "block3", "block4", "block5", "block6"]
    info = model.feature_info
    assert [i["module"] for i in info] == ["block1", "block2", "block3", "block4", "block6"]
    assert [i["stride"] for i in info] == [2, 4, 8, 16, 32]
    with torch.no_grad():
        maps = model.feature_maps(torch.randn(1, 3, 71, 71))
        assert model(torch.randn(2, 3, 71, 71)).shape == (2, 4)
    # 71 -> stem 35 -> 33, then 'same' halvings: 17, 9, 5, 3.
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 33, 33), (16, 17, 17), (32, 9, 9),
                                                  (88, 5, 5), (256, 3, 3)]  # fmt: skip


def test_width_rounding_keeps_at_least_8_channels_and_width_1_keeps_any_width():
    # Widths by hand: round(c * 0.01) to a multiple of 8, at least 8; 2048 -> 20.48 -> 24.
    tiny = Xception(width=0.01, middle_blocks=1)
    assert [i["channels"] for i in tiny.feature_info] == [8, 8, 8, 8, 24]
    assert tiny.fc.in_features == 24
    # width=1.0 takes the given widths as they are, multiples of 8 or not.
    odd = Xception(stem_channels=(5, 10), entry_channels=(12, 20, 36), exit_channels=44,
                   head_channels=(50, 60), middle_blocks=1, num_classes=2)  # fmt: skip
    assert [i["channels"] for i in odd.feature_info] == [10, 12, 20, 36, 60]
    assert odd.block6.sepconv2.pointwise.out_channels == 44
    assert odd.block7.sepconv1.pointwise.out_channels == 50


def test_relus_sit_where_figure_5_puts_them():
    """Figure 5: block2 follows the stem's ReLU, so only its second conv has one before it;
    the other entry blocks and the exit block have one before each conv, the middle blocks
    three; the last module's two convs are each followed by a ReLU, so features are >= 0."""
    model = Xception(width=0.125, middle_blocks=2, num_classes=0, pooling=None).eval()
    relus = {n: sum(isinstance(m, nn.ReLU) for m in getattr(model, n).modules())
             for n in model.block_names[1:]}  # fmt: skip
    assert relus == dict(block2=1, block3=2, block4=2, block5=3, block6=3, block7=2, block8=2)
    assert not hasattr(model.block2, "sepconv1_act") and hasattr(model.block2, "sepconv2_act")
    with torch.no_grad():
        out = _randomise_bn(model)(torch.randn(2, 3, 40, 40))
    assert out.min() == 0 and out.max() > 0


def test_blocks_leave_their_input_unchanged_for_the_shortcut():
    """The leading ReLU is not in place: it would overwrite the input the shortcut adds."""
    model = _randomise_bn(Xception(width=0.25, middle_blocks=1, num_classes=0)).eval()
    for name, shape in (("block3", (1, 32, 9, 9)), ("block5", (1, 184, 5, 5))):
        block = getattr(model, name)
        x = torch.randn(shape)
        kept = x.clone()
        with torch.no_grad():
            out = block(x)
            assert torch.equal(x, kept), name
            block.residual = False
            plain = block(x)
            block.residual = True
        skip = x if block.shortcut is None else block.shortcut(x)
        assert torch.allclose(out, plain + skip, atol=1e-6), name


def test_symmetric_padding_pools_like_the_timm_port_and_keras_like_tensorflow():
    """padding='symmetric' pads the blocks' 3x3/2 max pools by 1 on every side (timm's port);
    'keras' pads an even map (0, 1), as TensorFlow does, with -inf."""
    import torch.nn.functional as F

    x = torch.randn(1, 16, 8, 8)
    sym = Xception(width=0.125, middle_blocks=1, padding="symmetric")
    keras = Xception(width=0.125, middle_blocks=1)
    for name in ("block2", "block3", "block4", "block6"):
        assert torch.equal(getattr(sym, name).pool(x), F.max_pool2d(x, 3, 2, padding=1))
        ref = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
        assert torch.equal(getattr(keras, name).pool(x), ref)
    assert not torch.equal(F.max_pool2d(x, 3, 2, padding=1), ref)  # the two differ here


def test_every_batch_norm_takes_the_configs_eps_and_momentum():
    model = Xception(width=0.125, middle_blocks=1, bn_eps=0.02, bn_momentum=0.3)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # 2 in the stem, 2 per entry/exit block plus 4 shortcuts, 3 in the middle block, 2 last.
    assert len(bns) == 2 + 4 * 2 + 4 + 3 + 2
    assert {(m.eps, m.momentum) for m in bns} == {(0.02, 0.3)}


def test_hidden_fc_layers_and_classifier_compute_relu_linear_by_hand():
    import torch.nn.functional as F

    model = Xception(width=0.125, middle_blocks=1, fc_layers=(12, 6), num_classes=5).eval()
    feats = torch.randn(2, model.num_features, 3, 3)
    (l1, _), (l2, _) = model.fc_hidden[:2], model.fc_hidden[2:]
    hidden = F.relu(F.linear(F.relu(F.linear(feats.mean((2, 3)), l1.weight, l1.bias)),
                             l2.weight, l2.bias))  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(model.forward_head(feats, pre_logits=True), hidden, atol=1e-6)
        logits = F.linear(hidden, model.fc.weight, model.fc.bias)
        assert torch.allclose(model.forward_head(feats), logits, atol=1e-6)


def test_dropout_acts_in_training_before_the_classifier():
    import torch.nn.functional as F

    model = Xception(width=0.125, middle_blocks=1, drop_rate=0.5, num_classes=3)
    feats = torch.randn(4, model.num_features, 2, 2)
    pooled = feats.mean((2, 3))
    with torch.no_grad():
        assert torch.allclose(model.eval().forward_head(feats, pre_logits=True), pooled)
        model.train()
        torch.manual_seed(3)
        dropped = model.forward_head(feats, pre_logits=True)
        torch.manual_seed(3)
        logits = model.forward_head(feats)
    kept = dropped != 0
    assert 0.3 < kept.float().mean() < 0.7  # about half the features dropped ...
    assert torch.allclose(dropped[kept], 2 * pooled[kept])  # ... the others scaled by 2
    assert torch.allclose(logits, F.linear(dropped, model.fc.weight, model.fc.bias), atol=1e-6)


def test_weights_are_initialised_he_normal_and_glorot_with_zero_bias():
    """Convs He-normal over fan-out (std sqrt(2 / (out * k * k))), Linears Glorot-uniform
    (bound sqrt(6 / (in + out))) with zero bias, a new classifier from reset_classifier too."""
    torch.manual_seed(0)
    model = Xception(width=0.25, middle_blocks=1, num_classes=300)
    w = model.block6.sepconv2.pointwise.weight  # 1x1, 184 -> 256
    assert abs(w.std().item() / (2 / 256) ** 0.5 - 1) < 0.05
    w = model.block1.conv2.conv.weight  # 3x3, 8 -> 16
    assert abs(w.std().item() / (2 / (16 * 9)) ** 0.5 - 1) < 0.1
    for num_classes in (300, 500):
        if num_classes != 300:
            model.reset_classifier(num_classes)
        fc = model.fc
        bound = (6 / (fc.in_features + num_classes)) ** 0.5
        assert torch.count_nonzero(fc.bias) == 0
        assert bound * 0.95 < fc.weight.abs().max() <= bound
        assert abs(fc.weight.std().item() / (bound / 3**0.5) - 1) < 0.05


def test_reset_classifier_to_0_keeps_a_model_without_pooling_as_it_is():
    model = Xception(width=0.125, middle_blocks=1, num_classes=0, pooling=None).eval()
    model.reset_classifier(0)
    assert model.fc is None and model.config.pooling is None
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 40)).shape == (1, 256, 2, 2)


def test_features_only_refuses_a_map_twice_and_keeps_the_weights_metadata():
    from xception.model import XceptionFeatures
    from xception.weights import Weights

    model = Xception(width=0.125, middle_blocks=1, num_classes=3)
    for bad in ((1, 1), (2, -3)):  # -3 is map 2 again
        with pytest.raises(ValueError, match=r"out_indices=.* give each map once"):
            XceptionFeatures(model, bad)
    model.weights_meta = Weights(name="w", format="xception", num_classes=3, input_size=64,
                                 mean=(0.1, 0.2, 0.3))  # fmt: skip
    backbone = XceptionFeatures(model, (1, 2))
    assert backbone.weights_meta is model.weights_meta
    assert backbone.pretrained_cfg["input_size"] == (3, 64, 64)
    assert backbone.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)


def test_count_macs_by_hand_on_a_small_network():
    """Per conv: output elements x (input channels / groups) x kernel area; per Linear: in x
    out (a bias is an addition, not a multiply-accumulate); other layers count nothing."""
    net = nn.Sequential(
        nn.Conv2d(3, 6, (1, 3), padding=(0, 1)),  # 6*5*6 outputs x 3 x 1*3
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3),  # 6*5*6 outputs x 2 x 3*3
        nn.Flatten(),
        nn.Linear(180, 7),  # 180 x 7
    )
    assert count_macs(net, (5, 6)) == 180 * 9 + 180 * 18 + 180 * 7


def test_count_macs_and_summary_of_a_training_model_in_another_dtype():
    """They count on an evaluation-mode replica (a training one refuses batch norm over one
    value: the last maps are 1x1 at the minimum input size), in the model's own dtype; the
    model itself stays in training mode."""
    from xception.model import meta_copy

    model = Xception(width=0.125, middle_blocks=1, fc_layers=(16,), num_classes=3).train()
    assert not meta_copy(model).training and model.training
    rows = summary(model, 7)
    assert rows[-2]["shape"] == (256, 1, 1) and rows[-1]["shape"] == (3,)
    assert sum(r["params"] for r in rows) == trainable(model)
    assert rows[-1]["params"] == 256 * 16 + 16 + 16 * 3 + 3
    assert count_macs(model, 7) > 0 and model.training
    double = model.double()
    assert count_macs(double, 40) == count_macs(model.float(), 40)
    assert summary(model.double(), 40) == summary(model.float(), 40)


def test_the_memory_check_passes_on_errors_other_than_an_overflow(monkeypatch):
    """Only a weight size overflowing becomes "more parameters than a tensor can hold"; any
    other error of the count is not disguised as one."""
    from xception import model as M

    def fail(cls, config):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(M, "_physical_memory", lambda: 2**40)
    monkeypatch.setattr(M, "_parameter_count", fail)
    with pytest.raises(RuntimeError, match="some other failure"):
        Xception(width=0.125, middle_blocks=1)
