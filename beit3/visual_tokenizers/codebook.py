"""The normalized codebook of VQ-KD: unit code vectors matched by cosine, updated by exponential moving averages of
the vectors each code wins, started by k-means on the first batch, with codes that stop winning restarted; its
statistics are summed over the processes of a distributed run."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cosine_kmeans(vectors: torch.Tensor, clusters: int, iters: int) -> torch.Tensor:
    """k-means with cosine similarity on unit vectors (N, D) -> (clusters, D) unit centres.

    Starts from a random sample (with repetition when N < clusters); a centre that wins no vector
    keeps its place.
    """
    n = vectors.shape[0]
    start = (
        torch.randperm(n, device=vectors.device)[:clusters]
        if n >= clusters
        else torch.randint(n, (clusters,), device=vectors.device)
    )
    centres = vectors[start]
    for _ in range(iters):
        assign = (vectors @ centres.t()).argmax(-1)
        counts = torch.bincount(assign, minlength=clusters)
        sums = torch.zeros_like(centres).index_add_(0, assign, vectors)
        centres = torch.where((counts > 0).unsqueeze(1), F.normalize(sums, dim=-1), centres)
    return centres


def outside_autocast(device: torch.device):
    """A context with autocast off on ``device``; nothing on a device autocast does not know (``meta``)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class NormEMACodebook(nn.Module):
    """K unit vectors; a vector's code is the one of highest cosine similarity.

    Training (``forward`` in train mode) updates the codebook by EMA instead of gradients: the unit
    mean of the vectors each code won is blended in with weight 1 - decay, and the result is
    re-normalized; codes that won nothing keep their vector. Counts and sums are all-reduced across
    ranks, and every random choice (k-means, restarts) is made on rank 0 and broadcast, so all
    ranks keep the same codebook. ``lookup`` never changes any state.

    Buffers: ``codebook`` (K, D); ``initted`` (False until k-means ran); ``usage`` (K,), an EMA of
    per-step counts; ``unused_steps`` (K,), training steps since each code last won a vector.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        decay: float = 0.99,
        kmeans_iters: int = 10,
        dead_code_steps: int = 0,
        commitment_weight: float = 1.0,
    ):
        super().__init__()
        self.size, self.dim, self.decay = size, dim, decay
        self.kmeans_iters, self.dead_code_steps, self.commitment_weight = (
            kmeans_iters,
            dead_code_steps,
            commitment_weight,
        )
        # Random unit vectors rather than BEiT v2's zeros: k-means replaces them at the first training
        # batch anyway, and an untrained tokenizer then still spreads images over many codes.
        self.register_buffer("codebook", F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("initted", torch.tensor(kmeans_iters == 0))
        self.register_buffer("usage", torch.zeros(size))
        self.register_buffer("unused_steps", torch.zeros(size, dtype=torch.long))

    def lookup(self, z: torch.Tensor) -> torch.LongTensor:
        """(..., D) unit vectors -> (...) ids of the nearest codes (max cosine = min Euclidean distance for unit vectors)."""
        # Outside autocast: a bf16 similarity would flip near ties between codes.
        with outside_autocast(z.device):
            return (z @ self.codebook.t().to(z.dtype)).argmax(-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor, torch.Tensor]:
        """(B, N, D) unit vectors -> (straight-through codes (B, N, D), commitment loss, ids (B, N), counts (K,)).

        In training the counts are summed over ranks; the codebook used for this batch's codes is
        the one from before this batch's update.
        """
        flat = z.reshape(-1, self.dim)
        if self.training and not self.initted:
            self._kmeans_init(flat.detach())
        indices = self.lookup(flat)
        codes = self.codebook[indices].to(z.dtype).view_as(z)
        counts = torch.bincount(indices, minlength=self.size).to(self.codebook.dtype)
        if self.training:
            counts = self._ema_update(flat.detach(), indices, counts)
        loss = self.commitment_weight * F.mse_loss(z, codes.detach())
        straight_through = z + (codes - z).detach()
        return straight_through, loss, indices.view(z.shape[:-1]), counts

    @torch.no_grad()
    def _kmeans_init(self, vectors: torch.Tensor) -> None:
        centres = cosine_kmeans(vectors.to(self.codebook.dtype), self.size, self.kmeans_iters)
        if _distributed():
            dist.broadcast(centres, src=0)
        self.codebook.copy_(centres)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, vectors: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        vectors = vectors.to(self.codebook.dtype)
        sums = torch.zeros_like(self.codebook).index_add_(0, indices, vectors)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        won = (counts > 0).unsqueeze(1)
        # The unit mean of a code's vectors is its normalized sum.
        target = torch.where(won, F.normalize(sums, dim=-1), self.codebook)
        self.codebook.copy_(F.normalize(self.decay * self.codebook + (1 - self.decay) * target, dim=-1))
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.dead_code_steps > 0:
            self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
            self._restart_dead_codes(vectors)
        return counts

    @torch.no_grad()
    def _restart_dead_codes(self, vectors: torch.Tensor) -> None:
        dead = (self.unused_steps >= self.dead_code_steps).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        n, device = vectors.shape[0], vectors.device
        pick = (
            torch.randperm(n, device=device)[: dead.numel()]
            if n >= dead.numel()
            else torch.randint(n, (dead.numel(),), device=device)
        )
        fresh = vectors[pick]
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.codebook[dead] = fresh
        self.unused_steps[dead] = 0
        # A fresh code starts with the average usage, so the statistic does not flag it dead at once.
        self.usage[dead] = self.usage.mean()
