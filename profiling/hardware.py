"""Hardware presets for the cost model: data-sheet figures plus the assumptions that turn them into
achievable rates. Every number here is either a vendor data-sheet figure (labelled "data sheet") or
an assumption of ours (labelled "assumption"); none was measured on the hardware it describes.

What the cost model needs from a cluster of GPUs, per GPU:
- link bandwidth, one direction: NVLink inside a node, the InfiniBand NIC between nodes;
- per-step latency of a collective (one ring hop, one peer of an all-to-all);
- dense matmul throughput in the Newton-Schulz dtype, and the fraction of it that NS reaches;
- HBM bandwidth, for the optimizer's element-wise work on its local shard.

`HardwarePreset.constants(world_size)` folds the two-level network into one alpha-beta model for a
given world size:
- ring collectives (all-gather, reduce-scatter, all-reduce, broadcast): within one node the ring
  runs on NVLink; as soon as it spans nodes every ring crosses node boundaries, and each GPU's
  share of the ring traffic goes through its own NIC, so the NIC sets the bandwidth.
- pairwise collectives (all-to-all, gather, scatter): with uniform peers a fraction
  f = (P - G) / (P - 1) of a rank's bytes leave the node (G GPUs per node). NVLink and the NIC carry
  their parts at the same time, so the time is the slower of the two parts.
Achievable bandwidth is the line rate times `link_efficiency` (assumption: 0.8, about what
nccl-tests report as bus bandwidth on such systems).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_ortho.profiling.timemodel import CommModel, ComputeModel, CostConstants

__all__ = ["HardwarePreset", "HARDWARE_PRESETS", "get_preset", "RING_KINDS", "PAIRWISE_KINDS"]

RING_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")
PAIRWISE_KINDS = ("all_to_all", "gather", "scatter")

GB = 1e9


@dataclass(frozen=True)
class HardwarePreset:
    """One GPU model in a multi-node cluster. Units: bytes/s, seconds, FLOP/s, bytes."""

    name: str
    description: str
    gpus_per_node: int
    intra_node_bytes_per_s: float  # NVLink, per GPU, per direction (data sheet)
    inter_node_bytes_per_s: float  # NIC per GPU, per direction (data sheet)
    peak_flops: dict  # dense matmul FLOP/s by NS dtype name (data sheet)
    hbm_bytes_per_s: float  # (data sheet)
    memory_bytes: float  # HBM capacity (data sheet)
    ns_efficiency: float = 0.5  # assumption: fraction of peak that batched NS matmuls sustain
    link_efficiency: float = 0.8  # assumption: achievable fraction of link line rate
    intra_node_latency_s: float = 3e-6  # assumption: one ring hop over NVLink, NCCL
    inter_node_latency_s: float = 8e-6  # assumption: one ring hop over InfiniBand
    intra_node_peer_s: float = 1e-6  # assumption: issue cost per peer of a grouped send/recv
    inter_node_peer_s: float = 2e-6
    # assumption: bytes of HBM traffic per local element in momentum + normalize + apply (about
    # twenty float32 reads/writes: the lerps, the float cast, square/mean, divide, scale, update)
    elementwise_bytes_per_element: float = 80.0
    sources: str = ""

    def __post_init__(self) -> None:
        for name in ("intra_node_bytes_per_s", "inter_node_bytes_per_s", "hbm_bytes_per_s",
                     "memory_bytes", "ns_efficiency", "link_efficiency"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HardwarePreset.{name} must be a positive number, got {value!r}")
        if self.ns_efficiency > 1 or self.link_efficiency > 1:
            raise ValueError("efficiencies are fractions of peak and must be <= 1")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be a positive int, got {self.gpus_per_node!r}")

    def ns_flops_per_s(self, ns_dtype: str) -> float:
        if ns_dtype not in self.peak_flops:
            raise ValueError(f"hardware preset {self.name!r} has no peak rate for ns dtype "
                             f"{ns_dtype!r}; known: {sorted(self.peak_flops)}")
        return self.peak_flops[ns_dtype] * self.ns_efficiency

    def off_node_fraction(self, world_size: int) -> float:
        """Share of a rank's peer bytes that leave its node when peers are spread uniformly."""
        G = self.gpus_per_node
        if world_size <= G:
            return 0.0
        return (world_size - G) / (world_size - 1)

    def constants(self, world_size: int, ns_dtype: str = "bfloat16") -> CostConstants:
        """The alpha-beta and compute constants for one optimizer spanning `world_size` GPUs."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        intra = self.intra_node_bytes_per_s * self.link_efficiency
        inter = self.inter_node_bytes_per_s * self.link_efficiency
        multi_node = world_size > self.gpus_per_node
        f = self.off_node_fraction(world_size)
        alpha, beta = {}, {}
        for kind in RING_KINDS:
            beta[kind] = 1.0 / (inter if multi_node else intra)
            alpha[kind] = self.inter_node_latency_s if multi_node else self.intra_node_latency_s
        for kind in PAIRWISE_KINDS:
            beta[kind] = max(f / inter, (1.0 - f) / intra)
            alpha[kind] = self.inter_node_peer_s if multi_node else self.intra_node_peer_s
        # a node-aware exchange's messages: each on its own link, at that link's per-peer cost
        comm = CommModel(alpha_s=alpha, beta_s_per_byte=beta,
                         link_alpha_s={"intra_node": self.intra_node_peer_s,
                                       "inter_node": self.inter_node_peer_s},
                         link_beta_s_per_byte={"intra_node": 1.0 / intra,
                                               "inter_node": 1.0 / inter})
        compute = ComputeModel(
            ns_flops_per_s=self.ns_flops_per_s(ns_dtype),
            ns_call_s=10e-6,  # assumption: a few kernel launches per NS call
            elementwise_s_per_element=self.elementwise_bytes_per_element / self.hbm_bytes_per_s,
            elementwise_s_per_param=30e-6,  # assumption: ~15 small kernel launches per parameter
            shared_slots=None)
        return CostConstants(comm=comm, compute=compute,
                             source=f"preset {self.name} (data sheet + assumptions), P={world_size}",
                             world_size=world_size, device="cuda")


_H100_SOURCES = ("NVIDIA H100 Tensor Core GPU data sheet (SXM5): BF16 dense 989 TFLOP/s (1979 with "
                 "sparsity), FP32 67 TFLOP/s, HBM3 3.35 TB/s, 80 GB, NVLink 4 900 GB/s total = 450 "
                 "GB/s per direction; ConnectX-7 InfiniBand NDR 400 Gb/s = 50 GB/s per direction, "
                 "one NIC per GPU as in DGX H100.")

HARDWARE_PRESETS: dict[str, HardwarePreset] = {
    "h100": HardwarePreset(
        name="h100",
        description="H100 SXM5, 8 GPUs per node on NVLink 4, one 400 Gb/s NDR NIC per GPU",
        gpus_per_node=8,
        intra_node_bytes_per_s=450 * GB,
        inter_node_bytes_per_s=50 * GB,
        peak_flops={"bfloat16": 989e12, "float32": 67e12},
        hbm_bytes_per_s=3.35e12,
        memory_bytes=80e9,
        sources=_H100_SOURCES),
    "h200": HardwarePreset(
        name="h200",
        description="H200 SXM, 8 GPUs per node on NVLink 4, one 400 Gb/s NDR NIC per GPU",
        gpus_per_node=8,
        intra_node_bytes_per_s=450 * GB,
        inter_node_bytes_per_s=50 * GB,
        peak_flops={"bfloat16": 989e12, "float32": 67e12},
        hbm_bytes_per_s=4.8e12,
        memory_bytes=141e9,
        sources=("NVIDIA H200 data sheet (SXM): same tensor cores as H100 (BF16 dense 989 "
                 "TFLOP/s), HBM3e 4.8 TB/s, 141 GB, NVLink 4 900 GB/s total; InfiniBand NDR "
                 "400 Gb/s per GPU.")),
}


def get_preset(name: str) -> HardwarePreset:
    if name not in HARDWARE_PRESETS:
        raise ValueError(f"unknown hardware preset {name!r}; available: "
                         f"{', '.join(sorted(HARDWARE_PRESETS))}")
    return HARDWARE_PRESETS[name]
