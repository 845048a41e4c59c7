import hashlib
import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from kshrink import datasets, zoo
from kshrink.cli import main
from kshrink.measure import evaluate


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """A briefly trained LeNet-300-100 saved as .keras."""
    path = tmp_path_factory.mktemp("models") / "lenet.keras"
    zoo.pretrained("lenet_300_100", epochs=2, verbose=False).save(path)
    return path


@pytest.fixture
def int8_recipe(tmp_path):
    path = tmp_path / "int8.yaml"
    path.write_text("- quantize: {mode: int8}\n")
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_int8_lenet_end_to_end(lenet, int8_recipe, tmp_path):
    """The acceptance path, as a user runs it: a separate process, then plain Keras loads it."""
    out = tmp_path / "lenet-int8.keras"
    done = subprocess.run(
        [sys.executable, "-m", "kshrink", "compress", lenet, "--recipe", int8_recipe, "-o", out,
         "--data", "mnist", "--layers"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The summary card first (its title the verdict), then every layer (--layers).
    assert done.stdout.startswith("summary: ") and "smaller on disk" in done.stdout
    assert "fc1" in done.stdout and "\naccuracy " in done.stdout
    assert os.path.getsize(lenet) / os.path.getsize(out) >= 3.5

    test = datasets.load("mnist").test
    before = evaluate(keras.saving.load_model(lenet), *test)["accuracy"]
    after = evaluate(keras.saving.load_model(out), *test)["accuracy"]
    assert abs(after - before) <= 0.001

    probe = ("import sys, keras; m = keras.saving.load_model(sys.argv[1]); "
             "print(m.get_layer('fc1').kernel.dtype, 'kshrink' in sys.modules)")
    plain = subprocess.run([sys.executable, "-c", probe, out], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split() == ["int8", "False"]


def bad_inputs(tmp_path, lenet, int8_recipe):
    text = tmp_path / "notes.keras"
    text.write_text("just text")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(lenet.read_bytes()[: os.path.getsize(lenet) // 2])
    no_config = tmp_path / "empty.keras"
    with zipfile.ZipFile(no_config, "w") as z:
        z.writestr("hello.txt", "hi")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("- quantise: {mode: int8}\n")
    bad_option = tmp_path / "bad.yaml"
    bad_option.write_text("- quantize: {mode: int3}\n")
    fine_tunes = tmp_path / "ft.yaml"
    fine_tunes.write_text("steps: [prune]\nfine_tune: {epochs: 1}\n")
    out = tmp_path / "out.keras"
    rng = np.random.default_rng(0)
    images, labels = rng.random((16, 28, 28)).astype("float32"), rng.integers(0, 10, 16)
    nan_data, bad_labels = tmp_path / "nan.npz", tmp_path / "labels.npz"
    np.savez(nan_data, x=np.where(images > 0.999, np.nan, images), y=labels)
    np.savez(bad_labels, x=images, y=np.where(labels == labels[0], 1000, labels))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("- quantize: {mode: int8}  # caf\xe9".encode("latin-1"))
    recipes = {}
    for name, content in {"deep.json": "[" * 100_000 + "]" * 100_000,
                       "deep.yaml": "- " * 100_000 + "x",
                       "digits.yaml": "- prune: {sparsity: " + "9" * 5000 + "}",
                       "pattern.yaml": "- prune: {layers: {pattern: 5}}",
                       "names.yaml": "- prune: {layers: {names: 5}}",
                       "types.yaml": "- prune: {layers: {types: 5}}"}.items():
        recipes[name] = tmp_path / name
        recipes[name].write_text(content)
    scalar, empty, negative = (tmp_path / f"{n}.npz" for n in ("scalar", "empty", "negative"))
    np.savez(scalar, x=np.float32(1.0), y=np.int64(0))
    np.savez(empty, x=images[:0], y=labels[:0])
    np.savez(negative, x=images, y=np.where(labels == labels[0], -5, labels))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    folder, onnx_folder = tmp_path / "folder.keras", tmp_path / "folder.onnx"
    folder.mkdir()
    onnx_folder.mkdir()
    return {
        "missing file": (["compress", tmp_path / "nope.keras", "--recipe", int8_recipe, "-o", out],
                         "model file not found"),
        "not a keras file": (["compress", text, "--recipe", int8_recipe, "-o", out],
                             "not a zip archive"),
        "corrupt zip": (["compress", corrupt, "--recipe", int8_recipe, "-o", out],
                        "not a Keras model file"),
        "zip without config": (["compress", no_config, "--recipe", int8_recipe, "-o", out],
                               "no config.json"),
        "unknown technique": (["compress", lenet, "--recipe", unknown, "-o", out],
                              "unknown technique 'quantise'"),
        "bad option": (["compress", lenet, "--recipe", bad_option, "-o", out],
                       "mode must be one of int8, int4, float16, bfloat16. Received: mode='int3'"),
        "data shape": (["compress", lenet, "--recipe", int8_recipe, "-o", out, "--data", "digits"],
                       "does not fit model"),
        "overwrite input": (["compress", lenet, "--recipe", int8_recipe, "-o", lenet],
                            "would overwrite the input"),
        "bad output suffix": (["compress", lenet, "--recipe", int8_recipe, "-o", tmp_path / "o.h5"],
                              "output must end in .keras or .kshrink"),
        "missing recipe": (["compress", lenet, "--recipe", tmp_path / "none.yaml", "-o", out],
                           "recipe file not found"),
        "missing output dir": (["compress", lenet, "--recipe", int8_recipe, "-o",
                                tmp_path / "no" / "out.keras"], "output directory does not exist"),
        "unknown dataset": (["measure", lenet, "--data", "cifar"], "unknown dataset 'cifar'"),
        "fine-tune without data": (["compress", lenet, "--recipe", fine_tunes, "-o", out],
                                   "needs --data"),
        "bad flag": (["compress", lenet], "required"),
        "output is a directory": (["compress", lenet, "--recipe", int8_recipe, "-o", folder],
                                  "is a directory"),
        "convert into a directory": (["convert", lenet, folder], "is a directory"),
        "export into a directory": (["export", lenet, onnx_folder], "is a directory"),
        "load runs 0": (["measure", lenet, "--load-runs", "0"], "must be a positive integer"),
        "load runs -1": (["measure", lenet, "--load-runs", "-1"], "must be a positive integer"),
        "latency runs 0": (["measure", lenet, "--latency-runs", "0"],
                           "must be a positive integer"),
        "bad baseline": (["measure", lenet, "--baseline", text], "not a zip archive"),
        "export samples 0": (["export", lenet, tmp_path / "m.onnx", "--samples", "0"],
                             "must be a positive integer"),
        "sensitivity samples 0": (["sensitivity", lenet, "--data", "mnist", "--samples", "0"],
                                  "must be a positive integer"),
        "NaN in data": (["compress", lenet, "--recipe", int8_recipe, "-o", out, "--data",
                         nan_data], "holds NaN or Inf"),
        "labels out of range": (["sensitivity", lenet, "--data", bad_labels], "class label 1000"),
        "recipe not UTF-8": (["compress", lenet, "--recipe", latin, "-o", out], "not UTF-8"),
        **{f"recipe {name}": (["compress", lenet, "--recipe", path, "-o", out], message)
           for (name, path), message in zip(recipes.items(), [
               "nested", "nested", "cannot be read", "pattern must be a string",
               "names must be a list of strings", "types must be a list of strings"])},
        "0-d data": (["measure", lenet, "--data", scalar], "0-d"),
        "zero samples": (["compress", lenet, "--recipe", int8_recipe, "-o", out, "--data",
                          empty], "holds no examples"),
        "negative labels": (["measure", lenet, "--data", negative], "class label -5"),
        "export samples -5": (["export", lenet, tmp_path / "m.onnx", "--samples", "-5"],
                              "must be a positive integer"),
        "unwritable output dir": (["compress", lenet, "--recipe", int8_recipe, "-o",
                                   locked / "out.keras"], "not writable"),
        "too many parameters": (["--max-parameters", "1000", "measure", lenet],
                                "more than max_parameters=1,000"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "not a keras file", "corrupt zip", "zip without config", "unknown technique",
    "bad option", "data shape", "overwrite input", "bad output suffix", "missing recipe",
    "missing output dir",
    "unknown dataset", "fine-tune without data", "bad flag", "output is a directory",
    "convert into a directory", "export into a directory", "load runs 0", "load runs -1",
    "latency runs 0", "bad baseline", "export samples 0", "sensitivity samples 0",
    "NaN in data", "labels out of range", "recipe not UTF-8", "recipe deep.json",
    "recipe deep.yaml", "recipe digits.yaml", "recipe pattern.yaml", "recipe names.yaml",
    "recipe types.yaml", "0-d data", "zero samples", "negative labels", "export samples -5",
    "unwritable output dir", "too many parameters",
])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, tmp_path, lenet, int8_recipe,
                                                             capsys):
    if case == "unwritable output dir" and os.geteuid() == 0:
        pytest.skip("root writes into any directory")
    argv, message = bad_inputs(tmp_path, lenet, int8_recipe)[case]
    files = [p for p in list(tmp_path.iterdir()) + [lenet] if p.is_file()]
    before = {p: digest(p) for p in files}
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert {p: digest(p) for p in files} == before
    assert not (tmp_path / "out.keras").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_measure_against_baseline_as_json(lenet, int8_recipe, tmp_path, capsys):
    out = tmp_path / "small.keras"
    assert run_cli(capsys, "compress", lenet, "--recipe", int8_recipe, "-o", out)[0] == 0
    code, stdout, _ = run_cli(capsys, "measure", out, "--baseline", lenet, "--data", "mnist",
                              "--format", "json", "--load-runs", "1", "--latency-runs", "5")
    assert code == 0
    result = json.loads(stdout)
    assert result["compressed"]["file"]["bytes"] < result["original"]["file"]["bytes"]
    assert result["fidelity"]["top1_agreement"] > 0.99
    code, stdout, _ = run_cli(capsys, "measure", out, "--format", "md", "--load-runs", "1",
                              "--latency-runs", "5")
    assert code == 0 and "| load time |" in stdout


def test_techniques_lists_options(capsys):
    code, out, _ = run_cli(capsys, "techniques")
    assert code == 0
    assert "quantize" in out and "mode: str = 'int8'" in out
    assert "prune" in out and "pattern: str = 'unstructured'" in out
    assert "fine_tune  (recipe key)" in out and "distill: bool | str = False" in out


def test_compact_output_measure_and_convert(lenet, tmp_path, capsys):
    recipe = tmp_path / "pc.yaml"
    recipe.write_text("- prune: {sparsity: 0.9, skip_first_last: false}\n- cluster: {clusters: 8}\n")
    compact = tmp_path / "lenet.kshrink"
    assert run_cli(capsys, "compress", lenet, "--recipe", recipe, "-o", compact)[0] == 0
    assert compact.stat().st_size * 20 < lenet.stat().st_size
    code, stdout, _ = run_cli(capsys, "measure", compact, "--baseline", lenet, "--format", "json",
                              "--load-runs", "1", "--latency-runs", "3")
    assert code == 0
    result = json.loads(stdout)
    assert result["compressed"]["file"]["bytes"] == compact.stat().st_size
    back = tmp_path / "back.keras"
    code, stdout, _ = run_cli(capsys, "convert", compact, back)
    assert code == 0 and "wrote" in stdout
    x = datasets.load("mnist").x_test[:64]
    from kshrink import load

    np.testing.assert_array_equal(keras.saving.load_model(back).predict(x, verbose=0),
                                  load(compact).predict(x, verbose=0))


def test_convert_refuses_bad_input_with_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.kshrink"
    junk.write_bytes(b"\x00" * 64)
    code, _, err = run_cli(capsys, "convert", junk, tmp_path / "out.keras")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a kshrink file" in err
    assert not (tmp_path / "out.keras").exists()


def test_sensitivity_ranks_every_layer_as_json(lenet, capsys):
    code, stdout, stderr = run_cli(capsys, "sensitivity", lenet, "--data", "mnist", "--mode",
                                   "int4", "--samples", "300", "--format", "json")
    assert code == 0
    assert stderr.splitlines() == ["kshrink: sensitivity at int4 (3)"]  # a line per stage
    code, again, stderr = run_cli(capsys, "--quiet", "sensitivity", lenet, "--data", "mnist",
                                  "--mode", "int4", "--samples", "300", "--format", "json")
    assert code == 0 and stderr == "" and again == stdout
    result = json.loads(stdout)
    assert [e["layer"] for e in result["layers"]] != [] and result["mode"] == "int4"
    assert sorted(e["layer"] for e in result["layers"]) == ["fc1", "fc2", "fc3"]
    drops = [e["accuracy_drop"] for e in result["layers"]]
    assert drops == sorted(drops, reverse=True)


def test_export_writes_a_checked_litert_file_and_refuses_bad_output(lenet, tmp_path, capsys):
    target = tmp_path / "lenet.tflite"
    code, stdout, _ = run_cli(capsys, "export", lenet, target, "--data", "mnist",
                              "--quantization", "int8", "--samples", "64")
    assert code == 0 and "quantization int8" in stdout and "top-1 agreement" in stdout
    assert 0 < target.stat().st_size < lenet.stat().st_size / 3
    code, _, err = run_cli(capsys, "export", lenet, tmp_path / "lenet.pt")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown file type" in err
    assert not (tmp_path / "lenet.pt").exists()


def test_a_keras_file_with_a_huge_config_is_refused_before_keras_reads_it(tmp_path, capsys):
    bloated = tmp_path / "bloated.keras"
    with zipfile.ZipFile(bloated, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("metadata.json", "{}")
        z.writestr("config.json", "{" + " " * (100 << 20) + "}")  # deflates to ~100 KB
    assert bloated.stat().st_size < 1 << 20
    code, _, err = run_cli(capsys, "measure", str(bloated))
    assert code == 2 and "config.json is 104,857,602 bytes" in err


def test_a_folder_of_images_feeds_compress_and_measure(tmp_path, capsys):
    """Class subfolders of PNG files, streamed by keras.utils.image_dataset_from_directory."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for label, level in (("dark", 40), ("light", 200)):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(level, 20, (8, 8, 3)), 0, 255).astype("uint8")
            (tmp_path / "photos" / label / f"{i}.png").write_bytes(
                tf.io.encode_png(pixels).numpy())
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "m.keras")
    recipe = tmp_path / "q.yaml"
    recipe.write_text("- quantize: {mode: int8}\n")
    code, out, err = run_cli(capsys, "compress", tmp_path / "m.keras", "--recipe", recipe,
                             "--data", tmp_path / "photos", "-o", tmp_path / "q.keras")
    assert code == 0, err
    assert "summary: " in out and "\naccuracy " in out and "quantize" in out
    code, out, err = run_cli(capsys, "measure", tmp_path / "q.keras", "--baseline",
                             tmp_path / "m.keras", "--data", tmp_path / "photos",
                             "--load-runs", "1", "--latency-runs", "2")
    assert code == 0, err
    assert "accuracy" in out
    code, out, err = run_cli(capsys, "compress", tmp_path / "m.keras", "--recipe", recipe,
                             "--data", tmp_path / "nothing", "-o", tmp_path / "x.keras")
    assert code == 2 and not (tmp_path / "x.keras").exists()
    # broken files are named before any work, in every command that reads the folder
    good = (tmp_path / "photos" / "dark" / "0.png").read_bytes()
    (tmp_path / "photos" / "dark" / "cut.png").write_bytes(good[:len(good) // 2])
    (tmp_path / "photos" / "light" / "text.jpg").write_text("not an image")
    for command in (["compress", tmp_path / "m.keras", "--recipe", recipe,
                     "-o", tmp_path / "x.keras"], ["measure", tmp_path / "m.keras"]):
        code, _, err = run_cli(capsys, *command, "--data", tmp_path / "photos")
        assert code == 2 and "2 files cannot be read as images: dark/cut.png" in err, err
        assert "light/text.jpg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.keras").exists()


def test_compress_and_measure_write_html_reports(lenet, int8_recipe, tmp_path, capsys):
    small, page = tmp_path / "small.kshrink", tmp_path / "compress.html"
    code, _, err = run_cli(capsys, "compress", lenet, "--recipe", int8_recipe, "-o", small,
                           "--report", page)
    assert code == 0, err
    assert "What was done" in page.read_text() and "<svg" in page.read_text()
    measured = tmp_path / "measure.html"
    code, _, _ = run_cli(capsys, "measure", small, "--baseline", lenet, "--data", "mnist",
                         "--load-runs", 1, "--latency-runs", 3, "--html", measured)
    assert code == 0 and "<h2>Latency</h2>" in measured.read_text()
    code, _, err = run_cli(capsys, "measure", small, "--html", tmp_path / "page.txt")
    assert code == 2 and "name it .html" in err and not (tmp_path / "page.txt").exists()


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    """An MLP trained briefly on the digits, saved as .keras."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu", name="fc1"),
        keras.layers.Dense(10, activation="softmax", name="fc2")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(*datasets.load("digits").train, epochs=20, verbose=0)
    path = tmp_path_factory.mktemp("models") / "digits_mlp.keras"
    model.save(path)
    return path


def test_search_writes_the_model_its_recipe_and_a_report_that_compress_repeats(
        digits_mlp, tmp_path, capsys):
    out, recipe, page = tmp_path / "s.kshrink", tmp_path / "chosen.yaml", tmp_path / "s.html"
    code, text, err = run_cli(capsys, "search", digits_mlp, "--data", "digits", "--objective",
                              "size", "--max-accuracy-drop", 3, "--epochs", 1, "--rounds", 3,
                              "-o", out, "--recipe-out", recipe, "--report", page)
    assert code == 0, err
    assert "search for size within 3 pp" in text and "chosen" in text
    assert "round 1/3" in err and "accuracy on digits test:" in text
    assert "Candidates" in page.read_text() and page.read_text().count("<svg") >= 4
    from kshrink import Recipe, compress, load

    searched = load(out)
    assert os.path.getsize(digits_mlp) / os.path.getsize(out) >= 5
    # The recipe file, run as a user would on the examples the search trained on (the
    # training split less its last tenth), repeats the model.
    x, y = datasets.load("digits").train
    cut = len(x) - round(len(x) * 0.1)
    again, _ = compress(keras.saving.load_model(digits_mlp), Recipe.from_file(recipe),
                        data=(x[:cut], y[:cut]), verbose=False)
    for a, b in zip(searched.get_weights(), again.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_search_refuses_bad_input_with_one_line_and_writes_nothing(digits_mlp, tmp_path,
                                                                    capsys):
    out = tmp_path / "s.keras"
    (tmp_path / "taken.yaml").mkdir()
    for extra, message in ((["--recipe-out", tmp_path / "r.txt"], "name it .yaml"),
                           (["--recipe-out", tmp_path / "no" / "r.yaml"], "existing folder"),
                           (["--recipe-out", tmp_path / "taken.yaml"], "existing folder"),
                           (["--report", tmp_path / "no" / "r.html"], "existing folder"),
                           (["--objective", "speed"], "invalid choice"),
                           (["--epochs", "-1"], "epochs"),
                           (["--probe-steps", "-1"], "--probe-steps: must be a whole number"),
                           (["--latency-runtime", "onnx"], "objective 'size' is not timed"),
                           (["--techniques", "prune,depth_prune"], "not depth_prune"),
                           (["--techniques", "[{prune: {method: magic}}]"], "method must be"),
                           (["--techniques", "[prune"], "not valid YAML"),
                           (["--channels", "per_layer"], "removes no channels")):
        code, _, err = run_cli(capsys, "search", digits_mlp, "--data", "digits",
                               "--max-accuracy-drop", 1, "-o", out, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_the_export_command_offers_the_quantizations_export_takes():
    import kshrink_cli
    from kshrink.deploy import QUANTIZATIONS

    args = kshrink_cli._build_parser().parse_args(["export", "m.keras", "m.tflite"])
    assert args.quantization == "auto"
    for choice in QUANTIZATIONS:
        kshrink_cli._build_parser().parse_args(["export", "m.keras", "m.onnx",
                                                "--quantization", choice])
    with pytest.raises(kshrink_cli._UsageError, match="invalid choice: 'int3'"):
        kshrink_cli._build_parser().parse_args(["export", "m.keras", "m.onnx",
                                                "--quantization", "int3"])
