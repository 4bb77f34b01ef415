"""The model as a Python object, used as a demanding timm / PyTorch user would: copies and
pickles over every paper switch, parameter counts by formula, state dicts across switches,
dtypes and autocast, odd input layouts, freezing, functional calls, checkpointing, dropout in
eval, minimum sizes, other channel counts, module names and threads."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from helpers import trained_like
from torch import nn

import xception
from xception.weights import Weights, WeightsError, save_safetensors

# A tiny paper-topology model (entry, one middle block, exit), every switch at little cost.
TINY = dict(stem_channels=(8, 16), entry_channels=(16, 24, 32), middle_blocks=1,
            exit_channels=32, head_channels=(48, 64), num_classes=7)  # fmt: skip

SWITCHES = {
    "paper": {},
    "nonresidual": dict(residual=False),
    "mid_relu": dict(mid_activation="relu"),
    "mid_elu": dict(mid_activation="elu"),
    "pointwise_first": dict(order="pointwise_first"),
    "segments1": dict(segments=1),
    "segments4": dict(segments=4),
    "pw_first_seg2_elu": dict(order="pointwise_first", segments=2, mid_activation="elu"),
}


def tiny(**overrides) -> xception.Xception:
    return xception.create_model("xception", **{**TINY, **overrides})


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return (a.double() - b.double()).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# ---------------------------------------------------------------------------------------------
# copies and pickles, every switch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_deepcopy_pickle_and_torch_save_are_independent_exact_copies_for_every_switch(switch):
    """deepcopy, pickle and torch.save/torch.load(weights_only=False) of each variant give the
    same logits, config and checkpointing flag; training a copy leaves the original alone."""
    model = trained_like(tiny(**SWITCHES[switch]))
    model.set_grad_checkpointing()
    x = torch.randn(2, 3, 34, 33)
    with torch.no_grad():
        ref = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                  torch.load(buf, weights_only=False)):  # fmt: skip
        assert other.config == model.config and other.grad_checkpointing
        with torch.no_grad():
            assert torch.equal(other.eval()(x), ref)
        other.train()
        other(torch.randn(2, 3, 34, 33)).square().mean().backward()
        with torch.no_grad():
            for p in other.parameters():
                p -= 0.1 * p.grad
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_pickled_model_keeps_its_weights_metadata(tmp_path):
    """A model made from a safetensors file with metadata keeps it through a pickle."""
    src = tiny(num_classes=3)
    meta = Weights(name="t", format="xception", num_classes=3, categories=("a", "b", "c"),
                   input_size=40)  # fmt: skip
    path = save_safetensors(src, tmp_path / "w.safetensors", meta)
    model = xception.create_model("xception", weights=path)
    again = pickle.loads(pickle.dumps(model))
    assert again.weights_meta == model.weights_meta
    assert again.weights_meta.categories == ("a", "b", "c")
    assert again.pretrained_cfg == model.pretrained_cfg


# ---------------------------------------------------------------------------------------------
# parameter counts by formula, state dicts across switches
# ---------------------------------------------------------------------------------------------
def _formula(residual=True, order="depthwise_first", segments="depthwise", **_):
    """TINY's trainable parameters, written out from Figure 5 (not read off the model)."""
    seps = ([(16, 16), (16, 16), (16, 24), (24, 24), (24, 32), (32, 32)] + [(32, 32)] * 3
            + [(32, 32), (32, 32), (32, 48), (48, 64)])  # fmt: skip
    total = 3 * 8 * 9 + 2 * 8 + 8 * 16 * 9 + 2 * 16  # stem: two convs and their BNs
    for cin, cout in seps:
        c = cin if order == "depthwise_first" else cout  # channels of the spatial conv
        groups = c if segments == "depthwise" else segments
        total += 9 * c * (c // groups) + cin * cout + 2 * cout
    if residual:  # 1x1/2 projection + BN around blocks 2, 3, 4 and the exit block 13
        total += sum(i * o + 2 * o for i, o in [(16, 16), (16, 24), (24, 32), (32, 32)])
    return total + 64 * 7 + 7


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_parameter_count_of_every_switch_follows_the_formula(switch):
    model = tiny(**SWITCHES[switch])
    assert sum(p.numel() for p in model.parameters()) == _formula(**SWITCHES[switch])


def test_paper_pointwise_first_parameter_count_by_formula():
    """The paper's model with the pointwise conv first: the spatial convs run on the output
    widths (9 * C_out each) instead of the input widths."""
    sep_in = [64, 128, 128, 256, 256, 728] + [728] * 24 + [728, 728, 1024, 1536]
    sep_out = [128, 128, 256, 256, 728, 728] + [728] * 24 + [728, 1024, 1536, 2048]
    with torch.device("meta"):
        model = xception.create_model("xception", order="pointwise_first")
    expected = 22_855_952 - 9 * sum(sep_in) + 9 * sum(sep_out)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_state_dict_strict_round_trip_for_every_switch(switch):
    a = trained_like(tiny(**SWITCHES[switch]))
    b = tiny(**SWITCHES[switch]).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 36, 35)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_state_dicts_across_switches_load_only_where_the_tensors_are_the_same():
    """mid_activation adds no parameters (the same keys load, the outputs differ); residual,
    order and segments change the tensors and a strict load refuses them."""
    sd = tiny().state_dict()
    relu = tiny(mid_activation="relu")
    relu.load_state_dict(sd, strict=True)
    for other in (dict(residual=False), dict(order="pointwise_first"), dict(segments=2)):
        with pytest.raises(RuntimeError):
            tiny(**other).load_state_dict(sd, strict=True)
    plain = tiny().eval()
    plain.load_state_dict(sd)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert not torch.equal(relu.eval()(x), plain(x))


# ---------------------------------------------------------------------------------------------
# dtypes, autocast, layouts
# ---------------------------------------------------------------------------------------------
def test_autocast_bfloat16_agrees_with_float32_and_trains_float32_weights():
    """torch.autocast('cpu', bfloat16): bf16 logits within bf16's precision of the fp32 ones;
    a training step under it gives float32 gradients close to the fp32 step's."""
    model = trained_like(tiny())
    x = torch.randn(2, 3, 40, 38)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert close(out, ref, 3e-2)
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    a(x).square().mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = b(x).float().square().mean()
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in b.parameters())
    assert close(b.fc.weight.grad, a.fc.weight.grad, 0.1)


def test_float16_autocast_and_half_model_agree_with_float32():
    model = trained_like(tiny())
    x = torch.randn(2, 3, 33, 34)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.float16):
            assert close(model(x), ref, 1e-2)
        assert close(copy.deepcopy(model).half()(x.half()), ref, 1e-2)


def test_a_float64_model_under_autocast_names_the_mismatch():
    """Autocast leaves float64 weights as they are and casts a float32 batch down: a
    `.double()` model under bf16 autocast failed in its first conv with torch's "expected
    scalar type BFloat16 but found Double". It now names both dtypes and the fixes; a float64
    batch, which autocast leaves alone too, still runs."""
    model = copy.deepcopy(trained_like(tiny())).double()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"weights are float64, which autocast leaves as "
                           r"they are, while it casts the torch.float32 batch to torch.bfloat16: "
                           r"use a float32 model"):  # fmt: skip
            model(x)
        out = model(x.double())
    assert out.dtype == torch.float64


def test_inputs_sliced_from_larger_tensors_give_the_contiguous_outputs():
    """A channel slice of a 5-channel tensor, every other image of a batch, a transposed copy
    and a channels_last model given a strided input: the contiguous batch's logits."""
    model = trained_like(tiny())
    x = torch.randn(2, 3, 33, 34)
    with torch.no_grad():
        ref = model(x)
        wide = torch.randn(2, 5, 33, 34)
        wide[:, 1:4] = x
        assert torch.equal(model(wide[:, 1:4]), ref)
        batch = torch.randn(4, 3, 33, 34)
        batch[1::2] = x
        assert torch.equal(model(batch[1::2]), ref)
        assert torch.equal(model(x.transpose(2, 3).contiguous().transpose(2, 3)), ref)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        assert close(cl(wide[:, 1:4]), ref, 1e-5)
        # eval mode: an image's logits do not depend on the rest of its batch
        assert close(model(x[1:]), ref[1:], 1e-5)


# ---------------------------------------------------------------------------------------------
# freezing, batch norm conventions
# ---------------------------------------------------------------------------------------------
ENTRY = ("block1", "block2", "block3", "block4")


def test_frozen_entry_flow_keeps_its_weights_and_bn_follows_pytorch_conventions():
    """requires_grad_(False) on the entry flow, then an SGD step (momentum, weight decay):
    its weights stay, the rest move; in train mode its BN statistics still update (PyTorch's
    convention: requires_grad does not freeze BN), by the config's momentum; in eval none do."""
    model = trained_like(tiny()).train()
    for name in ENTRY:
        getattr(model, name).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(3, 3, 33, 33)
    model(x).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(ENTRY))
    opt.step()
    after = model.state_dict()
    for name, _ in model.named_parameters():
        assert torch.equal(after[name], before[name]) == name.startswith(ENTRY), name
    bn = model.block1.conv1.bn
    with torch.no_grad():
        h = model.block1.conv1.conv(x)
    m = 0.01  # the paper preset's bn_momentum (Keras' 0.99)
    expected = (1 - m) * before["block1.conv1.bn.running_mean"] + m * h.mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)
    assert bn.num_batches_tracked.item() == before["block1.conv1.bn.num_batches_tracked"] + 1
    model.eval()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_timm_freeze_utility_swaps_frozen_batch_norms_in():
    """timm.utils.freeze (FrozenBatchNorm2d in the frozen blocks) works on the model: the
    frozen blocks' weights and statistics stay through a training step, the rest trains."""
    from timm.utils.model import freeze

    model = trained_like(tiny()).train()
    ref = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        expected = ref(x)
    freeze(model, ["block1", "block2"])
    with torch.no_grad():
        assert close(model.eval()(x), expected, 1e-5)
    model.train()
    model(x).square().mean().backward()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("block1.",
                                                                                   "block2."))}  # fmt: skip
    model(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert model.block3.sepconv1.pointwise.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# functional calls, checkpointing, dropout
# ---------------------------------------------------------------------------------------------
def test_vmap_per_sample_gradients_match_one_image_gradients():
    """torch.func's per-sample gradients (vmap over grad of functional_call) equal each
    image's own gradient in eval mode."""
    from torch.func import functional_call, grad, vmap

    model = trained_like(tiny())
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    x, y = torch.randn(3, 3, 32, 33), torch.tensor([0, 1, 2])
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    one = grad(loss)(params, x[2], y[2])
    for k in one:
        assert close(per_sample[k][2], one[k], 1e-4), k


def test_grad_checkpointing_with_a_frozen_entry_flow_gives_the_same_input_and_weight_grads():
    """Checkpointing with the entry flow frozen and a saliency-style input gradient: the same
    input gradient, weight gradients and BN statistics as the plain step."""
    a = trained_like(tiny()).train()
    for name in ENTRY:
        getattr(a, name).requires_grad_(False)
    b = copy.deepcopy(a)
    b.set_grad_checkpointing()
    x = torch.randn(2, 3, 34, 35)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a(xa).square().sum().backward()
    b(xb).square().sum().backward()
    assert close(xb.grad, xa.grad, 1e-5)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert close(q.grad, p.grad, 1e-5), n
    for p, q in zip(a.buffers(), b.buffers(), strict=True):
        assert torch.equal(p, q)


def test_functional_call_with_grad_checkpointing_gives_the_gradients_of_the_given_params():
    """torch.func.functional_call(model, params, x) on a model with set_grad_checkpointing()
    in training recomputed each block in the backward pass with the module's own parameters,
    not the ones given (the recomputation ran after functional_call had put the module's
    back), so the gradients w.r.t. the given params were silently wrong (over 100% off; timm's
    checkpoint_seq shares this). Each block's parameters are now the checkpoint's inputs: the
    gradients are those of the plain functional call."""
    model = xception.create_model("xception-compact", num_classes=4, middle_blocks=1).train()
    given = {k: v.detach() * 1.05 for k, v in model.named_parameters()}
    x = torch.randn(3, 3, 12, 12)

    def grads(checkpointing: bool) -> dict:
        m = copy.deepcopy(model)
        m.set_grad_checkpointing(checkpointing)
        p = {k: v.clone().requires_grad_() for k, v in given.items()}
        torch.func.functional_call(m, p, (x,)).square().sum().backward()
        return {k: v.grad for k, v in p.items()}

    plain, ckpt = grads(False), grads(True)
    for k in plain:
        assert close(ckpt[k], plain[k], 1e-4), k


def test_dropout_is_off_in_eval_and_drop_path_rate_is_refused_by_name():
    """drop_rate: eval logits equal the drop_rate=0 model's with the same weights, call after
    call; in training they vary. timm's drop_path_rate is not a field: one ValueError lists
    the valid options."""
    a = trained_like(tiny(drop_rate=0.5))
    b = tiny().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))
        a.train()
        assert not torch.equal(a(x), a(x))
    with pytest.raises(ValueError, match=r"unknown option\(s\) drop_path_rate.*drop_rate"):
        xception.create_model("xception", drop_path_rate=0.1)


# ---------------------------------------------------------------------------------------------
# input sizes, channel counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", [dict(stem_stride=1, stem_padding="valid"),
                                  dict(stem_stride=2, stem_padding="same"),
                                  dict(stem_stride=2, padding="symmetric", output_stride=8)])  # fmt: skip
def test_stem_variants_run_at_their_minimum_size_and_name_a_smaller_one(stem):
    model = tiny(**stem)
    s = model.min_input_size
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, s, s)).shape == (1, 7)
    assert model.train()(torch.randn(2, 3, s, s + 3)).shape == (2, 7)
    if s > 1:
        with pytest.raises(ValueError, match=f"smaller than this model's minimum {s}x{s}"):
            model.eval()(torch.randn(1, 3, s - 1, s))


@pytest.mark.parametrize("chans", [1, 4])
def test_other_channel_counts_run_and_a_file_sets_them_without_adaptation(chans, tmp_path):
    """in_chans=1 and 4 build and run; a file saved from such a model makes a model of its
    channel count. No first-conv adaptation is offered (timm's sum/repeat): a 3-channel file
    for in_chans=1 or 4 is refused in one line naming the first conv's shapes and in_chans."""
    model = xception.create_model("xception-compact", in_chans=chans, num_classes=3).eval()
    x = torch.randn(2, chans, 20, 20)
    with torch.no_grad():
        ref = model(x)
    torch.save(model.state_dict(), tmp_path / "c.pth")
    loaded = xception.create_model("xception-compact", weights=tmp_path / "c.pth").eval()
    assert loaded.config.in_chans == chans
    assert loaded.pretrained_cfg["input_size"][0] == chans
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    rgb = xception.create_model("xception-compact", num_classes=3)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    with pytest.raises(WeightsError) as err:
        xception.create_model("xception-compact", weights=tmp_path / "rgb.pth", in_chans=chans)
    msg = str(err.value)
    assert "\n" not in msg and "block1.conv1.conv" in msg and "in_chans" in msg
    assert f"(16, {chans}, 3, 3)" in msg


# ---------------------------------------------------------------------------------------------
# names, repr
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("switch", ["paper", "nonresidual", "pw_first_seg2_elu"])
def test_repr_and_names_are_stable_and_every_weight_belongs_to_a_named_module(switch):
    a, b = tiny(**SWITCHES[switch]), tiny(**SWITCHES[switch])
    assert repr(a) == repr(b)
    assert list(a.state_dict()) == list(b.state_dict())
    modules = dict(a.named_modules())
    for key in a.state_dict():
        owner, _, leaf = key.rpartition(".")
        assert owner in modules and leaf in dict(modules[owner].named_parameters(recurse=False)) | \
            dict(modules[owner].named_buffers(recurse=False)), key  # fmt: skip
    # Keras' layer names map onto ours: block2_sepconv1_bn is block2.sepconv1_bn
    assert "block2.sepconv1_bn.running_var" in a.state_dict()
    assert [f["module"] for f in a.feature_info] == ["block1", "block2", "block3", "block5",
                                                     "block7"]  # fmt: skip
    a.reset_classifier(3)
    a.reset_classifier(7)
    assert list(a.state_dict()) == list(b.state_dict())


def test_full_model_feature_info_has_timms_keys_and_feeds_timms_feature_wrapper():
    """The full model's `feature_info` had only module/channels/stride; timm's models
    (legacy_xception included) carry `num_chs` and `reduction` there, so timm code reading
    `model.feature_info[-1]['num_chs']` failed with KeyError and timm's FeatureListNet(model,
    out_indices) with a bare AssertionError. It is now a FeatureInfo, as the features_only
    backbone's, and FeatureListNet returns the model's feature_maps."""
    from timm.models import FeatureListNet

    model = trained_like(xception.create_model("xception-compact", num_classes=3,
                                               middle_blocks=1))  # fmt: skip
    assert [f["num_chs"] for f in model.feature_info] == [32, 48, 96, 192, 512]
    assert [f["reduction"] for f in model.feature_info] == [1, 2, 4, 8, 16]
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        maps = FeatureListNet(copy.deepcopy(model), out_indices=(1, 2, 3, 4))(x)
        for got, want in zip(maps, model.feature_maps(x)[1:], strict=True):
            assert torch.equal(got, want)


def test_a_one_image_training_batch_is_named_by_the_backbone_and_feature_maps_too():
    """A one-image training batch whose last map is 1x1 was named by model(x) (the batch, the
    block and the fixes), but model.feature_maps(x) and a features_only backbone (the
    detection / segmentation fine-tuning path, in train mode) raised torch's bare "Expected
    more than 1 value per channel when training" from inside batch norm. They now give
    model(x)'s one-line error."""
    model = xception.create_model("xception-compact", num_classes=3, middle_blocks=1).train()
    backbone = xception.create_model("xception-compact", features_only=True,
                                     middle_blocks=1).train()  # fmt: skip
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"a training batch of 1 image"):
        model(x)
    for call in (model.feature_maps, backbone):
        with pytest.raises(ValueError, match=r"a training batch of 1 image.*(eval|at least 2)"):
            call(x)


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------
def test_eval_inference_from_two_threads_gives_the_single_thread_outputs():
    model = trained_like(tiny())
    xs = [torch.randn(2, 3, 33 + i, 32) for i in range(3)]  # odd and even: both pool paths
    with torch.no_grad():
        refs = [model(x) for x in xs]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with torch.no_grad():
                results[k] = [model(x) for _ in range(4) for x in xs]
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for outs in results.values():
        assert all(torch.equal(o, refs[i % 3]) for i, o in enumerate(outs))
