"""The deviation meter (dist_ortho.profiling.deviation) measures how far a step's update is from
the exact one: ~0 for an exact strategy, what the schedule's own reference predicts for blockwise,
on real gloo FSDP2 shards; and the exact-or-not study asks for it explicitly (off by default)."""

from __future__ import annotations

import functools

import pytest
import torch

from dist_ortho.core.schema import ConfigError
from dist_ortho.profiling.deviation import DeviationMeter, deviation, summarize_deviation
from dist_ortho.studies.convergence.exact_or_not import ExactOrNotConfig, Schedule
from dist_ortho.testing.processes import spawn
from tests.strategies import inexact_cases


@functools.lru_cache(maxsize=None)
def measured() -> list[dict]:
    return spawn(inexact_cases.deviation_worker, 2, timeout_s=300)


def test_deviation_of_an_update_to_itself_is_zero_and_to_its_negative_cosine_minus_one():
    u = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert deviation(u, u) == (0.0, pytest.approx(1.0))
    rel, cos = deviation(-u, u)
    assert rel == pytest.approx(2.0) and cos == pytest.approx(-1.0)
    assert deviation(2 * u, u) == (pytest.approx(1.0), pytest.approx(1.0))


def test_exact_strategy_measures_the_float_floor_p2():
    rows = measured()[0]["balanced"]
    assert len(rows) == 2 * 8  # two steps, every matrix
    assert max(r["rel_frobenius"] for r in rows) < 1e-5, rows


def test_blockwise_deviation_equals_its_own_reference_prediction_p2():
    out = measured()[0]
    step0 = {r["matrix"]: r for r in out["blockwise"] if r["step"] == 0}
    for name, (rel, cos) in out["predicted_blockwise"].items():
        assert step0[name]["rel_frobenius"] == pytest.approx(rel, rel=1e-3, abs=1e-5), name
        assert step0[name]["cosine"] == pytest.approx(cos, rel=1e-4, abs=1e-5), name
    # matrices split over both ranks deviate; the one-row matrix sits on one rank: exact
    assert summarize_deviation(out["blockwise"])["rel_worst"] > 0.1
    assert step0["w3"]["rel_frobenius"] < 1e-5


def test_local_norms_deviates_less_than_blockwise_but_measurably_p2():
    out = measured()[0]
    local, block = summarize_deviation(out["local_norms"]), summarize_deviation(out["blockwise"])
    assert 1e-4 < local["rel_median"] < block["rel_median"], (local, block)
    assert measured()[1]["balanced"] == [], "rank 0 keeps the rows"


def test_meter_measures_only_every_kth_step_and_refuses_bad_every():
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        DeviationMeter([], every=0)
    meter = DeviationMeter([], every=3)
    meter.before_step(1)
    meter.after_step()
    assert meter.rows == []


def test_study_measures_deviation_only_when_asked_and_refuses_an_inexact_reference():
    assert ExactOrNotConfig().deviation is False
    config = ExactOrNotConfig(schedules=[Schedule("blockwise")], exact=Schedule("blockwise"))
    with pytest.raises(ConfigError, match="inexact schedule"):
        config.check("study")
    config = ExactOrNotConfig(schedules=[Schedule("blockwise")], exact_candidates=["periodic"])
    with pytest.raises(ConfigError, match="not an exact strategy"):
        config.check("study")
