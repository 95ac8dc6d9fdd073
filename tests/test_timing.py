"""Timing logic on a fake clock: exact, so the test cannot be flaky."""

from __future__ import annotations

import pytest
import torch

from harness import timing


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def perf_counter(self) -> float:
        return self.now

    def fn(self, name: str, seconds: float):
        def call(x: torch.Tensor) -> None:
            self.calls.append(name)
            self.now += seconds * len(x)

        return call


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake.perf_counter)
    return fake


def test_speedup_is_ratio_of_medians(clock: FakeClock) -> None:
    cfg = timing.TimingConfig(warmup=1, rounds=5, min_block_s=0.01)
    out = timing.compare(
        clock.fn("cand", 0.001), clock.fn("ref", 0.004), lambda b: torch.zeros(b, 3), [1, 10], cfg
    )
    assert out["lat/b1_ms"] == pytest.approx(1.0)
    assert out["ref/b1_ms"] == pytest.approx(4.0)
    assert out["speedup/b1"] == pytest.approx(4.0)
    assert out["lat/b10_ms"] == pytest.approx(10.0)
    assert out["lat/b10_iqr_ms"] == pytest.approx(0.0)


def test_blocks_alternate_between_candidate_and_reference(clock: FakeClock) -> None:
    cfg = timing.TimingConfig(warmup=0, rounds=3, min_block_s=0.0)
    timing.interleaved({"a": clock.fn("a", 1.0), "b": clock.fn("b", 1.0)}, torch.zeros(1), cfg)
    timed = clock.calls[2:]  # after one calibration call each
    assert timed == ["a", "b"] * 3


def test_block_size_grows_until_min_time(clock: FakeClock) -> None:
    number = timing._calls_for(clock.fn("a", 0.001), torch.zeros(1), 0.01)
    assert number == 16  # 1, 2, 4, 8 calls are under 10 ms; 16 calls take 16 ms


def test_bad_rounds_rejected() -> None:
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved({"a": lambda x: x}, torch.zeros(1), timing.TimingConfig(rounds=0))


def test_warmup_stops_after_a_second_of_calls(clock: FakeClock) -> None:
    """Slow references (seconds per call at batch 1000) warm up once, fast ones fully."""
    cfg = timing.TimingConfig(warmup=3, rounds=1, min_block_s=0.0)
    timing.interleaved(
        {"slow": clock.fn("slow", 2.0), "fast": clock.fn("fast", 0.001)}, torch.zeros(1), cfg
    )
    assert clock.calls[:4] == ["slow", "fast", "fast", "fast"]
