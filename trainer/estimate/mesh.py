"""The device mesh the scale planner lays a run on, the GPU's figures, and one collective's time.

A mesh is (replicate R, shard S, tensor T) over R S T GPUs, tensor innermost as trainer's mesh is
built: rank = (r S + s) T + t. A tensor group is T consecutive ranks, inside one node (T divides
--gpus-per-node); a shard group is S ranks T apart; a replicate group R ranks S T apart.
parallel=fsdp takes any mesh (R > 1: HSDP, FSDP-sharded within S, replicated across R; T > 1:
tensor + sequence parallel inside each FSDP rank), parallel=none only (1, 1, T), and ddp / zero1-3
only (1, N, 1): their data-parallel ranks are the shard dimension.

Ring model of a collective over n ranks of a tensor of `size` bytes (the gathered / reduced tensor):

    all-gather, reduce-scatter   (n - 1) / n x size / bw  +  latency
    all-reduce                   2 (n - 1) / n x size / bw  +  2 latency (a reduce-scatter, then an all-gather)
    latency                      (n - m) x intra_latency + (m - 1) x inter_latency, over m nodes

bw is the bandwidth a rank sends at: --intra-bw inside a node (NVLink 4: 900 GB/s both ways, 450
GB/s each way); for a group spanning nodes with k members in each, NCCL runs one ring per NIC, so
a node boundary carries k x --inter-bw (the members' NICs: 8 x 400 Gb/s a node = 50 GB/s a GPU),
capped by NVLink: min(intra, k x inter). k = 1 (one member a node, e.g. FSDP across nodes under
T = 8) is the plain --inter-bw; a whole-node ring (k = 8) reaches 400 GB/s, the bus bandwidth
nccl-tests reports for H100 nodes with 8 NDR links.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ModelConfig

GIB = 2**30
DATA_PARALLEL = ("ddp", "zero1", "zero2", "zero3")
STRATEGIES = ("none", *DATA_PARALLEL, "fsdp")


@dataclass(frozen=True)
class Gpu:
    """A GPU's datasheet figures the planner reads besides its bf16 peak (trainer.monitor.PEAK_FLOPS)."""

    memory: float  # bytes
    hbm: float  # bytes / s
    fp8: bool  # has FP8 tensor cores (peak 2 x bf16's, dense)


GPUS = {  # name: (what torch.cuda.get_device_name shows, Gpu)
    "H100": ("NVIDIA H100 80GB HBM3", Gpu(80 * GIB, 3.35e12, True)),
    "H200": ("NVIDIA H200", Gpu(141e9, 4.8e12, True)),
    "B200": ("NVIDIA B200", Gpu(180e9, 8.0e12, True)),
    "A100": ("NVIDIA A100-SXM4-80GB", Gpu(80 * GIB, 2.04e12, False)),
}

# Achieved FLOP/s over the datasheet peak, calibrated by `python -m benchmarks.planner_check` on
# torchtitan's Llama 3.1 8B rows on 8 H100s (FSDP, local batch 2 x 8192, per-op selective
# checkpointing): eager bf16, torch.compile, and the block linears under float8 (against the FP8
# peak, 2 x bf16's). Their H100s ran at 500 W with HBM2e: an H100 SXM at 700 W does better.
EFFICIENCY = {"eager": 0.371, "compiled": 0.430, "float8": 0.305}


@dataclass(frozen=True)
class Hardware:
    """What the time model reads: peak and achieved compute, link bandwidths, memory."""

    gpu: str = "H100"
    peak_flops: float = 989e12  # dense bf16, FLOP/s (trainer.monitor.PEAK_FLOPS)
    efficiency: float = EFFICIENCY["eager"]  # achieved / peak on the model's FLOPs (recompute included)
    fp8_efficiency: float = EFFICIENCY["float8"]  # the block linears under float8: achieved / (2 x peak)
    intra_bw: float = 450e9  # bytes / s each way, a GPU inside a node (NVLink 4)
    inter_bw: float = 50e9  # bytes / s each way, a GPU to other nodes (8 x 400 Gb/s a node)
    gpus_per_node: int = 8
    intra_latency: float = 1e-6  # s a ring hop inside a node
    inter_latency: float = 5e-6  # s a ring hop between nodes
    memory: float = 80 * GIB  # bytes a GPU
    hbm: float = 3.35e12  # bytes / s, the optimizer step's bound
    fp8: bool = True


def hardware(gpu: str = "H100", compiled: bool = False, **overrides: float) -> Hardware:
    """The Hardware of a GPU named in GPUS: trainer.monitor's bf16 peak, the efficiency calibrated
    for eager or compiled steps, its memory and HBM bandwidth; `overrides` replace any field (None
    values are left out)."""
    from trainer.monitor import gpu_peak_flops

    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu}: choose one of {', '.join(GPUS)}")
    device_name, spec = GPUS[gpu]
    hw = Hardware(
        gpu=gpu, peak_flops=gpu_peak_flops(device_name), memory=spec.memory, hbm=spec.hbm, fp8=spec.fp8,
        efficiency=EFFICIENCY["compiled" if compiled else "eager"],
    )  # fmt: skip
    return Hardware(**{**hw.__dict__, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(frozen=True)
class Mesh:
    """One strategy on one (replicate, shard, tensor) mesh."""

    strategy: str
    replicate: int = 1
    shard: int = 1
    tensor: int = 1

    @property
    def gpus(self) -> int:
        return self.replicate * self.shard * self.tensor

    @property
    def data_parallel(self) -> int:
        """Ranks that read different data: R S (a tensor group shares its micro-batch)."""
        return self.replicate * self.shard

    @property
    def label(self) -> str:
        return f"{self.replicate} x {self.shard} x {self.tensor}"

    @property
    def overrides(self) -> str:
        """The mesh as overrides: parallel.replicate / parallel.tensor are the mesh's config keys."""
        out = [f"parallel={self.strategy}"]
        out += [f"parallel.replicate={self.replicate}"] if self.replicate > 1 else []
        out += [f"parallel.tensor={self.tensor}"] if self.tensor > 1 else []
        return " ".join(out)


def tensor_refusal(m: ModelConfig, tensor: int, gpus_per_node: int) -> str | None:
    """Why T = `tensor` cannot shard this model on these nodes, in one line; None when it can."""
    if tensor > gpus_per_node:
        return f"parallel.tensor={tensor} > --gpus-per-node {gpus_per_node}: tensor parallelism stays inside a node"
    if gpus_per_node % tensor:
        return f"parallel.tensor={tensor} does not divide --gpus-per-node {gpus_per_node}: a group would straddle nodes"
    sizes = {
        "n_head": m.n_head, "n_kv_head": m.n_kv_head or m.n_head,
        "intermediate_size": m.intermediate_size or 4 * m.n_embd, "padded vocabulary": m.padded_vocab_size,
    }  # fmt: skip
    if m.n_experts:
        sizes["moe_intermediate_size"] = m.moe_intermediate_size or sizes["intermediate_size"]
    for name, size in sizes.items():
        if size % tensor:
            return f"parallel.tensor={tensor} does not divide model.{name}={size}: its shards would be uneven"
    return None


def mesh_refusal(m: ModelConfig, mesh: Mesh, gpus: int, gpus_per_node: int) -> str | None:
    """Why `mesh` cannot run this model on `gpus` GPUs, in one line; None when it can."""
    if mesh.strategy not in STRATEGIES:
        return f"parallel={mesh.strategy}: the planner knows {', '.join(STRATEGIES)}"
    if min(mesh.replicate, mesh.shard, mesh.tensor) < 1 or mesh.gpus != gpus:
        return f"mesh {mesh.label} is {mesh.gpus} GPUs, not --gpus {gpus}: R x S x T must be the GPU count"
    if mesh.strategy in DATA_PARALLEL and (mesh.replicate > 1 or mesh.tensor > 1):
        return f"parallel={mesh.strategy} has no replicate / tensor dimension: only parallel=fsdp (tensor: also none)"
    if mesh.strategy == "none" and (mesh.replicate > 1 or mesh.shard > 1):
        return "parallel=none runs one copy of the model: only a tensor dimension (mesh 1 x 1 x T)"
    return tensor_refusal(m, mesh.tensor, gpus_per_node) if mesh.tensor > 1 else None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_meshes(
    m: ModelConfig, gpus: int, gpus_per_node: int, strategies: tuple[str, ...] = STRATEGIES
) -> tuple[list[Mesh], list[str]]:
    """Every mesh of `strategies` on `gpus` GPUs: ddp / zero* (1, N, 1), none (1, 1, N) when N fits a
    node, fsdp each (R, S, T) with R S T = N and a T the model and the nodes allow; and one line for
    each tensor degree refused (T a divisor of N; those above a node's GPUs together)."""
    meshes, refused = [], []
    for strategy in strategies:
        if strategy in DATA_PARALLEL and gpus > 1:
            meshes.append(Mesh(strategy, 1, gpus, 1))
        elif strategy == "none" and (gpus == 1 or not tensor_refusal(m, gpus, gpus_per_node)):
            meshes.append(Mesh("none", 1, 1, gpus))
        elif strategy == "fsdp":
            too_big = [str(t) for t in divisors(gpus) if t > gpus_per_node]
            if too_big:  # one line for them all
                refused.append(
                    f"parallel.tensor={', '.join(too_big)} > --gpus-per-node {gpus_per_node}: tensor parallelism "
                    "stays inside a node"
                )
            for tensor in (t for t in divisors(gpus) if t <= gpus_per_node):
                reason = tensor_refusal(m, tensor, gpus_per_node) if tensor > 1 else None
                if reason:
                    refused.append(reason)
                    continue
                for replicate in divisors(gpus // tensor):
                    meshes.append(Mesh("fsdp", replicate, gpus // tensor // replicate, tensor))
    return meshes, refused


def group(mesh: Mesh, dimension: str, gpus_per_node: int) -> tuple[int, int]:
    """(members, members in each node it spans) of one `dimension` group (replicate, shard or
    tensor) of a mesh laid out tensor innermost."""
    size = {"replicate": mesh.replicate, "shard": mesh.shard, "tensor": mesh.tensor}[dimension]
    stride = {"replicate": mesh.shard * mesh.tensor, "shard": mesh.tensor, "tensor": 1}[dimension]
    per_node = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
    return size, per_node


def collective_seconds(kind: str, size: float, members: int, per_node: int, hw: Hardware) -> float:
    """One ring collective's time (the module docstring): `kind` all_gather, reduce_scatter or
    all_reduce of a tensor of `size` bytes (gathered / reduced) over `members` ranks, `per_node` of
    them in each node."""
    if members <= 1 or size <= 0:
        return 0.0
    nodes = -(-members // per_node)
    bandwidth = hw.intra_bw if nodes == 1 else min(hw.intra_bw, per_node * hw.inter_bw)
    latency = (members - nodes) * hw.intra_latency + (nodes - 1) * hw.inter_latency
    one = (members - 1) / members * size / bandwidth + latency
    return 2 * one if kind == "all_reduce" else one


def sent_bytes(kind: str, size: float, members: int) -> float:
    """Bytes each rank sends in one ring collective of a `size`-byte tensor over `members` ranks."""
    if members <= 1:
        return 0.0
    return (2 if kind == "all_reduce" else 1) * (members - 1) / members * size
