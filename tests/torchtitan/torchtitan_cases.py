"""torchtitan config module and data for the torchtitan tests (tests/torchtitan/test_torchtitan_trainer.py).

`cpu_llama3` is launch/torchtitan/llama3_normuon.py's `llama3_debugmodel_normuon` (the documented
example) made small enough for 2 CPU cores: 2 of the debug model's 6 layers, sequences of 64
tokens, float32 parameters (no bf16 mixed precision, so 1-rank and N-rank runs compare under a
float32 bound), SDPA attention (tests/torchtitan/torchtitan_shim.py says why), torchtitan's `partial_dtensor`
backend. The run's knobs come from environment variables set by the test (one config function
serves every case); the parallelism degrees and checkpoint settings come from torchtitan's own
command line.

`make_assets(root)`: torchtitan's tests/assets are not in its wheel, so a tokenizer (one token per
word of a 36-word vocabulary) and a dataset of 400 generated lines of 63 words are written under
`root`, deterministic. With bos and eos a line is 65 tokens, exactly one sample of 64: samples
are lines, so the harness (tests/torchtitan/torchtitan_run.py) can hand each rank its rows of every global
batch.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import sys

from tests.torchtitan import torchtitan_shim

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV_ASSETS, ENV_STRATEGY, ENV_BATCH, ENV_NAME = ("DIST_ORTHO_TT_ASSETS", "DIST_ORTHO_TT_STRATEGY",
                                                 "DIST_ORTHO_TT_GLOBAL_BATCH",
                                                 "DIST_ORTHO_TT_OPTIMIZER")
WORDS = ("the a one two red blue small large cat dog bird tree house river stone light runs "
         "jumps sleeps sees finds holds over under near behind before after quickly slowly "
         "and but then because while").split()


DOC_WORDS = 63  # + bos + eos = 65 tokens: one document is exactly one sample of 64 (seq_len)


def _lines(n: int = 400) -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        # a fixed grammar (article adjective noun verb preposition article noun), so the next
        # token is partly predictable and the loss falls within a few steps
        words = []
        while len(words) < DOC_WORDS:
            words += [rng.choice(WORDS[:2]), rng.choice(WORDS[2:6]), rng.choice(WORDS[6:14]),
                      rng.choice(WORDS[14:18]), rng.choice(WORDS[18:24]), rng.choice(WORDS[:2]),
                      rng.choice(WORDS[6:14]), rng.choice(WORDS[24:])]
        out.append(" ".join(words[:DOC_WORDS]))
    return out


def make_assets(root: str | os.PathLike) -> pathlib.Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = pathlib.Path(root)
    tok_dir, data_dir = root / "tokenizer", root / "data"
    tok_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "train.jsonl", "w") as f:
        for line in _lines():
            f.write(json.dumps({"text": line}) + "\n")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))  # one word, one token
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": specials[0], "eos_token": specials[1], "add_bos_token": True,
         "add_eos_token": True}))
    return root


def cpu_llama3():
    sys.path.insert(0, str(ROOT))  # the example lives in launch/, outside the package
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
    from torchtitan.models.llama3 import model_registry

    from dist_ortho.integrations.torchtitan import optimizers_config
    from launch.torchtitan.llama3_normuon import llama3_debugmodel_normuon

    config = llama3_debugmodel_normuon()
    spec = model_registry("debugmodel")
    spec.model.layers = spec.model.layers[:2]
    torchtitan_shim.cpu_attention(spec.model)
    config.model_spec = spec
    assets = pathlib.Path(os.environ[ENV_ASSETS])
    config.hf_assets_path = str(assets / "tokenizer")
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset="c4_test",
                                                         dataset_path=str(assets / "data"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = next((int(a.split("=")[1]) for a in sys.argv
               if a.startswith("--parallelism.tensor_parallel_degree=")), 1)
    global_batch = int(os.environ[ENV_BATCH])
    config.training.local_batch_size = global_batch // (world // tp)
    config.training.seq_len = 64
    config.training.steps = 4
    config.training.mixed_precision_param = "float32"
    config.training.max_norm = 1.0  # torchtitan's default: the clipped path is the one tested
    config.parallelism.spmd_backend = "partial_dtensor"
    config.parallelism.pipeline_parallel_degree = 1
    config.validator.enable = False
    config.debug.seed = 0
    config.debug.deterministic = True
    config.metrics.log_freq = 1
    config.dump_folder = str(assets / "outputs")
    config.optimizer = optimizers_config(
        name=os.environ.get(ENV_NAME, "NorMuon"),
        strategy=os.environ.get(ENV_STRATEGY, "balanced"), lr=0.02, adamw_lr=3e-3,
        weight_decay=0.0, adamw_weight_decay=0.0, ns_dtype="float32")
    return config
