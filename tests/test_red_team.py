"""Hostile inputs through the command line, each in its own process: exit 2, one line, and a
bounded peak memory (measured with wait4, over a process that only imported Keras)."""

import os
import subprocess
import sys

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
