import pytest

from kshrink.prune import Prune, Schedule


def test_polynomial_goes_from_initial_to_target():
    s = Schedule("polynomial", 0.9, initial_sparsity=0.1, begin_step=10, end_step=110,
                 frequency=10)
    assert s.sparsity_at(10) == pytest.approx(0.1)
    assert s.sparsity_at(110) == pytest.approx(0.9)
    assert s.sparsity_at(60) == pytest.approx(0.9 - 0.8 * 0.5 ** 3)
    values = [s.sparsity_at(t) for t in range(10, 111, 10)]
    assert values == sorted(values)
    assert [t for t in range(0, 200) if s.updates_at(t)] == list(range(10, 111, 10))


def test_constant_and_one_shot():
    constant = Schedule("constant", 0.5, begin_step=5, frequency=5)
    assert constant.sparsity_at(0) == 0.5 and constant.updates_at(5) and constant.updates_at(500)
    assert not constant.updates_at(4)
    one_shot = Schedule("one_shot", 0.5)
    assert not any(one_shot.updates_at(t) for t in range(100))


def test_end_step_defaults_to_two_thirds_of_training():
    assert Prune(sparsity=0.8).schedule_for(300).end_step == 200
    assert Prune(sparsity=0.8, end_step=50).schedule_for(300).end_step == 50
    assert Prune(pattern="2:4").schedule_for(300).kind == "one_shot"
