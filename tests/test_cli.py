import pytest

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
        (["info", "inception-v3"], "describes Xception presets"),
        (["models", "xceptoin"], "no preset name contains 'xceptoin': did you mean xception"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
