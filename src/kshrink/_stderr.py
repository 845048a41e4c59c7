"""Native libraries (TensorFlow, LiteRT, ONNX Runtime) print notices on file descriptor 2 that
no Python setting silences and no user can act on: `quiet_stderr` captures them and replays
every other line."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile


@contextlib.contextmanager
def quiet_stderr(noise: re.Pattern):
    """Captures file descriptor 2 for the duration, then writes back the lines that do not
    match `noise` (errors and warnings a user should see still show)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not noise.search(line):
                    print(line, file=sys.stderr)
