"""torchtitan config functions that train llama3 with NorMuon (dist_ortho) instead of AdamW.

Run from the repository root (torchtitan's `--module` takes this file's dotted path):

    torchrun --nproc_per_node 8 -m torchtitan.train \
        --module launch.torchtitan.llama3_normuon --config llama3_debugmodel_normuon

The only change to torchtitan's own config is `config.optimizer`: hidden matrices go to NorMuon
with the chosen strategy, embeddings, the output head, norms and biases to AdamW (see
dist_ortho.integrations.torchtitan). Every other setting (parallelism, data, checkpointing) is
torchtitan's and can be overridden on its command line as usual, e.g.
`--parallelism.tensor_parallel_degree 2`.
"""

from torchtitan.models.llama3.config_registry import llama3_8b, llama3_debugmodel

from dist_ortho.integrations.torchtitan import optimizers_config


def llama3_debugmodel_normuon():
    config = llama3_debugmodel()
    config.optimizer = optimizers_config(name="NorMuon", strategy="balanced", lr=0.02,
                                         adamw_lr=8e-4, weight_decay=0.0)
    return config


def llama3_8b_normuon():
    config = llama3_8b()
    # NorMuon's lr is per update of unit RMS scale; AdamW keeps torchtitan's own lr
    config.optimizer = optimizers_config(name="NorMuon", strategy="overlapped", lr=0.02,
                                         adamw_lr=3e-4, weight_decay=0.1)
    return config
