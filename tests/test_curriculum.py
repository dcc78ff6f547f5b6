"""The curriculum plan: the paper's rule, invalid plans, per-stage batch and lr."""

from __future__ import annotations

import pytest

from trainer.curriculum import CurriculumPlan, PlanError, stage_batch_size
from trainer.schedule import stage_lr


def _size_at(plan: CurriculumPlan, epoch: int) -> int:
    """The image size the loop trains at in ``epoch`` (the epoch form)."""
    return plan.size_of(plan.stage_at(epoch))


def test_papers_best_plan():
    """32:32:5 to 224: 32 px for epochs 0-4, 32 px more every 5 epochs, 224 px from epoch 30 on; its stages'
    sizes, tokens and epoch spans."""
    plan = CurriculumPlan.parse("32:32:5", final=224)
    assert [_size_at(plan, e) for e in range(5)] == [32] * 5
    assert [_size_at(plan, e) for e in range(5, 10)] == [64] * 5
    assert [_size_at(plan, e) for e in (10, 15, 20, 25)] == [96, 128, 160, 192]
    assert all(_size_at(plan, e) == 224 for e in (30, 31, 100, 10_000))
    stages = plan.stages()
    assert [s.image_size for s in stages] == [32, 64, 96, 128, 160, 192, 224]
    assert [s.tokens for s in stages] == [4, 16, 36, 64, 100, 144, 196]
    assert (stages[1].first_epoch, stages[1].last_epoch) == (5, 9)
    assert stages[-1].first_epoch == 30 and stages[-1].last_epoch is None
    assert plan.stage_at(0) == 0 and plan.stage_at(9) == 1 and plan.stage_at(500) == 6


def test_step_that_overshoots_is_capped_at_the_final_size():
    """32:64:2 to 128: stages 32, 96, then 128 (not 160), and 128 px from then on."""
    plan = CurriculumPlan.parse("32:64:2", final=128)
    assert [s.image_size for s in plan.stages()] == [32, 96, 128]
    assert _size_at(plan, 100) == 128


def test_no_curriculum_is_one_stage_at_the_final_size():
    """CurriculumPlan.fixed: one open-ended stage at the final size from epoch 0."""
    plan = CurriculumPlan.fixed(224)
    assert [(s.image_size, s.first_epoch, s.last_epoch) for s in plan.stages()] == [(224, 0, None)]
    assert _size_at(plan, 0) == _size_at(plan, 99) == 224


@pytest.mark.parametrize(
    ("text", "final", "needle"),
    [
        ("40:32:5", 224, "start size 40 is not a multiple"),
        ("32:20:5", 224, "size step 20 is not a multiple"),
        ("32:32:5", 200, "final size 200 is not a multiple"),
        ("256:32:5", 224, "start size 256 must lie in"),
        ("32:0:5", 224, "step M must be positive"),
        ("32:-16:5", 224, "step M must be positive"),
        ("32:32:0", 224, "epochs per stage N must be positive"),
        ("32:32", 224, "expected START:STEP:EPOCHS"),
        ("a:b:c", 224, "expected START:STEP:EPOCHS"),
    ],
)
def test_invalid_plans_are_refused(text, final, needle):
    """Each malformed epoch-form plan raises a PlanError with its message."""
    with pytest.raises(PlanError, match=needle):
        CurriculumPlan.parse(text, final=final)


def test_token_batch_rule():
    """--stage-batch tokens: base x (final/size)^2, capped, rounded down to a multiple of 8; fixed keeps the base;
    the lr scales with the square root of the batch."""
    assert stage_batch_size(64, 32, 224, "fixed", 1024) == 64
    assert stage_batch_size(64, 224, 224, "tokens", 1024) == 64
    assert stage_batch_size(64, 112, 224, "tokens", 1024) == 256  # (224/112)^2 = 4
    assert stage_batch_size(64, 32, 224, "tokens", 1024) == 1024  # 49x, capped
    assert stage_batch_size(64, 160, 224, "tokens", 1024) == 120  # 125.4 rounded down to a multiple of 8
    assert stage_lr(1e-3, 256, 64) == pytest.approx(2e-3)


def test_time_placed_plan_reaches_the_final_size_at_its_share_of_the_budget():
    """32:32@60%: the final size from 60% of the budget, the stages before sharing [0, 60%] by image side, and no
    stage per epoch."""
    plan = CurriculumPlan.parse("32:32@60%", final=224)
    assert plan.timed and [s.image_size for s in plan.stages()] == [32, 64, 96, 128, 160, 192, 224]
    starts = plan.starts
    assert starts[0] == 0 and starts[-1] == pytest.approx(0.6)
    # the stages before the final share [0, 60%] in proportion to their image side
    spans = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert spans == pytest.approx([0.6 * side / sum(range(32, 224, 32)) for side in range(32, 224, 32)])
    assert plan.stage_at_fraction(0.0) == 0 and plan.stage_at_fraction(0.599) == 5
    assert plan.stage_at_fraction(0.6) == 6 and plan.stage_at_fraction(1.0) == 6
    assert [s.starts_at for s in plan.stages()] == pytest.approx(list(starts), abs=1e-6)
    assert all(s.first_epoch is None for s in plan.stages())
    with pytest.raises(PlanError, match="no stage per epoch"):
        plan.stage_at(3)


@pytest.mark.parametrize(("text", "needle"), [("32:32@0%", "within the budget"), ("32:32@100%", "within the budget"),
                                              ("32:32@soon", "START:STEP@SHARE"), ("32@60%", "START:STEP@SHARE"),
                                              ("40:32@50%", "multiple of the patch size")])
def test_bad_time_placed_plans_are_refused(text, needle):
    """Each malformed time-form plan raises a PlanError with its message."""
    with pytest.raises(PlanError, match=needle):
        CurriculumPlan.parse(text, final=224)


def test_a_bad_time_placed_plan_exits_2_naming_the_flag(capsys, tmp_path):
    """vit-train --curriculum 32:32@120%: exit 2, one line naming --curriculum, no run folder."""
    from trainer.cli import main

    assert main(["--data", "demo", "--curriculum", "32:32@120%", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vit-train: error: --curriculum") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
