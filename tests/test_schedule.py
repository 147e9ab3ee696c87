"""train.learning_rate, value by value: linear warm-up over min(--warmup-steps, 10% of the steps) steps, then
linear decay that reaches 0 only after the last step (the last step still learns)."""
from types import SimpleNamespace

import pytest

import train


def schedule(total, warmup_steps, lr=1.0):
    run = SimpleNamespace(total_steps=total, opts=SimpleNamespace(lr=lr, warmup_steps=warmup_steps))
    return [train.learning_rate(run, step) for step in range(total)]


@pytest.mark.parametrize("total,warmup_steps,want", [
    # warm-up capped at 10% of 20 = 2 steps: 1/2, then (20 - step) / 18 from step 1 on
    (20, 5, {0: 1 / 2, 1: 1.0, 2: 1.0, 3: 17 / 18, 10: 10 / 18, 18: 2 / 18, 19: 1 / 18}),
    # warm-up of 3 steps (under the cap of 10): 1/3, 2/3, 1, then (100 - step) / 97
    (100, 3, {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 97 / 97, 4: 96 / 97, 50: 50 / 97, 98: 2 / 97, 99: 1 / 97}),
    # --warmup-steps 100 on 100 steps: capped at 10
    (100, 100, {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 11: 89 / 90, 99: 1 / 90}),
    # a 3-step run: warm-up of 1 step, so step 0 is at the peak
    (3, 10, {0: 1.0, 1: 1.0, 2: 1 / 2}),
    # --warmup-steps 0 still warms up over 1 step (step 0 at the peak); the last step gets 1/total
    (10, 0, {0: 1.0, 1: 1.0, 5: 5 / 9, 9: 1 / 9}),
])
def test_schedule_values(total, warmup_steps, want):
    got = schedule(total, warmup_steps, lr=2e-4)
    for step, factor in want.items():
        assert got[step] == pytest.approx(2e-4 * factor, rel=1e-12, abs=0), step
    assert all(v > 0 for v in got)                      # no step, first or last, is wasted at lr 0
    peak = got.index(max(got))
    assert all(a <= b for a, b in zip(got[:peak], got[1:peak + 1]))     # rises, then
    assert all(a >= b for a, b in zip(got[peak:], got[peak + 1:]))      # falls


def test_metrics_record_the_schedule(tmp_path):
    """The lr each metrics.jsonl line records is the schedule's value for that step (steps count from 1 there)."""
    import json
    out = train.main(["--out", str(tmp_path / "run"), "--max-steps", "12", "--warmup-steps", "4"])
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 12 steps: warm-up capped at 1 (12 // 10), decay (12 - step) / 11 from step 0 on; the default run's lr 3e-3
    assert lrs == pytest.approx([3e-3 * min(step + 1, (12 - step) / 11) for step in range(12)], rel=1e-12)
