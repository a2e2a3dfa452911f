"""Single-rank stand-ins for the compression hooks' tests: a comm state with no process group and a
DDP gradient bucket.
"""

import torch

from workers.compression import CommState


class SoloState(CommState):
    """CommState for a group of one without initialising torch.distributed."""

    world_size = 1


class FakeBucket:
    """Duck-typed dist.GradBucket: what the hook calls."""

    def __init__(self, index: int, params: list[torch.Tensor], buffer: torch.Tensor) -> None:
        self._index, self._params, self._buffer = index, params, buffer

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def is_last(self) -> bool:
        return self._index == 0
