"""The production estimate of bench/campaign_throughput.py schedules trajectories as the campaign runner
does (its pick_driver rule), so its figure and the measured slice describe the same campaign."""
from __future__ import annotations

import pytest

from al_manager.campaign.runner import pick_driver
from conftest import bench_module


def test_pick_driver_keeps_similar_sizes_together_within_capacity():
    assert pick_driver([[], []], 10, 4) == 0
    assert pick_driver([[10], []], 10, 4) == 0          # same size: the driver that has it
    assert pick_driver([[10], []], 30, 4) == 1          # far in size: the empty one
    assert pick_driver([[10, 10], []], 10, 4) == 1      # full (4 workers / 2 drivers)
    assert pick_driver([[5, 25], [20]], 21, 6) == 1     # nearest mean among those with room
    assert pick_driver([[5, 35], [21]], 20, 6) == 0     # a tie in distance: the one with more


def test_estimate_is_the_closed_form_for_equal_blocks_and_the_busiest_driver_otherwise():
    bench = bench_module("campaign_throughput")
    cost = {"A": 1e-3, "B": 3e-3}
    sizes = {"A": 10, "B": 30}
    # 8 equal trajectories, 2 drivers, all at once: steps x cost x 8 / (efficiency x 2)
    assert bench.estimate_seconds(["A"] * 8, 100, cost, 0.5, 2, 8, sizes) == pytest.approx(100 * 1e-3 * 8 / 1.0)
    # two blocks of unequal cost at once: the B driver's block sets the time, not the mean of both
    t = bench.estimate_seconds(["A", "A", "B", "B"], 100, cost, 1.0, 2, 4, sizes)
    assert t == pytest.approx(100 * 2 * 3e-3)
    assert t > 100 * (2 * 1e-3 + 2 * 3e-3) / 2
    # a queue longer than the workers: a finished trajectory's place goes to the next in line
    t = bench.estimate_seconds(["A"] * 4, 100, cost, 1.0, 1, 2, sizes)
    assert t == pytest.approx(2 * (100 * 2 * 1e-3))
