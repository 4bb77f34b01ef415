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
        (["info", "xception", "--set", "segments=3"], "segments=3 does not divide"),
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
    assert err_text == "xception models: another rank stopped; see its error above (rank 1)\n"
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
