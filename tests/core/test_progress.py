"""Progress: counted work draws a bar on a terminal and one line per stage elsewhere;
`verbose=False` and `--quiet` silence it."""

import io

import numpy as np

import kshrink
from conftest import small_mlp
from kshrink.core.progress import Console, Message, counting, within


def test_counting_tells_each_item_with_its_count():
    said = []
    assert list(counting(said.append, "scoring", ["a", "b"])) == ["a", "b"]
    assert said == ["scoring: 1/2 a", "scoring: 2/2 b"]
    assert [(m.stage, m.done, m.total, m.item) for m in said] == [
        ("scoring", 0, 2, "a"), ("scoring", 1, 2, "b")]
    prefixed = []
    list(counting(within(prefixed.append, "prune"), "layers", ["c"]))
    assert prefixed == ["prune: layers: 1/1 c"] and prefixed[0].stage == "prune: layers"


def test_a_log_gets_one_line_per_stage_and_a_terminal_a_bar(trained, digits):
    x, _ = digits.train
    log = io.StringIO()
    with Console(file=log, terminal=False) as console:
        kshrink.compress(trained, kshrink.Quantize(mode="int4", method="gptq"), data=x[:128],
                         progress=console)
    lines = log.getvalue().splitlines()
    assert lines == ["kshrink: quantize, GPTQ: layers (4)"], lines  # quantize took < 1 s
    screen = io.StringIO()
    with Console(file=screen, terminal=True) as console:
        for _ in counting(console, "scoring", range(3)):
            pass
        console("writing")
    drawn = screen.getvalue()
    assert "scoring: 2" in drawn and "3/3" not in drawn.splitlines()[-1]  # the bar, then gone
    assert "kshrink: scoring (" in drawn and "writing" not in drawn  # quick: no line
    assert isinstance(Message("x"), str)


def test_compress_shows_progress_on_stderr_unless_told_not_to(trained, digits, capsys):
    x, _ = digits.train
    gptq = kshrink.Quantize(mode="int4", method="gptq")
    kshrink.compress(trained, gptq, data=x[:64])
    assert "kshrink: quantize, GPTQ: layers (4)" in capsys.readouterr().err
    kshrink.compress(trained, gptq, data=x[:64], verbose=False)
    assert capsys.readouterr().err == ""
    mlp = small_mlp()
    said = []
    kshrink.compress(mlp, [kshrink.Prune(sparsity=0.5, schedule="one_shot")],
                     data=(np.zeros((8, 8, 8), "float32"), np.zeros(8)),
                     fine_tune=kshrink.FineTune(epochs=1, verbose=False), progress=said.append)
    assert said == ["prune", "prune: fine-tuning"]
