"""Images per forward pass chosen by measured throughput, within the memory cap."""

from __future__ import annotations

from app.ingest.stages import ForwardSizer


def test_the_sizer_tries_one_and_the_cap_then_keeps_the_faster() -> None:
    sizer = ForwardSizer()
    seen = []
    while True:
        size = sizer.step(3)
        if len(seen) > 40:
            break
        seen.append(size)
        # one image per pass: 40 images/s; three per pass: 30 images/s
        sizer.record(size, images=size, seconds=size / (40.0 if size == 1 else 30.0))
    trial_one, rest = seen[: ForwardSizer.TRIAL_IMAGES], seen[ForwardSizer.TRIAL_IMAGES :]
    assert set(trial_one) == {1}
    assert rest[: ForwardSizer.TRIAL_IMAGES // 3] == [3] * (ForwardSizer.TRIAL_IMAGES // 3)
    assert sizer.step(3) == 1  # measured faster


def test_the_sizer_keeps_the_cap_when_batches_are_faster() -> None:
    sizer = ForwardSizer()
    for _ in range(100):
        size = sizer.step(8)
        sizer.record(size, images=size, seconds=size / (10.0 if size == 1 else 50.0))
    assert sizer.step(8) == 8
    assert ForwardSizer().step(1) == 1  # nothing to choose
