"""Learning-rate schedules (trainer.schedule.lr_factor): the time schedules at 0, 50% and 100% of the budget, the
min-lr floor, cosine over epochs, and the linear warm-up."""

from __future__ import annotations

import pytest

from trainer.schedule import lr_factor


@pytest.mark.parametrize(
    ("kind", "at0", "at50", "at100"),
    [
        ("cosine-time", 1.0, 0.5, 0.0),
        ("linear-time", 1.0, 0.5, 0.0),
        ("constant", 1.0, 1.0, 1.0),
    ],
)
def test_time_schedules(kind, at0, at50, at100):
    """Each time schedule's factor at 0, 50% and 100% of the budget."""
    assert lr_factor(kind, 0.0) == pytest.approx(at0)
    assert lr_factor(kind, 0.5) == pytest.approx(at50)
    assert lr_factor(kind, 1.0) == pytest.approx(at100)


def test_min_ratio_is_the_floor():
    """min_ratio lifts the cosine: the floor at the end and past it, halfway between at 50%."""
    assert lr_factor("cosine-time", 1.0, min_ratio=0.01) == pytest.approx(0.01)
    assert lr_factor("cosine-time", 0.5, min_ratio=0.01) == pytest.approx(0.505)
    assert lr_factor("cosine-time", 2.0, min_ratio=0.01) == pytest.approx(0.01)  # past the budget: clamped


def test_cosine_epochs_follows_the_epoch_not_the_clock():
    """cosine-epochs reads the epoch (whatever the budget share), is 0 past --epochs, and needs --epochs."""
    assert lr_factor("cosine-epochs", 0.9, epoch=0, epochs=300) == pytest.approx(1.0)
    assert lr_factor("cosine-epochs", 0.1, epoch=150, epochs=300) == pytest.approx(0.5)
    assert lr_factor("cosine-epochs", 0.1, epoch=400, epochs=300) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="epochs"):
        lr_factor("cosine-epochs", 0.5)


def test_warmup_ramps_then_hands_over_to_the_schedule():
    """A 10% warm-up rises linearly from 0 to 1, then the schedule runs over the rest of the budget."""
    assert lr_factor("cosine-time", 0.0, warmup_fraction=0.1) == 0.0
    assert lr_factor("cosine-time", 0.05, warmup_fraction=0.1) == pytest.approx(0.5)
    assert lr_factor("cosine-time", 0.1, warmup_fraction=0.1) == pytest.approx(1.0)
    assert lr_factor("cosine-time", 0.55, warmup_fraction=0.1) == pytest.approx(0.5)
    assert lr_factor("constant", 0.05, warmup_fraction=0.1) == pytest.approx(0.5)
