"""Shared by the expert-parallel tests (test_parallel, test_grad_sync, test_checkpoint_sharding).

Each of those modules runs its scenarios once, in one pair of spawned processes (gloo over
loopback, rendezvous through a FileStore in a temporary directory; tests/support/distributed.py), because
starting processes that import torch is the slow part; each scenario records its own result or
traceback so that each test fails on its own.

Reference: every rank also builds the single-process model from the same seed and runs it on the
FULL batch (the union of the ranks' halves); the EP model on 2 ranks must match it. Routing is the
same token by token (capacity_factor=None and router_centering=False, so neither capacity dropping
nor the batch-mean logit centre depends on how the batch is split; balance="bias", whose bias does
not enter the loss, where the aux loss's product of batch means would differ between halves and
the whole).

Shape suffixes used in comments:
    B  sequences in the full batch (BATCH)
    L  sequence length (SEQ)
    V  vocabulary
"""

import copy
import datetime

import torch
import torch.nn.functional as F

from tests.unit.workers.moe.test_model import tiny_config as model_tiny_config
from workers.moe.groups import ParallelGroups
from workers.moe.model import ModelConfig, MoETransformer
from workers.moe.parallel import apply_expert_parallel

WORLD_SIZE = 2
# Collectives fail instead of hanging past this; the parent kills the ranks after its own limit.
COLLECTIVE_TIMEOUT_S = 60
RANKS_JOIN_TIMEOUT_S = 150
# Losses (~3.5) and forward outputs (~1) from computations that differ only in summation order.
LOSS_ATOL = 1e-5
BATCH = 4  # sequences in the full batch; each of the 2 ranks takes half
SEQ = 12


def tiny_config(**overrides) -> ModelConfig:
    """test_model's tiny model, with routing that does not depend on how the batch is split."""
    base = dict(vocab_size=32, capacity_factor=None, router_centering=False, balance="bias")
    return model_tiny_config(**(base | overrides))


def collective_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)


def full_batch(step: int) -> torch.Tensor:
    """The full batch of a step, the same on every rank: (B, L + 1) token ids."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 32, (BATCH, SEQ + 1), generator=gen)


def half(x: torch.Tensor, rank: int) -> torch.Tensor:
    per_rank = x.shape[0] // WORLD_SIZE
    return x[rank * per_rank : (rank + 1) * per_rank]  # (B / 2, L + 1)


def lm_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])  # (b, L, V)
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


def models(groups: ParallelGroups, seed: int = 0) -> tuple[MoETransformer, MoETransformer]:
    """(single-process reference, EP copy of it) from one seeded init."""
    torch.manual_seed(seed)
    ref = MoETransformer(tiny_config())
    model = copy.deepcopy(ref)
    apply_expert_parallel(model, groups.ep_group)
    return ref, model
