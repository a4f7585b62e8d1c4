"""Run configs: strict loading (every mistake names its key), overrides, resolution, hashing."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_ortho.studies.config import (Config, ConfigError, apply_overrides, config_from_dict,
                                       config_hash, dump_config, load_config, parse_overrides,
                                       resolve)

CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"

# (overrides, key the error must name, a phrase of the message)
INVALID = [
    ({"optimizer.lr": -0.1}, "optimizer.lr", ">= 0"),
    ({"optimizer.lr": float("nan")}, "optimizer.lr", "finite"),
    ({"optimizer.lr": "fast"}, "optimizer.lr", "must be a number"),
    ({"optimizer.momentum": 1.0}, "optimizer.momentum", "[0, 1)"),
    ({"optimizer.beta2": -0.5}, "optimizer.beta2", "[0, 1)"),
    ({"optimizer.adamw_betas": [0.9, 1.0]}, "optimizer.adamw_betas[1]", "[0, 1)"),
    ({"optimizer.adamw_betas": [0.9]}, "optimizer.adamw_betas", "list of 2"),
    ({"optimizer.weight_decay": -1}, "optimizer.weight_decay", ">= 0"),
    ({"optimizer.nesterov": "yes"}, "optimizer.nesterov", "true or false"),
    ({"optimizer.ns_steps": 0}, "optimizer.ns_steps", ">= 1"),
    ({"optimizer.ns_dtype": "float16"}, "optimizer.ns_dtype", "auto, float32, bfloat16"),
    ({"optimizer.ns_coefficients": "newton"}, "optimizer.ns_coefficients", "polar_express"),
    ({"optimizer.name": "sgd"}, "optimizer.name", "muon, normuon, adamw"),
    ({"optimizer.ns_form": "fast"}, "optimizer.ns_form", "standard, gram"),
    ({"optimizer.rule_hparams": {"beta3": 0.9}}, "optimizer.rule_hparams.beta3", "normuon"),
    ({"model.preset": "gpt-huge"}, "model.preset", "available"),
    ({"model.num_layers": 0}, "model.num_layers", ">= 1"),
    ({"model.dtype": "float16"}, "model.dtype", "float32, bfloat16"),
    ({"strategy.name": "magic"}, "strategy.name", "available"),
    ({"strategy.name": "bucketed_async", "strategy.options.bucket_size": 4},
     "strategy.options.bucket_size", "known: bucket_bytes"),
    ({"strategy.name": "bucketed_async", "strategy.options.bucket_bytes": -4},
     "strategy.options", "positive integer"),
    ({"train.steps": 0}, "train.steps", ">= 1"),
    ({"train.steps": 2.5}, "train.steps", "integer"),
    ({"train.steps": True}, "train.steps", "integer"),
    ({"train.steps": 5, "train.warmup_steps": 5}, "train.warmup_steps", "at least one step"),
    ({"train.batch_size": 0}, "train.batch_size", ">= 1"),
    ({"train.seq_len": 4096}, "train.seq_len", "exceeds"),
    ({"train.data": "web"}, "train.data", "stdlib, synthetic"),
    ({"train.grad_clip": 0.0}, "train.grad_clip", "null"),
    ({"train.seed": -1}, "train.seed", ">= 0"),
    ({"dist.backend": "mpi"}, "dist.backend", "auto, gloo, nccl"),
    ({"dist.timeout_s": 0}, "dist.timeout_s", "> 0"),
    ({"profiling.memory": "on"}, "profiling.memory", "true or false"),
    ({"profiling.trace_step": 100}, "profiling.trace_step", "train.steps"),
    ({"output.name": "a/b"}, "output.name", "plain file name"),
    ({"checkpoint.every": 10}, "checkpoint.dir", "checkpoint.every"),
    ({"checkpoint.resume": True}, "checkpoint.dir", "resume"),
    ({"checkpoint.dir": "ckpt", "checkpoint.every": -1}, "checkpoint.every", ">= 0"),
]


@pytest.mark.parametrize("overrides,key,phrase", INVALID, ids=[k for _, k, _ in INVALID])
def test_invalid_values_name_their_key(overrides, key, phrase):
    assert len(INVALID) >= 15
    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides({}, overrides))
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert phrase in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("data,key,phrase", [
    ({"optimizer": {"lrr": 0.1}}, "optimizer.lrr", "did you mean 'lr'"),
    ({"optimiser": {"lr": 0.1}}, "optimiser", "did you mean 'optimizer'"),
    ({"train": {"step": 3}}, "train.step", "did you mean 'steps'"),
    ({"train": [1, 2]}, "train", "mapping"),
    ({"strategy": {"options": [1]}}, "strategy.options", "mapping"),
])
def test_unknown_keys_and_bad_shapes(data, key, phrase):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.key == key and phrase in str(info.value)


def test_defaults_and_types():
    c = config_from_dict({"optimizer": {"lr": 1, "adamw_betas": [0.8, 0.9]}})
    assert c.optimizer.lr == 1.0 and isinstance(c.optimizer.lr, float)
    assert c.optimizer.adamw_betas == (0.8, 0.9)
    assert c.train.grad_clip is None and c.strategy.options == {}
    assert config_from_dict(None) == Config()


def test_overrides_parse_as_yaml():
    parsed = parse_overrides(["optimizer.lr=3e-4", "optimizer.adamw_betas=[0.9, 0.99]",
                              "train.grad_clip=null", "optimizer.nesterov=false",
                              "output.name=run-1", "strategy.options.bucket_bytes=4096"])
    assert parsed == {"optimizer.lr": 3e-4, "optimizer.adamw_betas": [0.9, 0.99],
                      "train.grad_clip": None, "optimizer.nesterov": False,
                      "output.name": "run-1", "strategy.options.bucket_bytes": 4096}
    c = load_config(CONFIGS / "tiny.yaml", ["optimizer.lr=3e-4", "strategy.name=bucketed_async",
                                            "strategy.options.bucket_bytes=4096",
                                            "train.steps=7"])
    assert c.optimizer.lr == 3e-4 and c.train.steps == 7
    assert c.strategy.options == {"bucket_bytes": 4096}
    assert c.model.preset == "llama-tiny"  # the file's value survives where not overridden


@pytest.mark.parametrize("item,key", [("optimizer.lrr=1", "optimizer.lrr"),
                                      ("optimizer=1", "optimizer"),
                                      ("nosuch.lr=1", "nosuch"),
                                      ("train.steps.x=1", "train.steps.x"),
                                      ("train.steps=[1", "train.steps")])
def test_bad_overrides_name_their_key(item, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [item])
    assert info.value.key == key


def test_override_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^train\.steps: must be an integer"):
        load_config(None, ["train.steps=many"])


def test_shipped_configs_load():
    for name in ("base.yaml", "tiny.yaml", "llama8b_gpu.yaml"):
        load_config(CONFIGS / name)
    assert load_config(CONFIGS / "base.yaml") == Config()  # base spells out the defaults
    from dist_ortho.studies.sweep import expand, load_study

    for name in ("default_study.yaml", "study.yaml"):
        points = expand(load_study(CONFIGS / name), "cpu")
        assert points and all(p.config.optimizer.ns_dtype == "float32" for p in points)
    # interleaved: one job per world size (1, 2, 4), each holding every model x strategy point
    jobs = expand(load_study(CONFIGS / "default_study.yaml"), "cpu")
    assert [j.world_size for j in jobs] == [1, 2, 4]
    assert [len(j.settings["points"]) for j in jobs] == [16, 16, 16]  # 8 strategies x 2 models


def test_resolve_records_device_choices():
    c = load_config(None)
    cpu, gpu = resolve(c, "cpu"), resolve(c, "cuda")
    assert (cpu.optimizer.ns_dtype, cpu.dist.backend) == ("float32", "gloo")
    assert (gpu.optimizer.ns_dtype, gpu.dist.backend) == ("bfloat16", "nccl")
    assert c.optimizer.ns_dtype == "auto"  # resolve copies
    assert resolve(load_config(None, ["optimizer.ns_dtype=bfloat16"]), "cpu").optimizer.ns_dtype \
        == "bfloat16"  # an explicit choice is kept
    with pytest.raises(ConfigError, match=r"^dist\.backend: nccl needs CUDA"):
        resolve(load_config(None, ["dist.backend=nccl"]), "cpu")


def test_hash_is_stable_and_meaningful():
    a = load_config(CONFIGS / "tiny.yaml")
    assert config_hash(a) == config_hash(load_config(CONFIGS / "tiny.yaml"))
    # key order in the file does not matter; where outputs go does not either
    b = config_from_dict({"train": {"log_every": 1, "warmup_steps": 1, "steps": 3},
                          "optimizer": {"ns_dtype": "float32"}, "model": {"preset": "llama-tiny"},
                          "dist": {"timeout_s": 60}, "output": {"dir": "elsewhere", "name": "x"}})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(CONFIGS / "tiny.yaml", ["optimizer.lr=0.03"]))
    assert len(config_hash(a)) == 12
    # pinned: the digest must not depend on the process (hash salt, dict order); if a schema or
    # default change moves it, old results no longer count as complete, which is intended
    assert config_hash(Config()) == "512e37a67e80"
    # auto resolves to what ran, so resolved configs hash by what actually ran
    auto = load_config(None)
    assert config_hash(resolve(auto, "cpu")) == config_hash(
        resolve(load_config(None, ["optimizer.ns_dtype=float32", "dist.backend=gloo"]), "cpu"))
    assert config_hash(resolve(auto, "cpu")) != config_hash(resolve(auto, "cuda"))


def test_dump_round_trips(tmp_path):
    c = resolve(load_config(CONFIGS / "llama8b_gpu.yaml"), "cuda")
    dump_config(c, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c


def test_optimizer_section_is_the_optimizer_config():
    from dist_ortho.optim.param_groups import OptimizerConfig, SplitConfig

    c = load_config(None, ["optimizer.name=muon", "optimizer.lr=0.05", "optimizer.ns_steps=3",
                           "optimizer.adamw_betas=[0.8, 0.9]", "optimizer.nonfinite=raise",
                           "optimizer.split.matrix_patterns=['*gate*']"])
    oc = c.optimizer  # one definition: what build_optimizers takes, no copy of its fields
    assert type(oc) is OptimizerConfig
    assert (oc.name, oc.lr, oc.ns_steps, oc.adamw_betas, oc.nonfinite) == (
        "muon", 0.05, 3, (0.8, 0.9), "raise")
    assert oc.split == SplitConfig(matrix_patterns=("*gate*",))
    with pytest.raises(ConfigError, match=r"^optimizer\.split\.adamw_patern: unknown key; did "
                                          r"you mean 'adamw_patterns'"):
        load_config(None, ["optimizer.split.adamw_patern=[]"])


def test_testing_aids_are_not_config_keys():
    # the fault and NaN injection of dist_ortho.studies.faults live outside the run config and its
    # hash
    with pytest.raises(ConfigError, match=r"^train\.fault_step: unknown key"):
        load_config(None, ["train.fault_step=1"])
    assert not any("fault" in key or "nan" in key for section in Config().to_dict().values()
                   for key in section)


def test_one_loader_for_every_config_file(tmp_path):
    """Runs, sweep study files and convergence study files report mistakes the same way."""
    from dist_ortho.studies.convergence import load_study as load_convergence
    from dist_ortho.studies.sweep import load_study as load_sweep

    study = tmp_path / "s.yaml"
    study.write_text("name: s\nbase: %s\ngrid: {strategies: all, world_sizes: [1]}\n"
                     "point_timout_s: 3\n" % (CONFIGS / "tiny.yaml"))
    conv = tmp_path / "c.yaml"
    conv.write_text("run: {}\nconvergence: {eval_evry: 3}\n")
    for load, path, key, hint in ((load_sweep, study, "point_timout_s", "point_timeout_s"),
                                  (load_convergence, conv, "convergence.eval_evry", "eval_every")):
        with pytest.raises(ConfigError) as info:
            load(path)
        assert info.value.key == key
        assert str(info.value).startswith(f"{key}: unknown key; did you mean '{hint}'?")
