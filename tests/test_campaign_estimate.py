"""The production estimate of bench/campaign_throughput.py schedules trajectories as the campaign runner
does (its pick_driver rule), so its figure and the measured slice describe the same campaign."""
from __future__ import annotations

import pytest

from al_manager.campaign.runner import pick_driver, shards
from driver.ipi.batch_server import pass_cost
from conftest import bench_module


def test_pick_driver_keeps_the_busiest_pass_cheapest_within_capacity():
    assert pick_driver([[], []], 10, 4) == 0            # equals: the first
    assert pick_driver([[10], []], 10, 4) == 1          # two passes side by side beat one of twice the work
    assert pick_driver([[10, 10], []], 10, 4) == 1      # full (4 workers / 2 drivers)
    # beside a 40-atom trajectory, a second 40 doubles that driver's pass; a 10 + 40 pair in two calls
    # (pass_cost groups them so) keeps the dearer pass cheaper
    assert pass_cost([10, 40]) < pass_cost([40, 40])
    assert pick_driver([[40], [10]], 40, 4) == 1
    # small ones go where they cost least: padded into the driver of like sizes, not beside the big one
    assert pick_driver([[50], [10, 10]], 10, 6) == 1
    assert pass_cost([]) == 0.0 and pass_cost([5, 5]) < 2 * pass_cost([5])   # one call for both


def test_shards_are_contiguous_blocks_of_nearly_equal_cost():
    from types import SimpleNamespace

    sizes = [70] * 3 + [40] * 3 + [20] * 6 + [10] * 12     # a by-size queue, largest first
    runs = [SimpleNamespace(n_atoms=n) for n in sizes]
    blocks = shards(runs, 2)
    assert [r for b in blocks for r in b] == runs            # contiguous, in queue order, all of them
    cost = [sum(pass_cost([r.n_atoms]) for r in b) for b in blocks]
    assert max(cost) / min(cost) < 1.15                     # equal counts (12 + 12) would be 2.8x apart
    assert len(blocks[0]) < len(blocks[1])
    assert [len(b) for b in shards(runs[:2], 5)] == [1, 1] and shards([], 3) == []


def test_estimate_is_the_closed_form_for_equal_blocks_and_the_busiest_driver_otherwise():
    bench = bench_module("campaign_throughput")
    cost = {"A": 1e-3, "B": 3e-3}
    sizes = {"A": 10, "B": 30}
    # 8 equal trajectories, 2 drivers, all at once: steps x cost x 8 / (efficiency x 2)
    assert bench.estimate_seconds(["A"] * 8, 100, cost, 0.5, 2, 8, sizes) == pytest.approx(100 * 1e-3 * 8 / 1.0)
    # one trajectory per driver, of unequal cost: the B driver sets the time, not the mean of both
    t = bench.estimate_seconds(["B", "A"], 100, cost, 1.0, 2, 2, sizes)
    assert t == pytest.approx(100 * 3e-3)
    assert t > 100 * (1e-3 + 3e-3) / 2
    # four at once: pick_driver pairs each B with an A, not the two Bs together
    assert bench.estimate_seconds(["B", "B", "A", "A"], 100, cost, 1.0, 2, 4, sizes) == pytest.approx(100 * 4e-3)
    # a queue longer than the workers: a finished trajectory's place goes to the next in line
    t = bench.estimate_seconds(["A"] * 4, 100, cost, 1.0, 1, 2, sizes)
    assert t == pytest.approx(2 * (100 * 2 * 1e-3))


def test_model_rate_is_the_estimates_own_rate_for_trajectories_all_running():
    """The efficiency of the estimate is a measured rate over this one: for a set of equal runs started at
    once, estimate_seconds at that efficiency gives back the measured duration."""
    from conftest import shared_file

    shared_file("structures", "pyroxene_N02_GM.xyz")  # skips without ../shared/data
    bench = bench_module("campaign_throughput")
    cost = {"P2": 1e-3}
    assert bench.model_rate(["P2"] * 4, 2, cost) == pytest.approx(2 * 2 / 2e-3)   # 2 drivers x 2 runs per pass
    measured_steps_per_s = 1000.0
    eff = measured_steps_per_s / bench.model_rate(["P2"] * 4, 2, cost)
    t = bench.estimate_seconds(["P2"] * 4, 100, cost, eff, 2, 4, {"P2": 10})
    assert t == pytest.approx(4 * 100 / measured_steps_per_s)
