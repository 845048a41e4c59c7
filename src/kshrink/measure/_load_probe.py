"""Runs in a fresh process: loads one model file and prints the time and memory it took.

Started as a script by `kshrink.measure.load`, so it never imports kshrink unless the file
needs kshrink's loader or holds kshrink's quantized layers. Modules named after the loader
argument (the user's custom layers) are imported first, and the classes they define passed to
the loader as custom objects. Memory is the increase over the
process after `import keras` (which alone costs hundreds of MB): peak from VmHWM after
resetting it, resident from VmRSS.

With `KSHRINK_PROBE_BARRIER` set, the probe waits, once Keras is up, for the file
`<barrier>.go` (having made `<barrier>.ready`): probes then import Keras side by side and
load one at a time, each timed alone.
"""

import json
import os
import sys
import time
import zipfile


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _needs_kshrink_layers(path):
    with zipfile.ZipFile(path) as archive:
        return '"kshrink>' in archive.read("config.json").decode()


def _custom_objects(modules):
    """The classes `modules` define, by name (as `kshrink.core.classes.import_modules`)."""
    import importlib
    import inspect

    found = {}
    for name in modules:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if inspect.isclass(value) and value.__module__ == module.__name__:
                found[value.__name__] = value
    return found


def _wait_for_turn(barrier):
    """Says this probe is ready and waits for its turn (gives up if the parent is gone)."""
    if not barrier:
        return
    parent = os.getppid()
    open(barrier + ".ready", "w").close()
    while not os.path.exists(barrier + ".go"):
        if os.getppid() != parent:
            sys.exit(3)
        time.sleep(0.005)


def main(path, loader, modules=()):
    """Loads `path` with `loader` ("keras" or "kshrink", the user's `modules` imported first),
    once, in this fresh process, and prints its seconds, peak and resident bytes as JSON."""
    import keras

    keras.ops.convert_to_numpy(keras.ops.ones((2, 2)) + 1)  # bring the backend runtime up
    scope = keras.saving.CustomObjectScope(_custom_objects(modules))
    if loader == "kshrink":
        import kshrink

        load = kshrink.load
    else:
        if _needs_kshrink_layers(path):
            import kshrink  # noqa: F401  registers kshrink's layer classes
        load = keras.saving.load_model
    _wait_for_turn(os.environ.get("KSHRINK_PROBE_BARRIER"))
    rss_before = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    with scope:
        model = load(path)
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "peak_bytes": (_status_kib("VmHWM") - rss_before) * 1024,
        "resident_bytes": (_status_kib("VmRSS") - rss_before) * 1024,
        "kshrink_imported": "kshrink" in sys.modules,
        "parameters": int(model.count_params()),
    }
    print("KSHRINK_PROBE " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
