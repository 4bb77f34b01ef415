"""The paper's baseline, used as a demanding user would: Inception V3 (torchvision's, behind
`create_model("inception-v3")`) and the compact Inception V3, through the same tools as Xception
(train, eval, predict, convert, export) and the timm-style API."""

from __future__ import annotations

import pytest
import torch
from helpers import trained_like
from test_data import make_idx_dataset

from xception import create_model
from xception.cli import main

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_model(transform_input: bool, aux_logits: bool = True, seed: int = 0):
    """torchvision's Inception V3 with random weights and batch-norm statistics of real
    activations (a training-mode pass at 80 px), so that the input transform shows in the
    outputs. `aux_logits=False` after building with the head is what torchvision's
    `inception_v3(weights=..., aux_logits=False)` gives: the head is dropped, transform_input
    stays True."""
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    model = inception_v3(weights=None, aux_logits=True, init_weights=True,
                         transform_input=transform_input)  # fmt: skip
    trained_like(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0  # the running statistics become this batch's
    aux, model.AuxLogits = model.AuxLogits, None  # it needs more than 80 px, in training
    with torch.no_grad():
        model.train()(torch.rand(2, 3, 80, 80) * 2 - 1)
    model.AuxLogits = aux
    for bn in bns:
        bn.momentum = 0.1
    if not aux_logits:
        model.aux_logits, model.AuxLogits = False, None
    return model.eval()


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    """A file in the layout of torchvision's ImageNet file (auxiliary head included)."""
    path = tmp_path_factory.mktemp("tv") / "inception_v3_google-0cc3c7bd.pth"
    torch.save(torchvision_model(transform_input=True).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def compact_run(tmp_path_factory):
    """A tiny inception-v3-compact run on a 4-class, 16 px IDX toy (no EMA, no augmentation,
    so that the validation it recorded is what an evaluation of its weights gives)."""
    from xception.train import fit

    root = tmp_path_factory.mktemp("compact")
    data = make_idx_dataset(root / "toy", n_train=64, n_test=32, size=16)
    result = fit("fashion-mnist", model="inception-v3-compact",
                 model_args=dict(width=0.1, blocks=(1, 1, 1)), data=str(data), image_size=16,
                 epochs=1, batch_size=32, lr=0.05, warmup_epochs=0, ema_decay=None,
                 augment="none", threads=1, device="cpu", progress=False,
                 out=str(root / "run"))  # fmt: skip
    return root / "run", data, result


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------
def test_eval_of_a_compact_inception_run_rebuilds_its_model(compact_run):
    """`xception eval --checkpoint RUN` of an inception-v3-compact run (its folder, a
    checkpoint folder, or its model.safetensors) crashed with "XceptionConfig.__init__() got
    an unexpected keyword argument 'n'": load_for_eval rebuilt every run but inception-v3 as
    an Xception."""
    from xception.evaluate import evaluate_file

    run, data, result = compact_run
    checkpoint = next((run / "checkpoints").glob("step-*"))
    for target in (run, checkpoint, run / "model.safetensors"):
        scored = evaluate_file(target, data, device="cpu")
        assert scored["images"] == 32, target
        assert scored["loss"] == pytest.approx(result["final"]["val_loss"], rel=1e-4), target


def test_grey_input_to_inception_v3_names_a_fix_the_preset_takes():
    """A grey batch given to inception-v3 was refused with "set in_chans to the number of
    input channels", but inception-v3 refuses in_chans ("accepts only num_classes and
    drop_rate"): the advice led to a second error instead of to the fix (repeat the grey
    channel three times, or use inception-v3-compact)."""
    model = create_model("inception-v3", num_classes=3).eval()
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 3, H, W\)") as err:
        model(torch.randn(1, 1, 80, 80))
    assert "set in_chans" not in str(err.value), str(err.value)
    assert "x.expand(-1, 3, -1, -1)" in str(err.value), str(err.value)
    with torch.no_grad():  # the advice works
        assert model(torch.randn(1, 1, 80, 80).expand(-1, 3, -1, -1)).shape == (1, 3)
    assert "inception-v3-compact" in str(err.value)
    grey = create_model("inception-v3-compact", num_classes=3, in_chans=1).eval()
    assert grey(torch.randn(1, 1, 32, 32)).shape == (1, 3)


def test_convert_of_torchvisions_inception_file_does_not_send_the_user_in_a_circle(
    tv_file, tmp_path, capsys
):
    """`xception convert inception_v3_google-0cc3c7bd.pth out.safetensors` said "use
    --model inception-v3", and with --model inception-v3 convert said "convert handles
    Xception weights; inception-v3 is torchvision's model" (README: convert turns any file
    create_model reads, torchvision's Inception file included, into our safetensors)."""
    out = tmp_path / "inception.safetensors"
    assert main(["convert", str(tv_file), str(out)]) == 2
    first = capsys.readouterr().err
    assert "not xception's" in first and not out.exists()
    if "--model inception-v3" in first:  # then following that advice must work
        assert main(["convert", str(tv_file), str(out), "--model", "inception-v3"]) == 0, (
            capsys.readouterr().err
        )
        again = create_model("inception-v3", weights=out).eval()
        direct = create_model("inception-v3", weights=tv_file).eval()
        assert again.weights_meta.categories == direct.weights_meta.categories
        x = torch.randn(1, 3, 80, 80)
        with torch.no_grad():
            assert torch.equal(again(x), direct(x))


def test_inception_v3_with_torchvisions_weights_tells_timm_its_preprocessing(tv_file):
    """create_model('inception-v3', weights=torchvision's file) had weights_meta
    (299 px, crop 299/342, bilinear, ImageNet mean/std) but no `pretrained_cfg`, so
    timm.data.resolve_model_data_config(model) silently fell back to 224 px bicubic, crop
    0.875: the very mistake README says pretrained_cfg prevents."""
    import timm.data

    model = create_model("inception-v3", weights=tv_file)
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 299, 299)
    assert config["crop_pct"] == pytest.approx(299 / 342)
    assert config["interpolation"] == "bilinear"
    assert tuple(config["mean"]) == IMAGENET_MEAN and tuple(config["std"]) == IMAGENET_STD


@pytest.mark.parametrize("transform_input,aux_logits", [(True, False), (False, True)])
def test_torchvision_files_are_folded_as_their_transform_input_says(
    transform_input, aux_logits, tmp_path
):
    """Whether a torchvision Inception V3 file was trained behind transform_input was
    guessed from its auxiliary head, wrongly both ways, and no option could say it: torchvision's
    own ImageNet model saved after `inception_v3(weights=..., aux_logits=False)`
    (transform_input=True, no AuxLogits) loaded unfolded, and one trained from scratch
    (transform_input=False, with AuxLogits) got a fold it was never trained behind; either
    way the logits silently differed from torchvision's. `transform_input=` (torchvision's own
    name) now says it."""
    reference = torchvision_model(transform_input, aux_logits)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("inception-v3", weights=path, transform_input=transform_input).eval()
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


# ---------------------------------------------------------------------------------------------
# regression guards
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [1000, 10, 0])
def test_inception_v3_has_torchvisions_parameters_without_the_auxiliary_head(num_classes):
    from torchvision.models import inception_v3

    ours = create_model("inception-v3", num_classes=num_classes)
    theirs = inception_v3(weights=None, aux_logits=False, init_weights=False,
                          num_classes=max(num_classes, 1))  # fmt: skip
    if num_classes == 0:  # pooled features: no classifier at all
        theirs.fc = torch.nn.Identity()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert not any(k.startswith("AuxLogits.") for k in ours.state_dict())


def test_torchvisions_file_folds_exactly_at_any_size_with_its_preprocessing(tv_file):
    """The fold is exact away from 299 px too (the first conv has no padding), the smallest
    input is 75 px, and the file brings torchvision's preprocessing."""
    from torchvision.models import inception_v3

    reference = inception_v3(weights=None, aux_logits=True, init_weights=False,
                             transform_input=True)  # fmt: skip
    reference.load_state_dict(torch.load(tv_file, weights_only=True))
    reference.eval()
    model = create_model("inception-v3", weights=tv_file).eval()
    assert not model.transform_input
    meta = model.weights_meta
    assert (meta.input_size, meta.interpolation) == (299, "bilinear")
    assert meta.mean == IMAGENET_MEAN and meta.std == IMAGENET_STD
    x = torch.randn(2, 3, 75, 91)
    with torch.no_grad():
        expected = reference(x)
        assert (model(x) - expected).abs().max() < 1e-5 * expected.abs().max()
        with pytest.raises(ValueError, match=r"minimum 75x75"):
            model(torch.randn(1, 3, 74, 91))


def test_a_compact_inception_run_predicts_exports_and_tells_timm_its_input(
    compact_run, tmp_path, capsys
):
    """The run's weights through predict and export (--model inception-v3-compact), and its
    input (1 channel, 16 px, its data's mean and std) in pretrained_cfg for timm."""
    import numpy as np
    import timm.data
    from PIL import Image

    run, _, _ = compact_run
    model = create_model("inception-v3-compact", weights=run / "model.safetensors")
    meta = model.weights_meta
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (1, 16, 16) and model.config.in_chans == 1
    assert tuple(config["mean"]) == tuple(meta.mean) and tuple(config["std"]) == tuple(meta.std)
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20), np.uint8)).save(image)
    argv = ["predict", str(image), "--weights", str(run), "--model", "inception-v3-compact",
            "--format", "csv", "--topk", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    row = capsys.readouterr().out.splitlines()[1].split(",")
    assert row[0] == str(image) and row[3] in meta.categories
    out = tmp_path / "run.onnx"
    assert main(["export", str(out), "--model", "inception-v3-compact",
                 "--weights", str(run)]) == 0  # fmt: skip
    assert "input 16x16" in capsys.readouterr().out and out.stat().st_size > 0


def test_inception_presets_refuse_what_only_xception_offers_by_name():
    """features_only/global_pool in create_model and deploy.optimize are refused by name for
    both Inception presets, not half-done."""
    from xception import deploy

    for name in ("inception-v3", "inception-v3-compact"):
        for kw in (dict(features_only=True), dict(global_pool="max")):
            with pytest.raises(ValueError, match=f"offered for the Xception presets, not {name}"):
                create_model(name, num_classes=3, **kw)
    with pytest.raises(TypeError, match=r"Inception3 \(the Inception V3 baseline\)"):
        deploy.optimize(create_model("inception-v3", num_classes=3), backend="eager")


def test_compact_inception_takes_timms_reset_classifier_call():
    """timm's `reset_classifier(n, 'avg')` failed with a TypeError on the compact Inception V3
    (it took num_classes only); 'avg' is now taken, and a pooling it does not have ('' or
    'max') is refused by name with the call that gives unpooled maps."""
    model = create_model("inception-v3-compact", num_classes=3, width=0.25).eval()
    x = torch.randn(2, 1 if model.config.in_chans == 1 else 3, 28, 28)
    model.reset_classifier(5, "avg")
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0, global_pool="avg")
    assert model(x).shape == (2, model.num_features)
    for pool in ("", "max"):
        with pytest.raises(ValueError, match="pools by average only.*forward_features"):
            model.reset_classifier(0, pool)
