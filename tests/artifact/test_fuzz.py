"""Fuzzing the loader: every mutated or truncated file either loads or raises ArtifactError.

Brief here (KSHRINK_FUZZ_EXAMPLES, default 300); `benchmarks/fuzz_loader.py` runs the long one.
"""

import os
import random
import resource

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kshrink
from kshrink.artifact import ArtifactError, load, save
from kshrink.artifact.fuzz import MUTATIONS, mutate

from conftest import small_cnn

EXAMPLES = int(os.environ.get("KSHRINK_FUZZ_EXAMPLES", "300"))
CEILING = 1.5e9  # bytes a single case may add to the process's peak memory


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    small, _ = kshrink.compress(small_cnn(), [kshrink.Prune(sparsity=0.7), kshrink.Cluster(clusters=8)])
    path = tmp_path_factory.mktemp("fuzz") / "valid.kshrink"
    save(small, path)
    return path.read_bytes()


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_files_load_or_raise_artifact_error(valid_file, tmp_path, seed):
    kind, data = mutate(valid_file, random.Random(seed))
    path = tmp_path / f"m{seed}.kshrink"
    path.write_bytes(data)
    before = peak_bytes()
    try:
        load(path)
    except ArtifactError as e:
        assert "\n" not in str(e)  # one line, as documented
    finally:
        path.unlink()
    assert peak_bytes() - before < CEILING, kind


def test_every_mutation_kind_is_exercised(valid_file):
    kinds = {mutate(valid_file, random.Random(seed))[0] for seed in range(60)}
    assert kinds == set(MUTATIONS)
