"""`xception train` as a user drives it: config files, --set, --resume auto in job scripts,
the Python API's dict configs, and the messages for settings the engine cannot use.

Tiny models on the tiny learnable IDX toy data of test_data, one thread, so each run takes a
second or two."""

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_data import make_idx_dataset

from xception.cli import _train_config, build_parser, main
from xception.train import fit, make_config

TINY_MODEL = dict(stem_channels=[8, 8], entry_channels=[8, 16, 16], middle_blocks=1,
                  exit_channels=16, head_channels=[16, 16])  # fmt: skip
TIMING = {"images_per_s", "epoch_s", "wall_s"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("data") / "toy", n_train=256)


def tiny(toy: Path, **extra) -> dict:
    keys = dict(model_args=TINY_MODEL, data=str(toy), image_size=16, epochs=1, batch_size=32,
                lr=0.05, warmup_epochs=0, ema_decay=0.9, threads=1, progress=False,
                eval_batch_size=64, device="cpu")  # fmt: skip
    keys.update(extra)
    return keys


def write_yaml(path: Path, keys: dict) -> Path:
    path.write_text(yaml.safe_dump(keys))
    return path


def metrics_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def train_config(*argv: str):
    return _train_config(build_parser().parse_args(["train", *argv]))


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


# ---------------------------------------------------------------------------------------------
# Faults found (each test failed on the code before its fix)
# ---------------------------------------------------------------------------------------------
def test_resume_auto_with_the_run_folder_in_the_config_file_starts_as_plain_train(tmp_path, toy):
    """`--resume auto` where no checkpoint is yet must start the run "as plain train
    does" (README), also when the run folder comes from the --config file (or --set out=...)
    rather than from --out. It started from the bare TrainConfig defaults instead (recipe
    'custom': no EMA, step schedule, no label smoothing, no Nesterov), so a job script that
    passes --resume auto on every launch trained another recipe than the same command without
    it."""
    job = write_yaml(tmp_path / "job.yaml", tiny(toy, out=str(tmp_path / "run")))
    plain, _ = train_config("--config", str(job))
    resumed, _ = train_config("--config", str(job), "--resume", "auto")
    assert resumed.replace(resume=None) == plain


def test_set_resume_auto_continues_the_run_like_the_resume_flag(tmp_path, toy, capsys):
    """`--set resume=auto` (--set "overrides any config key") in a folder holding a run
    must continue it as `--resume auto` does. It was treated as a new run of the default
    recipe: the recipe's settings were 'given' (a warning listing nine of them) and its data
    (fashion-mnist) replaced the run's, so the resume was refused with a misleading error about
    other classes."""
    run = tmp_path / "run"
    recipe = write_yaml(tmp_path / "tiny.yaml", {"recipe": "fashion-mnist", **tiny(toy)})
    assert main(["train", "--recipe", str(recipe), "--out", str(run)]) == 0
    before = metrics_rows(run)
    assert main(["train", "--out", str(run), "--resume", "auto", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["train", "--out", str(run), "--set", "resume=auto", "--no-progress"])
    assert code == 0, last_error(capsys)
    assert metrics_rows(run) == before  # a finished run: nothing to do


def test_a_dict_config_starting_from_a_recipe_file_uses_that_file(tmp_path, toy):
    """`fit`/`make_config` take a dict; `{"recipe": "base.yaml", ...}` must start from
    that file as a YAML file's `recipe: base.yaml` does. The key was kept as a mere label and
    the run trained on the bare defaults (10 epochs, lr 0.1, another data set) without a
    word."""
    base = write_yaml(tmp_path / "base.yaml", {"recipe": "fashion-mnist", **tiny(toy)})
    cfg = make_config({"recipe": str(base), "lr": 0.01})
    assert (cfg.epochs, cfg.data, cfg.model_args, cfg.lr) == (1, str(toy), TINY_MODEL, 0.01)


def test_a_dict_config_naming_an_unknown_recipe_is_refused():
    """ "an unknown key or base recipe is an error that names it" (README). A dict config
    with a misspelt recipe (`{"recipe": "fashion-mnst"}`) trained on the bare defaults, labelled
    'fashion-mnst', with no error."""
    with pytest.raises(ValueError, match="fashion-mnst"):
        make_config({"recipe": "fashion-mnst", "epochs": 1})


def test_the_default_run_folder_stays_under_runs_for_a_recipe_based_on_another_file(
    tmp_path, monkeypatch
):
    """Without --out a run goes to runs/RECIPE-TIMESTAMP. A recipe file based on another
    file that has no `recipe:` key of its own (`recipe: ../shared/base.yaml`) was labelled with
    that relative path, so the run folder became runs/../shared/base.yaml-TIMESTAMP: outside
    runs/, beside the shared recipe, with '.yaml' in its name (model.json: 'trained with recipe
    ../shared/base.yaml')."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared").mkdir()
    (tmp_path / "mine").mkdir()
    write_yaml(tmp_path / "shared" / "base.yaml", {"epochs": 1})
    write_yaml(tmp_path / "mine" / "a.yaml", {"recipe": "../shared/base.yaml", "lr": 0.01})
    cfg, _ = train_config("--recipe", "mine/a.yaml")
    out = (tmp_path / cfg.out).resolve()
    assert out.parent == (tmp_path / "runs").resolve(), cfg.out
    assert ".." not in cfg.recipe and "/" not in cfg.recipe


def test_negative_workers_are_refused_by_the_config_key():
    """Every other out-of-range setting is refused by TrainConfig naming its key
    (`threads=0 is not valid: ...`). `workers=-1` was accepted and failed only after the data was
    loaded, with torch's "num_workers option should be non-negative; use num_workers=0" (a key
    that does not exist: `--set num_workers=0` is an unknown key)."""
    with pytest.raises(ValueError, match=re.escape("workers=-1 is not valid")):
        make_config("fashion-mnist", workers=-1)


def test_momentum_zero_with_the_recipes_nesterov_names_the_setting(tmp_path, toy, capsys):
    """`--set momentum=0` on the fashion-mnist recipe (nesterov: true) failed with
    torch's "Nesterov momentum requires a momentum and zero dampening", naming neither the
    recipe's `nesterov` key nor the fix (`--set nesterov=false`). Plain SGD (momentum 0) should
    either train or be refused with a message naming `nesterov`."""
    recipe = write_yaml(tmp_path / "tiny.yaml", {"recipe": "fashion-mnist", **tiny(toy)})
    code = main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--set",
                 "momentum=0", "--train-subset", "64", "--val-subset", "32"])  # fmt: skip
    err = last_error(capsys)
    assert code == 2 and "momentum=0 with nesterov=true" in err and "nesterov=false" in err, err


def test_drop_rate_set_twice_is_not_silently_resolved(tmp_path, toy):
    """`drop_rate` and `model_args.drop_rate` both set (say a recipe's model_args and
    --set drop_rate) trained with one of them while config.yaml and model.json record the other
    as well: `model_args: {drop_rate: 0.2}` beside a model built with 0.5. One of them should be
    refused (or the two made to agree), not silently dropped."""
    args = dict(TINY_MODEL, drop_rate=0.2)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape("drop_rate=0.5 and model_args.drop_rate=0.2 "
                                                  "both set")):  # fmt: skip
        fit(make_config("fashion-mnist", **tiny(toy, model_args=args, drop_rate=0.5,
                                                 out=str(out), train_subset=64)))  # fmt: skip
    assert not out.exists()
    # One of them alone builds the model with it, and the run records what it built.
    fit(make_config("fashion-mnist", **tiny(toy, model_args=args, out=str(out),
                                             train_subset=64)))  # fmt: skip
    assert json.loads((out / "model.json").read_text())["model_config"]["drop_rate"] == 0.2


def test_a_micro_batch_of_one_image_is_refused_naming_the_batch_settings(tmp_path, toy, capsys):
    """Batch_size=4 with accum_steps=4 passes every check (the batch divides), then the
    first step fails with torch's "Expected more than 1 value per channel when training, got
    input size torch.Size([1, 16, 1, 1])": nothing names batch_size or accum_steps, or says
    that batch norm needs two images per micro-batch."""
    recipe = write_yaml(tmp_path / "tiny.yaml", {"recipe": "fashion-mnist", **tiny(toy)})
    code = main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run"),
                 "--batch-size", "4", "--set", "accum_steps=4", "--train-subset", "16",
                 "--val-subset", "16"])  # fmt: skip
    err = last_error(capsys)
    assert code == 2 and "each micro-batch holds 1 image(s) (batch_size=4" in err, err
    assert "accum_steps=4" in err and not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Guards: behaviour checked and found correct
# ---------------------------------------------------------------------------------------------
def test_a_runs_config_yaml_as_config_repeats_the_run(tmp_path, toy):
    """Guards: `--config RUN/config.yaml --out NEW` (config.yaml names its recipe, holds out,
    resume: null) trains the same run again: the same metrics.csv and weights."""
    recipe = write_yaml(tmp_path / "tiny.yaml", {"recipe": "fashion-mnist", **tiny(toy)})
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["train", "--recipe", str(recipe), "--out", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    assert metrics_rows(again) == metrics_rows(first)
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
