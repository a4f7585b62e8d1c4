"""`local_norms` (INEXACT): exact Newton-Schulz, but NorMuon's Frobenius rescale from each rank's
own rows only.

NS runs exactly as in `balanced` (LPT owners, one all-to-all each way), so O = NS(U) is exact. The
update rule is then told to take its global statistics from the local shard alone
(`Strategy.global_statistics = False`): NorMuon's two Frobenius norms f = ||O||_F and ||O_hat||_F
are the norms of this rank's rows, with no all-reduce, so each shard's update is rescaled to its own
norm and the result depends on the world size. This is dion's NorMuon ("the existing distributed
approximation"), offered to measure its price, never as a default. The row-wise parts (v, the row
division) are local in the exact rule too; a 3-D stack sharded by whole matrices is unaffected.
Muon has no global statistic, so under Muon this schedule gives Muon's exact update.

Its own definition, the test oracle: `dist_ortho.optim.inexact_reference.local_norms_update`.
1-D layouts only: on a 2-D/3-D mesh the rule's row group is not the parameter's shard group.
"""

from __future__ import annotations

from dist_ortho.strategies.balanced import Balanced, BalancedOptions
from dist_ortho.strategies.registry import register

__all__ = ["LocalNorms"]


@register
class LocalNorms(Balanced):
    name = "local_norms"
    Options = BalancedOptions
    exact = False
    global_statistics = False
    on_mesh = False
