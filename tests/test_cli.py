import sys

import pytest
import torch

from xception.cli import main


def test_models_lists_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "xception-nonresidual" in out and "inception-v3" in out
    assert main(["models", "Compact"]) == 0  # any case
    out = capsys.readouterr().out
    assert "xception-compact-nonresidual" in out and "xception-fc" not in out


def test_info_prints_blocks_and_parameter_count(capsys):
    assert main(["info", "xception"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 22,855,952" in out
    assert "block14" in out and "8.36 GMAC" in out


def test_info_with_overrides(capsys):
    args = ["info", "xception-compact", "--num-classes", "10", "--size", "28"]
    assert main([*args, "--set", "in_chans=1", "--set", "segments=4"]) == 0
    assert "segments=4" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["info", "xcepton"], "did you mean xception"),
        (["info", "xception", "--set", "segments=3"], "segments=3 is not valid: it must divide"),
        (["info", "xception", "--set", "nonsense"], "expected key=value"),
        (["info", "xception", "--set", "width=1000"], "more than this machine's"),  # ~90 TB
        (["info", "inception-v3"], "describes Xception presets"),
        (["models", "xceptoin"], "no preset name contains 'xceptoin': did you mean xception"),
        (
            ["bench", "--quick", "--batch", "1", "0"],
            "--batch 1 0: inference batch sizes are at least 1",
        ),
        (["bench", "--quick", "--repeats", "0"], "--repeats 0: time at least 1 round"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _failing(monkeypatch, err: BaseException) -> None:
    """Make `xception models` raise `err`, as a command deep in its work would."""
    from xception import cli

    def run(args):
        raise err

    monkeypatch.setitem(cli.COMMANDS, "models", ("list", lambda p: None, run))


@pytest.mark.parametrize(
    "err",
    [
        RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by "
            "peer [127.0.0.1]:29500"
        ),
        torch.distributed.DistBackendError(
            "DDP expects same model across all ranks, but Rank 0 has 94 params, while rank 1 has "
            "inconsistent 0 params.\nmore detail"
        ),
    ],
)
def test_under_ddp_a_peers_failure_is_one_line_pointing_at_its_error(capsys, monkeypatch, err):
    _failing(monkeypatch, err)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["models"]) == 1
    err_text = capsys.readouterr().err
    first = str(err).splitlines()[0]
    assert err_text == (f"xception models: a distributed call failed on rank 1 ({first}): if "
                        "another rank stopped, its error above says why\n")  # fmt: skip
    monkeypatch.delenv("WORLD_SIZE")  # in one process the same error is a bug: its traceback
    with pytest.raises(RuntimeError):
        main(["models"])


@pytest.mark.parametrize(
    "err,detail",
    [
        (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                      "allocate memory: you tried to allocate 100000000000 bytes. Error code 12 "
                      "(Cannot allocate memory)"),
         "DefaultCPUAllocator: can't allocate memory: you tried to allocate 100000000000 bytes"),
        (torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 "
            "GiB of which 1.2 GiB is free. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"),
         "CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
)  # fmt: skip
def test_running_out_of_memory_is_one_line_naming_the_fix(capsys, monkeypatch, err, detail):
    _failing(monkeypatch, err)
    assert main(["models"]) == 1
    text = capsys.readouterr().err
    assert text.startswith(f"xception models: error: out of memory ({detail}")
    assert text.endswith("): lower the batch size or the image size\n")
    assert len(text.strip().splitlines()) == 1 and "enforce fail" not in text
    _failing(monkeypatch, RuntimeError("some other bug"))  # any other RuntimeError: a traceback
    with pytest.raises(RuntimeError, match="some other bug"):
        main(["models"])


def _interrupted(monkeypatch, tmp_path) -> None:
    import signal

    from xception import train

    def fit(cfg, given=None):
        raise train.Interrupted(signal.SIGTERM, tmp_path / "checkpoints" / "step-000000008")

    monkeypatch.setattr(train, "fit", fit)


def test_an_interrupt_under_ddp_is_reported_by_rank_0_only(capsys, monkeypatch, tmp_path):
    _interrupted(monkeypatch, tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--out", str(tmp_path)]) == 143
    err = capsys.readouterr().err
    assert err.startswith("xception train: stopped by SIGTERM; checkpoint saved to ")
    monkeypatch.setenv("RANK", "1")  # saved nothing: a second line would contradict the first
    assert main(["train", "--out", str(tmp_path)]) == 143
    assert capsys.readouterr().err == ""


def test_ctrl_c_while_torch_loads_is_one_line(capsys, monkeypatch):
    """`import xception.cli` loaded torch (seconds) through the package's own imports, before
    main() could catch Ctrl-C: a KeyboardInterrupt traceback. The package now loads its
    modules on first use, and main() covers the loading."""
    import subprocess
    import sys

    import xception.cli

    script = (
        "import sys, xception, xception.cli; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr
    assert xception.create_model and xception.train.fit  # names and modules, on first use

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(xception.cli, "build_parser", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "xception: interrupted\n"


def test_demo_names_its_own_command_and_flags(capsys, monkeypatch, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000000008").mkdir(parents=True)
    assert main(["demo", "--out", str(run)]) == 2  # demo has no --resume: train continues it
    err = capsys.readouterr().err
    assert f"continue it with xception train --out {run} --resume auto" in err
    assert len(err.strip().splitlines()) == 1
    _interrupted(monkeypatch, tmp_path)
    assert main(["demo", "--out", str(tmp_path / "new")]) == 143
    err = capsys.readouterr().err
    assert err.startswith("xception demo: stopped by SIGTERM; checkpoint saved to ")


def test_train_set_null_applies(tmp_path, monkeypatch):
    """`--set ema_decay=null` (or a null in --config) turns EMA off; it used to be dropped as
    if the key had not been given."""
    import xception.cli as cli

    seen = {}

    def capture(cfg, given=None, command="train"):
        seen["cfg"], seen["given"] = cfg, given
        return 0, None

    monkeypatch.setattr(cli, "_fit", capture)
    (tmp_path / "c.yaml").write_text("grad_clip: null\n")
    argv = ["train", "--out", str(tmp_path / "r"), "--set", "ema_decay=null",
            "--config", str(tmp_path / "c.yaml")]  # fmt: skip
    assert main(argv) == 0
    assert seen["cfg"].ema_decay is None and seen["cfg"].grad_clip is None
    assert {"ema_decay", "grad_clip"} <= seen["given"]


def test_demo_ends_with_what_to_do_next(capsys, monkeypatch, tmp_path):
    """The demo's last lines name the commands that use the model it trained; it used to stop
    at the test accuracy, and said only that the full recipe "uses more" epochs."""
    import xception.cli as cli
    import xception.evaluate as evaluate

    out = tmp_path / "run"
    final = dict(val_top1=91.0, images_per_s=600.0, epoch=3)
    result = dict(out=str(out), params=1, final=final, best=final, wall_s=60.0)
    monkeypatch.setattr(cli, "_fit", lambda cfg, given=None, command="train": (0, result))
    test = dict(top1=91.0, top5=99.0, images=10000)
    monkeypatch.setattr(evaluate, "evaluate_file", lambda *a, **k: test)
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the full recipe trains 15)" in text
    weights = out / "model.safetensors"
    next_steps = text.split("training and testing\n")[1]
    assert next_steps.startswith("next: xception predict IMAGE... --weights ")
    assert f"xception export model.onnx --weights {weights}" in next_steps
    assert "xception train --recipe fashion-mnist" in next_steps
    # Run as .venv/bin/xception (make demo) with that venv not on the PATH: a bare `xception`
    # was 'command not found', so the commands name the script that ran.
    script = tmp_path / "venv" / "bin" / "xception"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "demo"])
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    assert main(["demo", "--out", str(tmp_path / "run2")]) == 0
    next_steps = capsys.readouterr().out.split("training and testing\n")[1]
    assert next_steps.startswith(f"next: {script} predict IMAGE... --weights ")
    assert f"      {script} train --recipe fashion-mnist" in next_steps
    monkeypatch.setenv("PATH", str(script.parent))  # activated: the short name again
    assert main(["demo", "--out", str(tmp_path / "run3")]) == 0
    assert "next: xception predict" in capsys.readouterr().out


def test_demo_without_the_dataset_is_one_line_before_anything_else(capsys, tmp_path):
    """A missing dataset used to be reported after the demo had printed its header and named an
    output folder it never created."""
    out = tmp_path / "run"
    assert main(["demo", "--data", str(tmp_path / "absent"), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    assert "data folder not found" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        # Malformed YAML in --set was a yaml.parser.ParserError traceback.
        (["info", "xception-compact", "--set", "fc_layers=[64,"],
         "--set 'fc_layers=[64,': the value is not valid YAML (expected the node content"),
        (["experiment", "residual", "--quick", "--set", "width=a: b: c"], "not valid YAML"),
        (["train", "--out", "unused", "--set", "lr=[0.1"], "--set 'lr=[0.1': the value is not"),
        # A key that has a flag of its own was a TypeError from create_model ("multiple values").
        (["info", "xception-compact", "--set", "num_classes=5"],
         "--set num_classes: give it as --num-classes"),
        (["export", "unused.onnx", "--model", "xception-compact", "--set", "weights=imagenet"],
         "--set weights: give it as --weights"),
        (["info", "xception", "--set", " =3"], "expected key=value"),
        # Zero or negative segment counts were said not to divide the channels.
        (["experiment", "segments", "--quick", "--segments", "0,2"],
         "--segments 0,2: segment counts are positive integers"),
        (["experiment", "segments", "--quick", "--segments=-4"], "are positive integers"),
        # An empty list ran the default spectrum, as if --segments had not been given.
        (["experiment", "segments", "--quick", "--segments="], "--segments : use integers"),
    ],
)  # fmt: skip
def test_bad_overrides_are_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", [["--epochs", "0"], ["--threads", "-1"],
                                  ["--train-subset", "0"]])  # fmt: skip
def test_demo_refuses_bad_numbers_before_printing_anything(capsys, monkeypatch, tmp_path, flag):
    """They used to be refused after the demo had printed its header (and built the paper's
    23-million-parameter model to count them)."""
    import xception.data

    monkeypatch.setattr(xception.data, "resolve_data", lambda data: data)  # any dataset
    assert main(["demo", "--out", str(tmp_path / "run"), *flag]) == 2
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    assert f"{' '.join(flag)} is not valid" in captured.err  # as typed, not the config key
    assert len(captured.err.strip().splitlines()) == 1


# (flag and value, the message as the user typed it); each setting's config key is the flag's
# without the dashes, with _ for -.
TYPED = [(["--epochs", "0"], "--epochs 0 is not valid: use a positive integer"),
         (["--batch-size", "0"], "--batch-size 0 is not valid: use a positive integer"),
         (["--lr", "-1"], "--lr -1.0 is not valid: use a positive learning rate"),
         (["--lr", "nan"], "--lr nan is not valid: expected a finite number (e.g. --lr 0.1)"),
         (["--amp", "fp16"], "--amp fp16 is not valid: fp16 needs CUDA; on a CPU use bf16 or none"),
         (["--threads", "0"], "--threads 0 is not valid: use a positive number of threads"),
         (["--seed", str(2**64)], f"--seed {2**64} is not valid: use a 64-bit signed integer"),
         (["--train-subset", "0"], "--train-subset 0 is not valid: use a positive integer"),
         (["--val-subset", "0"], "--val-subset 0 is not valid: use a positive integer"),
         (["--checkpoint-every", "-1"], "--checkpoint-every -1 is not valid: use a number of "
                                        "steps, or 0")]  # fmt: skip


def test_a_bad_setting_is_named_as_the_user_gave_it(capsys, tmp_path):
    """`train --batch-size 0` said `batch_size=0 is not valid`, naming a config key the user
    never typed (and --checkpoint-every -1 a list of three keys). Given by --set, --config or
    a recipe file, the setting keeps its key: that is what the user wrote there."""

    def error(*argv: str) -> str:
        assert main(["train", "--device", "cpu", "--out", str(tmp_path / "run"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    for (flag, value), message in TYPED:
        assert error(flag, value).startswith(f"xception train: error: {message}")
        key = flag[2:].replace("-", "_")
        (tmp_path / "over.yaml").write_text(f"{key}: {value}\n")
        (tmp_path / "recipe.yaml").write_text(f"recipe: fashion-mnist\n{key}: {value}\n")
        for given in (["--set", f"{key}={value}"], ["--config", str(tmp_path / "over.yaml")],
                      ["--recipe", str(tmp_path / "recipe.yaml")]):  # fmt: skip
            err = error(*given)
            assert f"error: {key}=" in err and "is not valid" in err and flag not in err, err
    # A device this machine lacks, and one setting given by a flag beside another by --set.
    if not torch.cuda.is_available():
        assert error("--device", "cuda").endswith("--device cuda but CUDA is not available: use "
                                                  "--device cpu")  # fmt: skip
    assert error("--batch-size", "6", "--set", "accum_steps=4").endswith(
        "--batch-size 6 is not divisible by accum_steps=4")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_an_output_named_with_a_trailing_slash_is_refused_before_the_work(capsys, tmp_path):
    """`--json results/` (a folder not made yet) wrote the result to a file named `results`."""
    argv = ["eval", "--checkpoint", str(tmp_path / "none"), "--data", str(tmp_path / "none"),
            "--json", f"{tmp_path / 'results'}/"]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "give a file name, e.g. " in captured.err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("command", [["train", "--epochs", "1"], ["experiment", "residual"],
                                     ["demo"]])  # fmt: skip
def test_an_empty_out_folder_is_refused(command, tmp_path, monkeypatch, capsys):
    """`--out ""` (an unset shell variable) trained into the current folder under train, and
    went to the default folder under experiment and demo, without a word."""
    from xception.train import make_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([*command, "--out", ""])
    assert stop.value.code == 2
    assert "argument --out: an empty folder name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="out='' is not valid: give a folder for the run"):
        make_config("fashion-mnist", out="")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-epoch run of a tiny compact model (EMA kept), its folder and data."""
    from test_data import _image_folder, make_idx_dataset

    from xception.train import fit

    tmp = tmp_path_factory.mktemp("cli-run")
    data = make_idx_dataset(tmp / "toy", n_train=64, n_test=16, size=16)
    model_args = dict(stem_channels=[8, 8], entry_channels=[8, 16, 16], middle_blocks=1,
                      exit_channels=16, head_channels=[16, 16])  # fmt: skip
    fit("fashion-mnist", data=str(data), out=str(tmp / "run"), model_args=model_args,
        image_size=16, epochs=1, batch_size=32, lr=0.05, warmup_epochs=0, ema_decay=0.9,
        threads=1, progress=False, device="cpu")  # fmt: skip
    images = _image_folder(tmp / "images", per_class=2, size=16)
    return tmp / "run", data, images


def _checkpoint(run):
    return next(p for p in sorted((run / "checkpoints").iterdir()) if p.name.startswith("step-"))


def test_a_training_checkpoint_works_as_weights_for_predict_convert_and_export(
    tiny_run, capsys, tmp_path
):
    """A checkpoint's weights files hold no model config: `--weights runs/f/checkpoints/step-N`
    was loaded into the default `xception` and refused ('131 model weights missing'), with no
    way to name the model it fits. Now the checkpoint rebuilds its own model, classes and
    preprocessing, as the run folder does, with the EMA weights as `xception eval` scores."""
    import json

    from xception.zoo import create_model

    run, _, images = tiny_run
    ckpt = _checkpoint(run)
    for weights in (ckpt, ckpt / "model.safetensors"):
        argv = ["predict", str(images), "--weights", str(weights), "--format", "json"]
        assert main([*argv, "--no-progress", "--topk", "2"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 4 and all(r["error"] is None for r in rows)
        assert rows[0]["predictions"][0]["label"] in {str(k) for k in range(10)}

    out = tmp_path / "ckpt.safetensors"
    assert main(["convert", str(ckpt), str(out)]) == 0
    assert "10 classes" in capsys.readouterr().out
    converted = create_model("xception", weights=str(out)).eval()
    # The checkpoint's EMA weights (what the run exported as its final weights).
    final = create_model("xception", weights=str(run)).eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(converted(x), final(x))
    assert torch.equal(create_model("xception", weights=str(ckpt)).eval()(x), final(x))  # Python
    assert converted.weights_meta.input_size == 16
    assert converted.weights_meta.categories == final.weights_meta.categories

    onnx = tmp_path / "ckpt.onnx"
    assert main(["export", str(onnx), "--weights", str(ckpt)]) == 0
    assert "input 16x16" in capsys.readouterr().out and onnx.is_file()
    # A model the checkpoint does not fit is named by the checkpoint, not a temporary file.
    assert main(["export", str(onnx), "--weights", str(ckpt), "--set", "width=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xception export: error: {ckpt}: layer ")
    assert "xception-checkpoint-" not in err


@pytest.mark.parametrize("where", ["copied", "ema", "name"])
def test_eval_raw_on_weights_without_raw_ones_is_refused(tiny_run, capsys, tmp_path, where):
    """`--raw` on a run's model.safetensors copied elsewhere (the EMA weights) or on a
    checkpoint's ema.safetensors scored the EMA weights, labelled with the file given, as if
    --raw had been honoured."""
    import shutil

    run, data, _ = tiny_run
    if where == "copied":
        spec = str(shutil.copy(run / "model.safetensors", tmp_path / "m.safetensors"))
        hint = "give the run folder, or one of its checkpoints"
    elif where == "ema":
        spec = str(_checkpoint(run) / "ema.safetensors")
        hint = "holds the checkpoint's EMA weights"
    else:
        spec, hint = "imagenet", "drop --raw"
    assert main(["eval", "--checkpoint", spec, "--data", str(data), "--raw"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xception eval: error: --raw: ") and hint in err
    assert len(err.strip().splitlines()) == 1


def test_eval_raw_still_reads_runs_and_checkpoints(tiny_run, capsys):
    import json

    run, data, _ = tiny_run
    ckpt = _checkpoint(run)
    for spec in (run, run / "model.safetensors", ckpt, ckpt / "model.safetensors"):
        argv = ["eval", "--checkpoint", str(spec), "--data", str(data), "--raw", "--limit", "4"]
        assert main([*argv, "--device", "cpu"]) == 0
        assert "raw weights" in json.loads(capsys.readouterr().out)["checkpoint"]


# --- cases a mutation pass over cli.py found untested ---
def _tiny_model():
    from xception.zoo import create_model

    return create_model("xception-compact", num_classes=4, width=0.25, middle_blocks=1)


def test_info_builds_the_model_asked_for_and_sums_it_at_the_size_given(capsys):
    argv = ["info", "xception-compact", "--num-classes", "7", "--size", "32", "--set", "width=0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("xception-compact: XceptionConfig(num_classes=7, ")
    assert "width=0.5," in out and "compute at 32x32: " in out
    assert main(["info", "xception-compact", "--size", "0"]) == 2
    assert "--size 0: give the input size in pixels" in capsys.readouterr().err


def _fake_predictor(monkeypatch, seen: dict, rows, num_classes: int = 3):
    """`predict` with create_model and the predictor stubbed: what they are given goes in `seen`;
    `rows` (a function) yields the predictor's results, or raises part-way."""
    import types

    import xception.predict as predict_module
    import xception.zoo as zoo

    model = types.SimpleNamespace(config=types.SimpleNamespace(num_classes=num_classes))

    def create_model(name, **kwargs):
        seen["create_model"] = (name, kwargs)
        return model

    def predict(m, files, **kwargs):
        assert m is model
        seen["predict"] = ([str(f) for f in files], kwargs)
        return rows()

    monkeypatch.setattr(zoo, "create_model", create_model)
    monkeypatch.setattr(predict_module, "predict", predict)


def _image_files(tmp_path, *names):
    for name in names:
        (tmp_path / name).write_bytes(b"")  # the predictor is stubbed: never read
    return [str(tmp_path / name) for name in names]


def test_predict_passes_its_flags_through(capsys, monkeypatch, tmp_path):
    from xception.predict import Prediction, Ranked

    files = _image_files(tmp_path, "a.png")
    seen: dict = {}
    _fake_predictor(monkeypatch, seen, lambda: iter([Prediction(files[0], [Ranked(2, "c", 0.9)])]))
    argv = ["predict", *files, "--weights", "w.safetensors", "--model", "xception-compact",
            "--topk", "1", "--batch-size", "3", "--backend", "onnxruntime", "--no-progress",
            "--format", "json"]  # fmt: skip
    assert main(argv) == 0
    assert seen["create_model"] == ("xception-compact", dict(weights="w.safetensors",
                                                             progress=False))  # fmt: skip
    assert seen["predict"] == (files, dict(topk=1, batch_size=3, backend="onnxruntime",
                                           progress=False))  # fmt: skip
    assert '"label": "c"' in capsys.readouterr().out
    assert main(["predict", *files]) == 0  # the defaults
    assert seen["create_model"] == ("xception", dict(weights="imagenet", progress=True))
    assert seen["predict"][1] == dict(topk=5, batch_size=8, backend="torch", progress=True)


def test_predict_csv_has_a_column_group_per_class_the_model_has(capsys, monkeypatch, tmp_path):
    from xception.predict import Prediction, Ranked

    files = _image_files(tmp_path, "a.png", "b.png")
    top = [Ranked(1, "b", 0.75), Ranked(0, "a", 0.25)]
    rows = [Prediction(files[0], top), Prediction(files[1], error="cannot read it")]
    _fake_predictor(monkeypatch, {}, lambda: iter(rows), num_classes=3)
    assert main(["predict", *files, "--format", "csv", "--topk", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("path,error," + ",".join(f"index_{i},label_{i},probability_{i}"
                                                 for i in (1, 2, 3)))  # fmt: skip
    assert lines[1] == f"{files[0]},,1,b,0.750000,0,a,0.250000,,,"
    assert lines[2] == f"{files[1]},cannot read it,,,,,,,,,"
    assert len(lines) == 3


def test_predict_fails_when_no_file_could_be_classified(capsys, monkeypatch, tmp_path):
    from xception.predict import Prediction

    files = _image_files(tmp_path, "a.png", "b.png")
    rows = [Prediction(f, error="cannot read it") for f in files]
    _fake_predictor(monkeypatch, {}, lambda: iter(rows))
    assert main(["predict", *files]) == 1
    assert "classified 0 of 2 files; 2 could not be read" in capsys.readouterr().err


def test_predict_stopped_part_way_prints_the_rows_so_far(capsys, monkeypatch, tmp_path):
    from xception.predict import Prediction, Ranked

    files = _image_files(tmp_path, "a.png", "b.png")

    def rows():
        yield Prediction(files[0], [Ranked(0, "cat", 0.5)])
        raise KeyboardInterrupt

    _fake_predictor(monkeypatch, {}, rows)
    assert main(["predict", *files]) == 130
    captured = capsys.readouterr()
    assert files[0] in captured.out and "cat (50.0%)" in captured.out
    assert files[1] not in captured.out
    assert "stopped after 1 of 2 files" in captured.err
    assert captured.err.endswith("xception predict: interrupted\n")


def test_predict_checks_before_loading_the_weights(capsys, monkeypatch, tmp_path):
    from xception.predict import Prediction, Ranked

    files = _image_files(tmp_path, "a.png")
    seen: dict = {}
    _fake_predictor(monkeypatch, seen, lambda: iter([Prediction(files[0], [Ranked(0, "a", 1.0)])]))
    for flags, message in ((["--backend", "tf"], "unknown --backend 'tf': use one of torch, "),
                           (["--topk", "0"], "--topk 0 is not valid: give at least 1 (classes"),
                           (["--batch-size", "-2"], "--batch-size -2 is not valid: give at "
                                                    "least 1 (images per batch)")):  # fmt: skip
        assert main(["predict", *files, *flags]) == 2
        assert message in capsys.readouterr().err
        assert seen == {}
    # One file missing among others is its own error row, not the whole command refused.
    assert main(["predict", files[0], str(tmp_path / "missing.png")]) == 0
    assert seen["predict"][0] == [files[0], str(tmp_path / "missing.png")]


def _fake_converter(monkeypatch, seen: dict):
    import xception.weights as weights
    import xception.zoo as zoo

    model = _tiny_model()

    def create_model(name, **kwargs):
        seen["create_model"] = (name, kwargs)
        return model

    def writer(kind):
        def write(m, path, *rest):
            assert m is model
            seen[kind] = (str(path), rest)
            return path

        return write

    monkeypatch.setattr(zoo, "create_model", create_model)
    monkeypatch.setattr(weights, "save_keras_h5", writer("h5"))
    monkeypatch.setattr(weights, "save_safetensors", writer("safetensors"))
    return model


def test_convert_writes_the_format_the_output_name_says(capsys, monkeypatch, tmp_path):
    seen: dict = {}
    model = _fake_converter(monkeypatch, seen)
    h5 = str(tmp_path / "k.h5")
    assert main(["convert", "in.pth", h5, "--model", "xception-compact"]) == 0
    assert seen == {"create_model": ("xception-compact", dict(weights="in.pth")), "h5": (h5, ())}
    assert "keras.applications.Xception(weights=" in capsys.readouterr().out
    seen.clear()
    st = str(tmp_path / "w.SafeTensors")
    assert main(["convert", "in.pth", st]) == 0
    assert seen == {"create_model": ("xception", dict(weights="in.pth")),
                    "safetensors": (st, (model.weights_meta,))}  # fmt: skip
    capsys.readouterr()
    for name, flags, message in (("k.weights.h5", [], "Keras 3's own layout"),
                                 ("w.bin", [], "must be a .safetensors file"),
                                 ("w.h5", ["--model", "inception-v3"],
                                  "a Keras file holds Xception's layers only")):  # fmt: skip
        seen.clear()
        assert main(["convert", "in.pth", str(tmp_path / name), *flags]) == 2
        assert message in capsys.readouterr().err
        assert seen == {}  # refused before loading anything
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _fake_experiments(monkeypatch, seen: dict, error: BaseException | None = None):
    import xception.experiments as experiments

    def run(suites, out, scale, data, remeasure_speed):
        seen.update(suites=suites, out=out, scale=scale, data=data, remeasure=remeasure_speed)
        if error is not None:
            raise error
        return {"suites": {}, "trained": 0, "reused": 0, "remeasured": 0}

    monkeypatch.setattr(experiments, "run_experiments", run)


def test_experiment_flags_reach_the_scale(capsys, monkeypatch, tmp_path):
    from xception.experiments import SCALES, SUITES

    monkeypatch.chdir(tmp_path)
    seen: dict = {}
    _fake_experiments(monkeypatch, seen)
    argv = ["experiment", "all", "--quick", "--set", "drop_rate=0.1", "--segments", "4,1,2,2",
            "--data", "toy", "--epochs", "1", "--train-size", "10", "--val-size", "5"]  # fmt: skip
    assert main(argv) == 0
    scale = seen["scale"]
    assert seen["suites"] == list(SUITES) and seen["out"] == "experiments/quick"
    assert seen["data"] == "toy" and seen["remeasure"] is False
    assert scale.model == {**SCALES["quick"].model, "drop_rate": 0.1}  # added to the scale's
    assert scale.segments == (1, 2, 4) and (scale.epochs, scale.train_size, scale.val_size) == (
        1, 10, 5)  # fmt: skip
    assert scale.name == "quick, customised" and scale.seeds == SCALES["quick"].seeds
    argv = ["experiment", "residual", "--seeds", "1000", "--remeasure-speed", "--out", "o"]
    assert main(argv) == 0
    assert (seen["suites"], seen["out"], seen["remeasure"]) == (["residual"], "o", True)
    assert seen["scale"] == SCALES["full"].__class__(**{**vars(SCALES["full"]), "seeds": 1000})
    assert main(["experiment", "residual"]) == 0
    assert seen["out"] == "experiments/full" and seen["data"] == "fashion-mnist"
    capsys.readouterr()
    seen.clear()
    for flags in (["--seeds", "0"], ["--seeds", "1001"], ["--epochs", "0"],
                  ["--train-size", "0"], ["--val-size", "-1"], ["--segments", "1,2"]):  # fmt: skip
        assert main(["experiment", "residual", *flags]) == 2, flags
        assert capsys.readouterr().err.startswith(f"xception experiment: error: {flags[0]} ")
    assert seen == {} and list(tmp_path.iterdir()) == []


def test_experiment_stopped_or_diverged_says_the_finished_runs_are_kept(capsys, monkeypatch):
    import signal

    from xception.train import Interrupted, TrainingError

    _fake_experiments(monkeypatch, {}, Interrupted(signal.SIGINT, None))
    assert main(["experiment", "residual", "--out", "o"]) == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    _fake_experiments(monkeypatch, {}, TrainingError("residual seed 1 diverged"))
    assert main(["experiment", "residual", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err == ("xception experiment: error: residual seed 1 diverged. Finished runs are kept "
                   "in o/runs.\n")  # fmt: skip


def test_export_passes_its_flags_through(capsys, monkeypatch, tmp_path):
    import types

    import xception.deploy as deploy
    import xception.zoo as zoo
    from xception.weights import input_meta

    model = _tiny_model()
    seen: dict = {}

    def create_model(name, **kwargs):
        seen["create_model"] = (name, kwargs)
        return model

    def export(m, output, fmt, input_size, dynamic_size):
        assert m is model
        seen["export"] = (output, fmt, input_size, dynamic_size)
        return types.SimpleNamespace(path=output, format=fmt, min_size=None, max_abs_error=0.0,
                                     checked_batches=[1, 2])  # fmt: skip

    monkeypatch.setattr(zoo, "create_model", create_model)
    monkeypatch.setattr(deploy, "export", export)
    onnx = str(tmp_path / "m.onnx")
    argv = ["export", onnx, "--model", "xception-compact", "--weights", "w.pth", "--set",
            "padding=symmetric", "--size", "40", "--dynamic-size"]  # fmt: skip
    assert main(argv) == 0
    assert seen["create_model"] == ("xception-compact", dict(weights="w.pth", padding="symmetric"))
    assert seen["export"] == (onnx, "onnx", 40, True)
    pt2 = str(tmp_path / "m.pt2")
    assert main(["export", pt2]) == 0
    assert seen["create_model"] == ("xception", dict(weights=None))
    assert seen["export"] == (pt2, "exported-program", input_meta(model).input_size, False)
    upper = str(tmp_path / "m.PT")  # the suffix in any case
    assert main(["export", upper]) == 0
    assert seen["export"][:2] == (upper, "torchscript")
    capsys.readouterr()
    seen.clear()
    images = str(tmp_path)
    for name, message in (("q.pt", "--int8 needs --format onnx"),
                          ("q.onnx", "--int8 needs --calibration DIR")):  # fmt: skip
        assert main(["export", str(tmp_path / name), "--int8"]) == 2
        assert message in capsys.readouterr().err
    assert main(["export", onnx, "--int8", "--calibration", images, "--dynamic-size"]) == 2
    assert "calibrated at one input size" in capsys.readouterr().err
    assert seen == {}


def _fake_bench(monkeypatch, seen: dict, failed: tuple[str, ...] = ()):
    import types
    from pathlib import Path

    import xception.bench as bench
    import xception.cli as cli

    results = [types.SimpleNamespace(name=n, error="it broke") for n in failed]
    report = types.SimpleNamespace(results=[*results, types.SimpleNamespace(name="ok", error=None)],
                                   to_markdown=lambda: "| table |\n",
                                   comparisons_markdown=lambda: "")  # fmt: skip

    def run_bench(**kwargs):
        seen["run_bench"] = kwargs
        return report

    def save_json(r, path):
        Path(path).write_text("{}")
        return Path(path)

    monkeypatch.setattr(bench, "run_bench", run_bench)
    monkeypatch.setattr(bench, "save_json", save_json)
    monkeypatch.setattr(cli, "_fmt_bench", lambda r: "the table")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.setdefault("threads", n))


def test_bench_flags_and_defaults_reach_run_bench(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    seen: dict = {}
    _fake_bench(monkeypatch, seen)
    assert main(["bench", "--quick", "--markdown", "b.md"]) == 0
    kwargs = seen["run_bench"]
    assert callable(kwargs.pop("progress"))
    assert kwargs == dict(size=64, batches=(1, 2), train_batch=2, repeats=2, quick=True,
                          only=None, device="cpu")  # fmt: skip
    assert (tmp_path / "b.md").read_text() == "| table |\n"
    assert (tmp_path / "bench.json").read_text() == "{}"
    assert main(["bench"]) == 0
    assert {k: seen["run_bench"][k] for k in ("size", "batches", "train_batch", "repeats")} == dict(
        size=299, batches=(1, 8), train_batch=8, repeats=5)  # fmt: skip
    assert "threads" not in seen
    argv = ["bench", "--size", "128", "--batch", "4", "16", "--train-batch", "0", "--repeats",
            "3", "--device", "cpu:0", "--only", "eager", "onnx", "--threads", "3", "--json",
            "r.json"]  # fmt: skip
    assert main(argv) == 0
    kwargs = seen["run_bench"]
    kwargs.pop("progress")
    assert kwargs == dict(size=128, batches=(4, 16), train_batch=None, repeats=3, quick=False,
                          only=["eager", "onnx"], device="cpu:0")  # fmt: skip
    assert seen["threads"] == 3 and (tmp_path / "r.json").is_file()


def test_bench_fails_when_a_candidate_failed_and_keeps_json_and_markdown_apart(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    seen: dict = {}
    _fake_bench(monkeypatch, seen, failed=("onnx fp32",))
    assert main(["bench", "--quick"]) == 1
    assert "1 candidate(s) failed: onnx fp32 (see their error rows)" in capsys.readouterr().err
    seen.clear()
    assert main(["bench", "--quick", "--json", "b.json", "--markdown", "./b.json"]) == 2
    assert "--json and --markdown both name ./b.json" in capsys.readouterr().err
    assert seen == {} and not (tmp_path / "b.json").exists()


def _capture_fit(monkeypatch, seen: dict, result=None):
    import xception.cli as cli

    def fit(cfg, given=None, command="train"):
        seen["cfg"], seen["given"] = cfg, given
        return 0, result

    monkeypatch.setattr(cli, "_fit", fit)


def test_train_flags_beat_set_which_beats_config(monkeypatch, tmp_path):
    seen: dict = {}
    _capture_fit(monkeypatch, seen)
    (tmp_path / "c.yaml").write_text("lr: 0.1\nepochs: 4\nseed: 1\nmodel_args: {width: 0.5}\n")
    base = ["train", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "c.yaml")]
    assert main([*base, "--set", "lr=0.2", "--set", "seed=5", "--seed", "6", "--set",
                 "model_args.middle_blocks=2", "--no-progress"]) == 0  # fmt: skip
    cfg = seen["cfg"]
    assert (cfg.lr, cfg.epochs, cfg.seed, cfg.progress) == (0.2, 4, 6, False)
    assert cfg.model_args == {"width": 0.5, "middle_blocks": 2}
    assert {"lr", "epochs", "seed", "model_args"} <= seen["given"]
    assert main([*base, "--set", "lr=0.2", "--lr", "0.3"]) == 0
    assert (seen["cfg"].lr, seen["cfg"].progress) == (0.3, True)


def test_train_config_names_its_recipe_beside_itself(capsys, monkeypatch, tmp_path):
    seen: dict = {}
    _capture_fit(monkeypatch, seen)
    monkeypatch.chdir(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "base.yaml").write_text("recipe: fashion-mnist\nepochs: 7\n")
    (sub / "c.yaml").write_text("recipe: base.yaml\nlr: 0.2\n")
    assert main(["train", "--out", "r", "--config", "sub/c.yaml"]) == 0
    assert (seen["cfg"].epochs, seen["cfg"].lr) == (7, 0.2)
    (sub / "i.yaml").write_text("recipe: imagenet\n")
    assert main(["train", "--out", "r", "--config", "sub/i.yaml", "--recipe", "imagenet"]) == 0
    assert seen["cfg"].recipe == "imagenet"
    seen.clear()
    argv = ["train", "--out", "r", "--config", "sub/i.yaml", "--recipe", "fashion-mnist"]
    assert main(argv) == 2
    assert "starts from recipe imagenet, and --recipe is fashion-mnist" in capsys.readouterr().err
    assert seen == {}


def test_train_resume_auto_without_a_checkpoint_starts_a_new_run(capsys, monkeypatch, tmp_path):
    seen: dict = {}
    _capture_fit(monkeypatch, seen)
    argv = ["train", "--out", str(tmp_path / "r"), "--resume", "auto", "--epochs", "2"]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.recipe, cfg.epochs, cfg.resume) == ("fashion-mnist", 2, "auto")
    assert "--resume continues the run" not in capsys.readouterr().err


def test_train_picks_or_demands_a_run_folder(capsys, monkeypatch, tmp_path):
    seen: dict = {}
    _capture_fit(monkeypatch, seen)
    monkeypatch.chdir(tmp_path)
    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train"]) == 0
    assert seen["cfg"].out.startswith("runs/fashion-mnist-")
    seen.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train"]) == 2
    assert "under torchrun pass --out DIR" in capsys.readouterr().err
    assert seen == {}
    # A finished run's results without a checkpoint are not trained over.
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.csv").write_text("epoch\n")
    assert main(["train", "--out", "done"]) == 2
    assert "holds a finished run's results (metrics.csv)" in capsys.readouterr().err
    assert seen == {}


def test_train_outcome_exit_status_and_who_prints_it(capsys, monkeypatch, tmp_path):
    import xception.train as train

    def diverged(cfg, given=None):
        raise train.TrainingError("the loss is nan at step 3")

    monkeypatch.setattr(train, "fit", diverged)
    assert main(["train", "--out", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err == "xception train: error: the loss is nan at step 3\n"
    final = dict(val_top1=91.0, images_per_s=600.0, epoch=3)
    result = dict(out="r", params=1, final=final, best=final, wall_s=60.0)
    _capture_fit(monkeypatch, {}, result)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.startswith("run folder: r (1 parameters)")


def test_train_refuses_an_out_of_blanks(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--out", "  "])
    assert stop.value.code == 2
    assert "argument --out: an empty folder name" in capsys.readouterr().err


def test_eval_passes_its_flags_through_and_writes_the_json(capsys, monkeypatch, tmp_path):
    import json

    import xception.evaluate as evaluate

    seen: dict = {}

    def evaluate_file(checkpoint, data, **kwargs):
        seen["args"], seen["kwargs"] = (checkpoint, data), kwargs
        return {"top1": 50.0}

    monkeypatch.setattr(evaluate, "evaluate_file", evaluate_file)
    out = tmp_path / "r.json"
    argv = ["eval", "--checkpoint", "ck", "--data", "d", "--model", "xception-compact", "--size",
            "32", "--batch-size", "7", "--limit", "9", "--raw", "--device", "cpu", "--workers",
            "2", "--json", str(out), "--set", "middle_blocks=2"]  # fmt: skip
    assert main(argv) == 0
    assert seen["args"] == ("ck", "d")
    assert seen["kwargs"] == dict(model="xception-compact", batch_size=7, device="cpu",
                                  image_size=32, limit=9, use_ema=False, workers=2,
                                  model_args={"middle_blocks": 2})  # fmt: skip
    printed = capsys.readouterr().out
    assert json.loads(printed) == {"top1": 50.0} and out.read_text() == printed
    assert main(["eval", "--checkpoint", "ck", "--data", "d"]) == 0
    assert seen["kwargs"] == dict(model=None, batch_size=128, device="auto", image_size=None,
                                  limit=None, use_ema=True, workers=0, model_args={})  # fmt: skip


def test_demo_trains_and_tests_on_the_data_given(capsys, monkeypatch, tmp_path):
    import xception.data
    import xception.evaluate as evaluate

    final = dict(val_top1=91.0, images_per_s=600.0, epoch=1)
    seen: dict = {}
    _capture_fit(monkeypatch, seen, dict(out="r", params=1, final=final, best=final, wall_s=6.0))
    tested = []
    monkeypatch.setattr(xception.data, "resolve_data", lambda data: data)

    def evaluate_file(*args, **kwargs):
        tested.append((args, kwargs))
        return dict(top1=90.0, top5=99.0, images=10)

    monkeypatch.setattr(evaluate, "evaluate_file", evaluate_file)
    out, data = str(tmp_path / "run"), str(tmp_path / "fm")
    argv = ["demo", "--out", out, "--data", data, "--epochs", "1", "--train-subset", "100",
            "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.out, cfg.data, cfg.epochs, cfg.train_subset, cfg.threads) == (out, data, 1, 100, 1)
    assert tested == [((out, data), {})]


def test_main_reports_interrupts_full_disks_and_exits_torchrun_workers(capsys, monkeypatch):
    import errno
    import logging
    import os

    _failing(monkeypatch, KeyboardInterrupt())
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "xception models: interrupted\n"
    _failing(monkeypatch, OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert main(["models"]) == 2
    assert capsys.readouterr().err == ("xception models: error: [Errno 122] Disk quota exceeded "
                                       "while writing the output: free space, or choose another "
                                       "place\n")  # fmt: skip
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    # The process would end here: logging's shutdown, run for real inside pytest, closed the
    # handlers of this process's earlier tests (some on the real stderr), and pytest then
    # died writing its report ("lost sys.stderr").
    shut = []
    monkeypatch.setattr(logging, "shutdown", lambda: shut.append(True))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert main(["models"]) == 2 and exits == [2] and shut  # a worker leaves at once
    capsys.readouterr()
    exits.clear()
    from xception import cli

    monkeypatch.setitem(cli.COMMANDS, "models", ("list", lambda p: None, lambda args: 0))
    assert main(["models"]) == 0 and exits == []


def test_help_version_and_usage_errors_answer_without_loading_torch():
    """Building the parser imported the experiments and deploy modules, and with them torch:
    `xception --help`, `--version` and a usage error each took 3.5 s on 2 cores. They now load
    no torch; the names the parser offers are the modules' own."""
    import subprocess

    from xception import cli, deploy, experiments

    assert cli.SUITE_NAMES == experiments.SUITES
    assert cli.EXPORT_FORMAT_NAMES == deploy.EXPORT_FORMATS
    code = ("import sys\nfrom xception.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "else:\n    code = 0\n"
            "print(code, sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")  # fmt: skip
    for argv, status in [(["--version"], 0), (["--help"], 0), (["experiment", "--help"], 0),
                         (["export", "--help"], 0), (["predict"], 2),
                         (["experiment", "bogus"], 2)]:  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.stdout.splitlines()[-1] == f"{status} []", (argv, done.stdout, done.stderr)
