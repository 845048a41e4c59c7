"""Hostile inputs through the command line, each in its own process: exit 2, one line, and a
bounded peak memory (measured with wait4, over a process that only imported Keras)."""

import io
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

# Only the TensorFlow run: the command starts its own process either way.
import keras

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="runs the command line in fresh processes")

CEILING = 1.5e9  # bytes above a process that only imported Keras


def peak_rss(argv) -> tuple[int, str, int]:
    """(exit code, stderr, peak resident bytes) of `python argv...`."""
    process = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    err = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, err, usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def keras_baseline():
    _, _, peak = peak_rss(["-c", "import keras; keras.ops.ones((2,))"])
    return peak


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("red") / "m.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save(path)
    return path


def billion_laughs(tmp_path):
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]"
              for i in range(8)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines + ["steps: *i"]))
    return path


def bloated_keras(tmp_path):
    """A 1 MB .keras whose config.json holds 1 GiB of whitespace, written by another process
    (a forked child's peak memory counts what its parent held at the fork)."""
    path = tmp_path / "bloated.keras"
    subprocess.run([sys.executable, "-c", (
        "import sys, zipfile\n"
        "with zipfile.ZipFile(sys.argv[1], 'w', compression=zipfile.ZIP_DEFLATED) as z:\n"
        "    z.writestr('metadata.json', '{}')\n"
        "    z.writestr('config.json', '{' + ' ' * (1 << 30) + '}')\n"), str(path)],
        check=True)
    return path


def huge_dense_keras(tmp_path, model_file):
    """A few-KB .keras whose config gives two Dense layers 2^24 units (every number in
    bounds, their product a 2^48 kernel), over the real weights file of a small model."""
    path = tmp_path / "huge.keras"
    big = 1 << 24
    subprocess.run([sys.executable, "-c", (
        "import sys, zipfile\n"
        "src, out, big = sys.argv[1], sys.argv[2], sys.argv[3]\n"
        "with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, 'w') as o:\n"
        "    for name in z.namelist():\n"
        "        data = z.read(name)\n"
        "        if name == 'config.json':\n"
        "            data = (data.decode().replace('\"units\": 3', '\"units\": ' + big)\n"
        "                    .replace('[null, 4]', '[null, ' + big + ']').encode())\n"
        "        o.writestr(name, data)\n"), str(model_file), str(path), str(big)], check=True)
    return path


CASES = ["billion laughs recipe", "1 GiB config.json", "2^48-kernel .keras config"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_file_exits_2_in_bounded_memory(case, tmp_path, model_file, keras_baseline):
    if case == "billion laughs recipe":
        argv = ["compress", str(model_file), "--recipe", str(billion_laughs(tmp_path)),
                "-o", str(tmp_path / "out.keras")]
    elif case == "1 GiB config.json":
        argv = ["measure", str(bloated_keras(tmp_path))]
    else:
        argv = ["measure", str(huge_dense_keras(tmp_path, model_file))]
    code, err, peak = peak_rss(["-m", "kshrink", *argv])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert peak - keras_baseline < CEILING
    assert not (tmp_path / "out.keras").exists()


def _padded_member(path, member: str, size: int, head: bytes = b"") -> None:
    """Adds `member` to the zip at `path`: `head` then zeros up to `size` bytes, deflated to
    a few hundred KB, written in chunks (never `size` bytes in memory)."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open(member, "w", force_zip64=True) as f:
        f.write(head)
        chunk = bytes(1 << 20)
        for _ in range((size - len(head)) // len(chunk)):
            f.write(chunk)


def test_archives_that_would_inflate_past_any_real_file_are_refused_unread(
        tmp_path, model_file, keras_baseline):
    padded = tmp_path / "padded.keras"
    with zipfile.ZipFile(model_file) as source, zipfile.ZipFile(padded, "w") as out:
        for name in source.namelist():
            if name != "model.weights.h5":
                out.writestr(name, source.read(name))
    _padded_member(padded, "model.weights.h5", 300 << 20)
    data = tmp_path / "bomb.npz"
    np.savez(data, y=np.zeros(4, "int64"))
    header = np.lib.format.header_data_from_array_1_0(np.zeros((300 << 18, 4), "uint8"))
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    _padded_member(data, "x.npy", 300 << 20, buffer.getvalue())
    for argv, file in ((["measure", str(padded)], padded),
                       (["compress", str(model_file), "--recipe", "int8", "--data", str(data),
                         "-o", str(tmp_path / "out.keras")], data)):
        code, err, peak = peak_rss(["-m", "kshrink", *argv])
        assert code == 2 and "would inflate" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert peak - keras_baseline < CEILING
    assert not (tmp_path / "out.keras").exists()


@pytest.mark.parametrize("techniques", ["[" * 5000, "{a: " + "9" * 5000 + "}",
                                        "&a [x, x, x, x, x, x, x, x, x]"])
def test_search_techniques_within_the_recipe_limits(techniques, tmp_path, model_file,
                                                    keras_baseline):
    if techniques.startswith("&a"):  # a billion laughs in one argument
        techniques = "- " + "\n- ".join(["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
            f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")])
    code, err, peak = peak_rss(["-m", "kshrink", "search", str(model_file), "--data", "digits",
                                "--max-accuracy-drop", "1", "-o", str(tmp_path / "o.keras"),
                                "--techniques", techniques])
    assert code == 2 and "--techniques" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert peak - keras_baseline < CEILING


@pytest.mark.parametrize("x, y, message", [
    (np.ones((8, 4), "complex64"), np.zeros(8, "int64"), "complex64 values"),
    (np.ones((8, 4), "float32"), np.full(8, 0.5), "the label 0.5 at index 0"),
])
def test_data_of_the_wrong_kind_is_one_line(x, y, message, tmp_path, model_file, capsys):
    from kshrink.cli import main

    np.savez(tmp_path / "d.npz", x=x, y=y)
    code = main(["compress", str(model_file), "--recipe", "int8", "--data",
                 str(tmp_path / "d.npz"), "-o", str(tmp_path / "o.keras")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.keras").exists()


@pytest.mark.parametrize("arguments, message", [
    (["search", "--epochs", str(10**20)], "--epochs: must be a whole number"),
    (["compress", "--recipe", "fine_tune: {epochs: 100000000000000000000}\nsteps: [fold: {}]"],
     "epochs must be an integer in [1, 100000]"),
])
def test_huge_counts_are_one_line_before_any_work(arguments, message, tmp_path, model_file,
                                                  capsys):
    from kshrink.cli import main

    command, *rest = arguments
    if command == "compress":
        (tmp_path / "r.yaml").write_text(rest[1])
        rest = ["--recipe", str(tmp_path / "r.yaml"), "--data", "digits"]
    else:
        rest += ["--data", "digits", "--max-accuracy-drop", "1"]
    code = main([command, str(model_file), *rest, "-o", str(tmp_path / "o.keras")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.keras").exists()


def test_an_unforeseen_error_is_one_line_unless_debug(monkeypatch, capsys):
    from kshrink import cli

    def broken(args):
        raise RuntimeError("something no check foresaw")

    monkeypatch.setitem(cli.COMMANDS, "techniques", broken)
    assert cli.main(["techniques"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("kshrink: error: RuntimeError: something no check foresaw "
                           "(nothing is written; --debug shows where)")
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "techniques"])


def test_layer_names_with_dollars_are_text_in_the_report(tmp_path):
    import kshrink

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name=r"$\undefinedcmd$"),
                              keras.layers.Dense(2, name="a$b$c$d")])
    # (on TensorFlow, compress renames them: it cannot run them)
    page = kshrink.report.html(tmp_path / "r.html", model, model).read_text()
    assert r"$\undefinedcmd$" in page and "a$b$c$d" in page


def test_names_tensorflow_refuses_as_scopes_still_compress_export_and_report(tmp_path):
    from kshrink.cli import main

    inputs = keras.Input((8, 8), name="the image")
    x = keras.layers.Reshape((8, 8, 1), name="my model")(inputs)
    x = keras.layers.Conv2D(4, 3, name=r"$\undefinedcmd$")(x)
    x = keras.layers.Flatten(name="a$b$c$d")(x)
    keras.Model(inputs, keras.layers.Dense(10, name="_head")(x), name="my model").save(
        tmp_path / "m.keras")
    out, page, exported = tmp_path / "o.keras", tmp_path / "r.html", tmp_path / "o.tflite"
    with pytest.warns(UserWarning, match=re.escape(
            r"names TensorFlow cannot run a model with were replaced: '$\\undefinedcmd$' -> "
            "'x__undefinedcmd_', '_head' -> 'x_head', 'a$b$c$d' -> 'a_b_c_d' and 2 more")):
        assert main(["compress", str(tmp_path / "m.keras"), "--recipe", "int8", "--data",
                     "digits", "-o", str(out), "--report", str(page)]) == 0
    assert main(["export", str(out), str(exported), "--data", "digits"]) == 0
    assert "x__undefinedcmd_" in page.read_text() and exported.stat().st_size > 0
    names = {layer.name for layer in keras.saving.load_model(out).layers}
    assert {"my_model", "x__undefinedcmd_", "a_b_c_d", "x_head"} <= names


def test_sigterm_leaves_no_output_and_no_temporary_file(tmp_path):
    import time

    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(),
                              keras.layers.Dense(64), keras.layers.Dense(10)])
    model.save(tmp_path / "m.keras")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{prune: {sparsity: 0.5}}]\nfine_tune: {epochs: 5000}\n")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "kshrink", "compress", str(tmp_path / "m.keras"), "--recipe",
         str(recipe), "--data", "digits", "-o", str(tmp_path / "out.keras")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(scratch), "TF_CPP_MIN_LOG_LEVEL": "3"})
    time.sleep(20)  # Keras started, the fine-tune (minutes long) under way
    assert process.poll() is None
    process.terminate()
    err = process.stderr.read()
    assert process.wait(timeout=60) == 143, err
    assert err.strip().splitlines()[-1] == "kshrink: terminated; nothing is written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "r.yaml", "tmp"]
    assert not [p for p in scratch.iterdir() if p.name.startswith("kshrink-")]
