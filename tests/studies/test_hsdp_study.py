"""The HSDP study path: `train.replicate` (a 2-D replicate x shard mesh for FSDP2) and
`optimizer.replicas` (spread | repeat) as config fields, checked before launch, and a 2x2 study
whose report puts each strategy's spread and repeat steps side by side with intervals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from dist_ortho import models
from dist_ortho.cli import main as cli_main
from dist_ortho.optim.param_groups import build_optimizers
from dist_ortho.studies.config import (Config, ConfigError, apply_overrides, config_from_dict,
                                       config_hash)
from dist_ortho.studies.preflight import check_launch
from dist_ortho.studies.sweep import expand, load_study

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "launch" / "configs" / "hsdp_study.yaml"


@pytest.mark.parametrize("overrides,key,phrase", [
    ({"optimizer.replicas": "share"}, "optimizer.replicas", "spread, repeat"),
    ({"train.replicate": 0}, "train.replicate", ">= 1"),
    ({"train.replicate": 1.5}, "train.replicate", "integer"),
])
def test_bad_hsdp_values_name_their_key(overrides, key, phrase):
    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides({}, overrides))
    assert str(info.value).startswith(f"{key}:") and phrase in str(info.value)


def test_replicate_must_divide_the_world_before_launch():
    config = config_from_dict(apply_overrides({}, {"train.replicate": 3}))
    with pytest.raises(ConfigError, match=r"^train\.replicate: 3 does not divide the world size "
                                          r"4; use a divisor"):
        check_launch(config, 4)
    check_launch(config_from_dict(apply_overrides({}, {"train.replicate": 2})), 4)


def test_new_fields_keep_old_hashes_at_their_defaults_and_count_otherwise():
    base = config_hash(Config())
    assert base == "512e37a67e80"  # the pin of tests/studies/test_run_config.py
    for overrides in ({"train.replicate": 2}, {"optimizer.replicas": "repeat"}):
        assert config_hash(config_from_dict(apply_overrides({}, overrides))) != base
    explicit = {"train.replicate": 1, "optimizer.replicas": "spread"}
    assert config_hash(config_from_dict(apply_overrides({}, explicit))) == base


def test_optimizer_config_reaches_the_matrix_optimizer():
    model = models.build_model("gpt-tiny", device="cpu", dtype=torch.float32)
    config = config_from_dict(apply_overrides({}, {"optimizer.replicas": "repeat"})).optimizer
    assert build_optimizers(model, config).optimizers[0].replicas == "repeat"
    # an explicit keyword still wins (build_optimizers' existing callers)
    assert build_optimizers(model, config, replicas="spread").optimizers[0].replicas == "spread"


def test_hsdp_study_is_one_interleaved_job_of_spread_repeat_pairs():
    jobs = expand(load_study(STUDY), "cpu")
    assert [j.world_size for j in jobs] == [4]
    points = jobs[0].settings["points"]
    modes = {p["strategy_label"]: p["config"]["optimizer"]["replicas"] for p in points}
    names = ["balanced", "allgather_scatter", "round_robin", "bucketed_async"]
    assert modes == {f"{n}-{m}": m for n in names for m in ("spread", "repeat")}
    assert all(p["config"]["train"]["replicate"] == 2 for p in points)


def _study(tmp_path: Path, strategies: list) -> Path:
    data = yaml.safe_load(STUDY.read_text())
    data.update(base=str(STUDY.parent / data["base"]), output_dir=str(tmp_path / "out"),
                point_timeout_s=300)
    data["schedule"].update(repeats=2, steps=2, calibration_repeats=1)
    data["grid"]["strategies"] = strategies
    path = tmp_path / "hsdp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_bad_mode_in_a_strategy_entry_fails_before_launch(tmp_path):
    path = _study(tmp_path, [{"name": "balanced", "label": "b",
                              "set": {"optimizer.replicas": "both"}}])
    with pytest.raises(ConfigError, match=r"^optimizer\.replicas: replicas must be one of spread, repeat"):
        expand(load_study(path), "cpu")


@pytest.mark.slow
def test_2x2_hsdp_study_reports_spread_and_repeat_side_by_side(tmp_path):
    """P = 4 as 2 x 2, two strategies in both modes, one interleaved job; the report's HSDP table
    has a row per strategy with both modes' step times and the paired ratio, each with an
    interval; spread's run.json plans bytes on the replicate axis, repeat's none."""
    strategies = [{"name": n, "label": f"{n}-{m}", "set": {"optimizer.replicas": m}}
                  for n in ("balanced", "round_robin") for m in ("spread", "repeat")]
    path = _study(tmp_path, strategies)
    assert cli_main(["study", str(path), "-o", str(tmp_path / "o")]) == 0
    root = tmp_path / "o" / "hsdp_study"
    md = (root / "report.md").read_text()
    section = md.split("## HSDP replicas: spread vs repeat", 1)[1].split("\n## ", 1)[0]
    iv = r"[\d.]+ \[[\d.]+, [\d.]+\]"
    for name in ("balanced", "round_robin"):
        row = next(line for line in section.splitlines() if f"| {name} |" in line)
        assert re.search(rf"\| 2x2 \| {name} \| {iv} \| {iv} \| {iv} \|", row), row
    for name in ("balanced", "round_robin"):
        facts = {m: json.loads((root / "runs" / f"transformer-small--{name}-{m}--p4" /
                                "run.json").read_text()) for m in ("spread", "repeat")}
        assert facts["spread"]["mesh"] == {"shape": [2, 2], "axes": ["replicate", "shard"],
                                           "replicas": "spread"}
        on_replicate = [sum(s for k, (s, _) in rank.items() if "replicate" in k.split("@")[1])
                        for rank in facts["spread"]["planned_bytes_by_axis"]]
        assert len(on_replicate) == 4 and all(b > 0 for b in on_replicate)
        assert not any("@replicate" in k for rank in facts["repeat"]["planned_bytes_by_axis"]
                       for k in rank if "all_to_all" in k)
