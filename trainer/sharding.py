"""TorchRec distribution of a `RecModel`: the planner's sharding plan for the embedding tables,
fused embedding optimizers applied in backward, AdamW for the dense part, one CombinedOptimizer.

Dense and sparse parameters are updated in the same step (the paper's fully synchronous
training): the fused optimizer updates the embedding rows during backward, the dense optimizer
on `step()`, both before the next batch's forward.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from longer.recmodel import RecModel

from .config import TrainConfig
from .distributed import DistContext


class TrainModule(nn.Module):
    """What the pipeline runs: (loss, (loss, logits, labels)) for a batch, bf16 optionally."""

    def __init__(self, model: RecModel, device_type: str, bf16: bool = False):
        super().__init__()
        self.model = model
        self.device_type, self.bf16 = device_type, bf16

    def forward(self, batch):
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(batch)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


class DenseOptimizer(KeyedOptimizerWrapper):
    """AdamW over the dense parameters, clipping their global gradient norm before each step."""

    def __init__(self, params: dict[str, torch.Tensor], cfg: TrainConfig):
        super().__init__(params, lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay))
        self.clip = cfg.grad_clip

    def step(self, closure=None):
        if self.clip > 0:
            grads = [p for p in self.params.values() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.clip)
        return super().step(closure)

    def set_lr(self, lr: float) -> None:
        for g in self.param_groups:
            g["lr"] = lr


def _constraints(cfg: TrainConfig, model: RecModel) -> dict[str, ParameterConstraints] | None:
    if cfg.sharding == "auto":
        return None
    kind = {"row_wise": ShardingType.ROW_WISE, "table_wise": ShardingType.TABLE_WISE}[cfg.sharding].value
    return {t: ParameterConstraints(sharding_types=[kind]) for t in model.spec.tables()}


def shard(
    model: RecModel, cfg: TrainConfig, ctx: DistContext
) -> tuple[DistributedModelParallel, CombinedOptimizer, DenseOptimizer, ShardingPlan]:
    emb_opt = RowWiseAdagrad if cfg.emb_optimizer == "rowwise_adagrad" else torch.optim.Adam
    apply_optimizer_in_backward(emb_opt, model.embedding.ec.parameters(), {"lr": cfg.emb_lr})
    sharders = [EmbeddingCollectionSharder()]
    module = TrainModule(model, ctx.device.type, bf16=cfg.bf16)
    topology = TopologyFactory.create_topology(
        TrainerConfig(
            world_size=ctx.world_size,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)),
        ),
        kernel_config=KernelConfig(compute_device=ctx.device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=_constraints(cfg, model),
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=module, device=ctx.device, plan=plan, sharders=sharders)
    dense = DenseOptimizer(dict(in_backward_optimizer_filter(dmp.named_parameters())), cfg)
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), dense, plan


def plan_table(plan: ShardingPlan) -> str:
    """The plan as text: one line per (table, shard)."""
    lines = []
    for module, params in plan.plan.items():
        for table, p in params.items():
            shards = p.sharding_spec.shards if p.sharding_spec is not None else []
            where = ", ".join(
                f"rank {s.placement.rank()} rows {s.shard_offsets[0]}..{s.shard_offsets[0] + s.shard_sizes[0] - 1}"
                for s in shards
            ) or str(p.ranks)
            lines.append(f"{module}.{table}: {p.sharding_type} ({p.compute_kernel}) → {where}")
    return "\n".join(lines)
