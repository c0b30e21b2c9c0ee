"""PPO on several processes: the reductions, gradient averaging, the checks every process decides
together, weight digests and per-process seeds.

Data parallel without a wrapper: every process draws its own prompts (a disjoint slice of the
step's prompts) and samples with its own seed, then trains on its own rollout; gradients are
averaged across processes before each optimizer step, so the processes, started from the same
initial adapters, hold the same weights throughout. Whitening uses the statistics of all the
processes' batches (advantages.masked_moments with `sum_across_processes`), metrics are averaged,
the KL controller sees the global KL, and only the main process writes files. DDP cannot wrap the
model: the policy and the value are two adapters of one module, trained by separate backward
passes (see trainer.ppo_update), and DDP expects one forward and one backward per step. The
collectives are accelerate's (gloo on CPUs, NCCL on GPUs).

With one process every function here is the identity or a no-op (ONE_PROCESS, seed offset 0).
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

RANK_SEED_STRIDE = 100003  # per-process seed = seed + rank * stride (docs/ppo.md §21)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python, NumPy and torch with this process's seed (seed + rank · RANK_SEED_STRIDE: every
    process samples differently, reproducibly); returns it."""
    process_seed = seed + rank * RANK_SEED_STRIDE
    random.seed(process_seed)
    np.random.seed(process_seed % (2**32))
    torch.manual_seed(process_seed)
    return process_seed


def sum_across_processes(t: torch.Tensor) -> torch.Tensor:
    from accelerate.utils import reduce

    return reduce(t, reduction="sum")


def mean_across_processes(t: torch.Tensor) -> torch.Tensor:
    from accelerate.utils import reduce

    return reduce(t, reduction="mean")


@dataclass(frozen=True)
class Agreement:
    """This process's place among the processes of a run, for the checks they must decide together.

    A process that raised alone (e.g. on a NaN only it saw) would leave the others waiting forever
    in their next collective (gradient averaging, whitening); so every finiteness check is summed
    over the processes first, and all of them raise, at the same point, or none does."""

    rank: int = 0
    world: int = 1
    sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None  # needed when world > 1

    def nonfinite(self, values: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """For each named tensor, the ranks of the processes where it holds NaN or inf (all processes
        get the same answer; one small all-reduce when world > 1)."""
        device = next(iter(values.values())).device
        flags = torch.zeros((len(values), self.world), dtype=torch.float32, device=device)
        for i, value in enumerate(values.values()):
            flags[i, self.rank] = 0.0 if bool(torch.isfinite(value).all()) else 1.0
        if self.world > 1:
            flags = self.sum_across(flags)
        return {name: [r for r in range(self.world) if flags[i, r] > 0] for i, name in enumerate(values)}

    def where(self, ranks: list[int]) -> str:
        """'' for one process, else ' on process 1 of 2' (for messages every process prints alike)."""
        if self.world == 1:
            return ""
        return f" on process{'es' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {self.world}"


ONE_PROCESS = Agreement()


class GradientAverager:
    """Average the gradients of groups of parameters across processes after each backward pass.

    ppo_update accumulates gradients over micro-batches, one backward per adapter (or one joint
    backward with value_head_on_policy), then clips and steps. A post-accumulate-grad hook on each
    parameter notes its arrival; when the last parameter of a group has its gradient, the group's
    gradients are averaged in one flat all-reduce. Averaging after every backward equals averaging
    once before clipping, because the mean is linear: mean_r(ḡ + g_r) = ḡ + mean_r(g_r) for an
    already averaged ḡ; so clipping and the step see the same averaged gradient on every process.
    An optimizer step with a group half-arrived is a bug (a parameter outside the graph) and raises."""

    def __init__(self, groups: list[list[torch.nn.Parameter]], optimizer,
                 mean_across: Callable[[torch.Tensor], torch.Tensor] = mean_across_processes):
        self.mean_across = mean_across
        self.groups = [list(g) for g in groups if g]
        self.arrived: list[set[int]] = [set() for _ in self.groups]
        self.handles = []
        for gi, group in enumerate(self.groups):
            for p in group:
                self.handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._arrive, gi)))
        self.handles.append(optimizer.register_step_pre_hook(self._check_complete))

    def _arrive(self, gi: int, param: torch.nn.Parameter) -> None:
        self.arrived[gi].add(id(param))
        if len(self.arrived[gi]) == len(self.groups[gi]):
            self.arrived[gi].clear()
            self.average(self.groups[gi])

    def average(self, params: list[torch.nn.Parameter]) -> None:
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        with torch.no_grad():
            for grads in buckets.values():
                flat = self.mean_across(torch.cat([g.reshape(-1) for g in grads]))
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    def _check_complete(self, optimizer, args, kwargs) -> None:
        waiting = sum(len(a) for a in self.arrived)
        if waiting:
            raise RuntimeError(f"{waiting} parameters received gradients that were not averaged across processes "
                               "(their group did not complete a backward pass)")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def average_metrics(metrics: dict[str, float], mean_across: Callable[[torch.Tensor], torch.Tensor],
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Every metric averaged over the processes (exact for per-response means: every process has the
    same number of responses; a mean of per-process means for per-token ones)."""
    names = list(metrics)
    values = mean_across(torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64, device=device))
    return dict(zip(names, values.tolist()))


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named CPU tensors (checkpoint.trainable_state): equal on every process of a
    data-parallel run, so comparing digests checks the gradient averaging."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
