"""Inference deployment through the Python API as a practitioner uses it: optimize() of every
preset and switch agrees with the eager model and leaves it as it was, the int8 agreement figure
is the one computed by hand, OnnxModel checks its input, and the metrics match hand-worked
examples. Compact models and small images: the whole file runs in well under a minute."""

import numpy as np
import pytest
import torch
from helpers import trained_like
from torch import nn

from xception import create_model, deploy
from xception.metrics import average_precision_at_k, map_at_k, topk_correct

TINY = dict(width=0.25, middle_blocks=1)
SIZE = 32


def tiny(preset: str = "xception-compact", **overrides) -> nn.Module:
    """A compact model with trained-looking batch norms (folding mistakes show)."""
    torch.manual_seed(0)
    overrides.setdefault("num_classes", 3)
    return trained_like(create_model(preset, **TINY, **overrides))


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [(p.dtype, p.device) for p in model.parameters()],
    )


def assert_unchanged(model: nn.Module, before) -> None:
    state, *rest = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert rest == list(before[1:])


def eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode outputs, the model's own modes put back after."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for m, flag in zip(model.modules(), modes, strict=True):
            m.training = flag


def assert_close_to(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-4, relative to the outputs' scale where they are large (segments=1 gives
    logits of hundreds, where float32 itself rounds by more than 1e-4)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() < 1e-4 * scale


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    deploy.export(tiny(), path, "onnx", input_size=SIZE, check_batches=(1,))
    return path


# ---------------------------------------------------------------------------------------------
# guards: behaviour checked and found correct
# ---------------------------------------------------------------------------------------------
VARIANTS = [
    ("xception-compact", {}),
    ("xception-compact-nonresidual", {}),
    ("xception-compact", dict(mid_activation="elu")),
    ("xception-compact", dict(order="pointwise_first", mid_activation="relu")),
    ("xception-compact", dict(segments=4)),
    ("xception-compact", dict(segments=1)),
    ("xception-compact", dict(fc_layers=(8, 4), drop_rate=0.5)),
    ("xception-compact", dict(in_chans=1, pooling="max")),
    ("xception-compact", dict(num_classes=0)),
    ("xception-compact", dict(num_classes=0, pooling=None)),
    ("xception-compact", dict(output_stride=8)),
    ("xception", dict(num_classes=5)),
]


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS)
def test_optimize_of_every_switch_agrees_and_leaves_the_model_as_it_was(preset, overrides):
    """Guards: for every paper switch and head option, optimize(backend='eager') agrees with
    the eval-mode model within 1e-4 (relative for large outputs) at batches 1 and 3 and at
    another, odd image size, and the caller's train-mode model (some parameters frozen) keeps
    its weights, modes, requires_grad, dtype and device."""
    model = tiny(preset, **overrides).train()
    for p in list(model.parameters())[:2]:
        p.requires_grad_(False)
    before = snapshot(model)
    size = SIZE if "compact" in preset else 72
    chans = model.config.in_chans
    fast = deploy.optimize(model, backend="eager")
    for batch, hw in ((1, size), (3, size), (2, size + 5)):
        x = torch.randn(batch, chans, hw, hw)
        assert_close_to(fast(x), eval_outputs(model, x))
    assert_unchanged(model, before)


@pytest.mark.parametrize("overrides", [dict(order="pointwise_first"), dict(num_classes=0)])
def test_optimize_jit_agrees_at_new_batch_sizes_and_sizes(overrides):
    """Guards: the traced backend traces again for each new input shape and agrees with the
    eager model on each; calling an earlier shape again still works."""
    model = tiny(**overrides)
    fast = deploy.optimize(model, backend="jit")
    shapes = [
        (2, 3, SIZE, SIZE),
        (5, 3, SIZE, SIZE),
        (1, 3, SIZE + 3, SIZE - 4),
        (2, 3, SIZE, SIZE),
    ]
    for shape in shapes:
        x = torch.randn(shape)
        assert_close_to(fast(x), eval_outputs(model, x))


@pytest.mark.parametrize("backend", ["eager", "jit"])
def test_optimize_in_bfloat16_stays_near_float32(backend):
    """Guards: dtype=torch.bfloat16 on the CPU gives bfloat16 outputs within bfloat16's
    rounding of the float32 model's (not equal: it really ran in bfloat16), at two shapes."""
    model = tiny()
    fast = deploy.optimize(model, backend=backend, dtype=torch.bfloat16)
    for shape in ((4, 3, SIZE, SIZE), (2, 3, SIZE + 8, SIZE + 8)):
        x = torch.randn(shape)
        out, ref = fast(x), eval_outputs(model, x)
        assert out.dtype == torch.bfloat16
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert 0 < rel < 0.03, rel


def test_optimize_takes_an_empty_batch_and_refuses_numpy():
    """Guards: an empty batch gives an empty (0, classes) output as the eager model does; a
    numpy array is refused by its type, with the conversion."""
    fast = deploy.optimize(tiny(), backend="eager")
    assert fast(torch.randn(0, 3, SIZE, SIZE)).shape == (0, 3)
    with pytest.raises(TypeError, match=r"got a numpy.ndarray: convert it with torch.from_numpy"):
        fast(np.zeros((1, 3, SIZE, SIZE), np.float32))


def test_int8_calibrated_on_one_image_reports_the_agreement_computed_by_hand(tmp_path):
    """Guards: one calibration image is enough; the report counts the images of every held-out
    batch (a batch of one included), and its top-1 agreement is the fraction of held-out images
    on which the fp32 model's argmax equals the int8 file's, as computed here by hand."""
    model = tiny()
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(1, 3, SIZE, SIZE, generator=gen)]
    heldout = [torch.randn(5, 3, SIZE, SIZE, generator=gen), torch.randn(1, 3, SIZE, SIZE)]
    report = deploy.quantize_model(model, tmp_path / "q.onnx", calibration, heldout,
                                   input_size=SIZE)  # fmt: skip
    assert (report.calibration_images, report.heldout_images) == (1, 6)
    x = torch.cat(heldout)
    fp32 = eval_outputs(model, x).argmax(1)
    int8 = deploy.OnnxModel(report.path)(x).argmax(1)
    assert report.top1_agreement == pytest.approx((fp32 == int8).float().mean().item())
    assert_unchanged(model, before)


def test_int8_of_a_grey_model_calibrates_on_grey_images(tmp_path):
    """Guards: a 1-channel model quantises on grey images and reports its agreement over the
    held-out images; the int8 file takes grey batches."""
    model = tiny(in_chans=1)
    grey = [torch.randn(3, 1, SIZE, SIZE)]
    report = deploy.quantize_model(
        model, tmp_path / "g.onnx", grey, [torch.randn(4, 1, SIZE, SIZE)], input_size=SIZE
    )
    assert report.top1_agreement is not None and report.heldout_images == 4
    assert deploy.OnnxModel(report.path)(grey[0]).shape == (3, 3)


def test_onnx_model_runs_empty_odd_and_channels_last_batches(onnx_file):
    """Guards: OnnxModel gives PyTorch's outputs for channels_last, non-contiguous and
    bfloat16 input, split or not over its threads, for a batch of 5 in slices of 2, and an
    empty (0, classes) output for an empty batch; numpy input is refused by its type."""
    model = tiny()
    x = torch.randn(5, 3, SIZE, SIZE)
    ref = eval_outputs(model, x)
    run = deploy.OnnxModel(onnx_file, threads=2, slice_images=2)
    assert run.slices(5) == [(0, 2), (2, 4), (4, 5)]
    for given in (x, x.contiguous(memory_format=torch.channels_last),
                  x.transpose(2, 3).contiguous().transpose(2, 3)):  # fmt: skip
        assert (run(given) - ref).abs().max().item() < 1e-4
    assert (run(x.bfloat16()) - ref).abs().max().item() < 1e-2
    assert run(torch.randn(0, 3, SIZE, SIZE)).shape == (0, 3)
    with pytest.raises(TypeError, match="got a numpy.ndarray"):
        run(x.numpy())


def test_topk_by_hand_with_ties_and_k_above_the_class_count():
    """Guards: the target tied with two others for places 2-4 is in the top 2 a third of the
    time, in the top 3 two thirds; k above the class count counts every sample."""
    logits = torch.tensor([[5.0, 1.0, 1.0, 1.0], [0.0, 2.0, 1.0, 3.0]])
    target = torch.tensor([2, 1])
    got = topk_correct(logits, target, (1, 2, 3, 4, 9))
    # sample 0: 1 above, tie of 3 -> top2: 1/3, top3: 2/3, top4: 1; sample 1: class 1 is 2nd.
    assert got == pytest.approx({1: 0.0, 2: 1 / 3 + 1, 3: 2 / 3 + 1, 4: 2.0, 9: 2.0})


def test_map_at_100_by_hand_on_more_than_100_classes():
    """Guards: MAP@100 as documented (sum of precision@i at each relevant rank i <= 100,
    divided by min(100, labels); no labels: 0). 150 classes ranked in order, labels at ranks
    1, 50 and 120 (the last beyond the cut-off): (1/1 + 2/50) / 3. Five labels all in the top
    3 with k=3: min(3, 5) = 3, so AP 1. A sample without labels: 0."""
    scores = torch.arange(150, 0, -1, dtype=torch.float64).repeat(3, 1)
    target = torch.zeros(3, 150, dtype=torch.long)
    target[0, [0, 49, 119]] = 1
    target[1, :5] = 1
    ap100 = average_precision_at_k(scores, target, 100)
    assert ap100.tolist() == pytest.approx([(1 + 2 / 50) / 3, 1.0, 0.0])
    assert average_precision_at_k(scores[1:2], target[1:2], 3).item() == pytest.approx(1.0)
    assert map_at_k(scores, target, 100) == pytest.approx(((1 + 2 / 50) / 3 + 1.0) / 3)


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------
def test_held_out_images_with_nan_are_refused_not_reported_as_disagreement(tmp_path):
    """quantize_model took held-out images holding NaN without a word and reported a
    top-1 agreement of 0% (the fp32 model gives NaN, the int8 file finite scores), where
    calibration images with NaN are refused by name."""
    model = tiny()
    nan = torch.full((2, 3, SIZE, SIZE), float("nan"))
    try:
        report = deploy.quantize_model(model, tmp_path / "q.onnx", [torch.randn(1, 3, SIZE, SIZE)],
                                       [nan], input_size=SIZE)  # fmt: skip
    except ValueError as err:
        assert "NaN" in str(err), str(err)
        assert not (tmp_path / "q.onnx").exists()
    else:
        pytest.fail(f"NaN held-out images gave a top-1 agreement of {report.top1_agreement}")


def test_quantize_model_at_the_default_size_names_input_size_as_the_fix(tmp_path):
    """quantize_model on a compact model with 32 px calibration images and the default
    input_size=299 exported at 299, then said "calibration batches must be (N, 3, 299, 299)
    ...: preprocess the images as for the model (its input size ...)": the images are the
    model's size. The size now defaults to the calibration images', and a size that differs
    from theirs is named as the fix, before the export."""
    model = tiny()
    images = [torch.randn(2, 3, SIZE, SIZE)]
    report = deploy.quantize_model(model, tmp_path / "q.onnx", images)
    assert report.calibration_images == 2
    assert deploy.OnnxModel(tmp_path / "q.onnx").input_shape[2:] == (SIZE, SIZE)
    with pytest.raises(ValueError, match=rf"the calibration images are {SIZE}x{SIZE} but "
                       rf"input_size is 40x40: pass input_size=\({SIZE}, {SIZE}\)"):  # fmt: skip
        deploy.quantize_model(model, tmp_path / "r.onnx", images, input_size=40)
    assert not (tmp_path / "r.onnx").exists()


def test_quantize_model_checks_its_settings_before_exporting(tmp_path, monkeypatch):
    """quantize_model(quant_format='int4') exported the fp32 model first (about 30 s for
    the full-size model) and only then refused the format, in quantize_onnx; the setting should
    be checked before the work, as optimize() checks slice_mib before folding."""

    def export(*args, **kwargs):
        raise AssertionError("the model was exported before its quant_format was checked")

    monkeypatch.setattr(deploy, "export", export)
    with pytest.raises(ValueError, match="unknown quant_format 'int4'"):
        deploy.quantize_model(tiny(), tmp_path / "q.onnx", [torch.randn(1, 3, SIZE, SIZE)],
                              input_size=SIZE, quant_format="int4")  # fmt: skip


def test_optimize_with_a_dtype_given_as_a_string_names_the_dtype():
    """optimize(model, dtype="bfloat16") failed with torch's "Invalid device string:
    'bfloat16'" (the string reaches model.to() in fold_batchnorm, which reads it as a device):
    it should take the name or refuse it as a dtype, naming torch.bfloat16."""
    model = tiny()
    x = torch.randn(2, 3, SIZE, SIZE)
    try:
        out = deploy.optimize(model, backend="eager", dtype="bfloat16")(x)
    except (TypeError, ValueError) as err:
        assert "dtype" in str(err) and "device" not in str(err), str(err)
    except RuntimeError as err:
        pytest.fail(f"the dtype was taken for a device: {err}")
    else:
        assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("shape", "fix"),
    [((3, SIZE, SIZE), "unsqueeze(0)"), ((2, SIZE, SIZE, 3), "permute(0, 3, 1, 2)")],
)
def test_onnx_model_names_the_fix_for_a_missing_batch_axis_or_channels_last(onnx_file, shape, fix):
    """OnnxModel told a user who passed one image without its batch axis, or a
    channels-last batch, to "export again at the images' size (xception export --size N, or
    --dynamic-size)", which cannot help; the model itself names the fix (x.unsqueeze(0),
    x.permute(0, 3, 1, 2))."""
    with pytest.raises(ValueError) as info:
        deploy.OnnxModel(onnx_file, threads=1)(torch.randn(shape))
    assert fix in str(info.value) and "--size" not in str(info.value), str(info.value)


def test_topk_refuses_fractional_class_indices():
    """topk_correct took float targets and truncated them: class "1.5" was counted as
    class 1 (a hit here) without a word, where soft labels have no top-k (as
    average_precision_at_k refuses soft targets)."""
    logits = torch.tensor([[0.1, 0.9, 0.5]])
    try:
        got = topk_correct(logits, torch.tensor([1.5]), (1,))
    except ValueError as err:
        assert "class indices" in str(err) or "integer" in str(err), str(err)
    else:
        pytest.fail(f"a fractional class index was scored: {got}")


def test_an_optimized_model_stays_deterministic_after_train():
    """InferenceModel (documented "in eval mode", weights frozen) turned its folded
    model's dropout back on when .train() is called on it (or on a module holding it): the
    eager and compile backends then give random outputs (the jit one, traced frozen, does not)."""
    model = tiny(drop_rate=0.5)
    fast = deploy.optimize(model, backend="eager")
    x = torch.randn(2, 3, SIZE, SIZE)
    expected = eval_outputs(model, x)
    fast.train()
    assert_close_to(fast(x), expected)
    assert_close_to(fast(x), expected)
