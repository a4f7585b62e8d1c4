"""Orthogonalization strategies for NorMuon/Muon under FSDP2: a registry of names to builders.

    strategies.available()                     -> ['allgather_scatter', 'balanced', ...]
    strategies.build("bucketed_async", bucket_bytes=2**24)

Each strategy lives in its own file with a typed options dataclass and registers itself
(`@register`); see `strategies.base` for the plan/execute contract and `dist_ortho.core.plan` for
the byte convention. Adding a strategy: a new file, and one import line below.
"""

from __future__ import annotations

from dist_ortho.core.plan import EVERY_RANK, CommItem, Plan, RankCost
from dist_ortho.strategies.allgather_scatter import (AllGatherScatter,  # noqa: E402
                                                     AllGatherScatterOptions)
from dist_ortho.strategies.balanced import Balanced  # noqa: E402
from dist_ortho.strategies.balanced import BalancedOptions
from dist_ortho.strategies.base import ExecContext, Strategy
from dist_ortho.strategies.blockwise import Blockwise  # noqa: E402
from dist_ortho.strategies.bucketed_async import BucketedAsync  # noqa: E402
from dist_ortho.strategies.bucketed_async import BucketedAsyncOptions
from dist_ortho.strategies.local_norms import LocalNorms  # noqa: E402
from dist_ortho.strategies.megabatch import Megabatch  # noqa: E402
from dist_ortho.strategies.megabatch import MegabatchOptions
from dist_ortho.strategies.overlapped import Overlapped  # noqa: E402
from dist_ortho.strategies.overlapped import OverlappedOptions
from dist_ortho.strategies.periodic import Periodic  # noqa: E402
from dist_ortho.strategies.registry import (available, available_exact, build, options_class,
                                            register)
# one line per strategy: importing its file registers it
from dist_ortho.strategies.replicated import Replicated  # noqa: E402
from dist_ortho.strategies.replicated import ReplicatedOptions
from dist_ortho.strategies.round_robin import RoundRobin  # noqa: E402
from dist_ortho.strategies.round_robin import RoundRobinOptions
from dist_ortho.strategies.split_ns import SplitNS  # noqa: E402
from dist_ortho.strategies.split_ns import SplitNSOptions

__all__ = ["available", "available_exact", "build", "register", "Strategy", "Plan", "RankCost", "CommItem",
           "ExecContext", "EVERY_RANK", "options_class", "ReplicatedOptions", "RoundRobinOptions",
           "AllGatherScatterOptions", "BucketedAsyncOptions", "BalancedOptions", "Replicated",
           "RoundRobin", "AllGatherScatter", "BucketedAsync", "Balanced", "Overlapped",
           "OverlappedOptions"]
