"""Exact top-k selection over scores that arrive one tensor at a time, in bounded memory.

Score rules (Fisher, magnitude) rank every eligible weight; for a 7B model the scores of all
tensors cannot be held at once (26 GB in fp32). :class:`TopK` takes each tensor's scores as
they are produced, keeps only what can still be selected, and returns the same indices as a
selection over all scores together:

- order: score descending; ties broken by model order of the tensor, then by flat index
  (so the count is exact and the result does not depend on the order tensors arrive in);
- ``global`` scope: a pool of at most ``capacity`` (value, key) pairs, key = tensor position
  << 40 | index. The top-``capacity`` of a union is the top-``capacity`` of the parts' tops, so
  pruning the pool after each tensor is exact. Memory: 12 bytes per kept entry (78 MB for a
  0.1% mask of 7B);
- ``per-tensor`` scope: each tensor's own top-k, taken as it arrives;
- Fisher mass (share of the total score held by the top d) for every d whose top set fits the
  pool, computed from the same pool, so any two computations of the same scores agree exactly;
- device: the ranking runs where the scores are (a GPU's Fisher scores are not copied to the
  host: 26 GB for 7B); the pool lives on the device of the first tensor offered, later tensors'
  candidates join it there, and only the final indices come to the CPU. The selection is exact
  integer/compare work, so it is the same on every device.
"""

from __future__ import annotations

import torch

from ..errors import SparseZOError

_SHIFT = 40  # flat indices below 2**40 (1.1e12 entries per tensor), positions below 2**23


def exact_count(density: float, n: int) -> int:
    """Number of entries a density selects from ``n``: round(density × n), at least 1."""
    if not 0.0 < density <= 1.0:
        raise SparseZOError(f"density {density} is outside (0, 1]; pass e.g. --density 0.001 for 0.1%")
    return max(1, min(n, round(density * n)))


def _top_by_order(values: torch.Tensor, k: int, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (into ``values``) of the top ``k`` under (value desc, key asc), unordered.

    ``keys=None`` means the keys are the positions themselves (one tensor's flat indices).
    """
    n = values.numel()
    if k >= n:
        return torch.arange(n, device=values.device)
    tau = torch.kthvalue(values, n - k + 1).values  # the k-th largest value
    above = (values > tau).nonzero().squeeze(1)
    ties = (values == tau).nonzero().squeeze(1)  # ascending positions
    need = k - above.numel()
    if ties.numel() > need:
        ties = ties[:need] if keys is None else ties[torch.sort(keys[ties], stable=True).indices[:need]]
    return torch.cat([above, ties])


def tensor_top(scores: torch.Tensor, k: int, floor: float | None = None) -> torch.Tensor:
    """Flat indices (unsorted) of the top ``k`` entries of one tensor, ties to the lower index.

    ``floor``: entries below it are known not to be selected (the pool's threshold), so they
    are dropped before the exact selection.
    """
    flat = scores.reshape(-1)
    if floor is None:
        return _top_by_order(flat, k)
    idx = (flat >= floor).nonzero().squeeze(1)
    return idx if idx.numel() <= k else idx[_top_by_order(flat[idx], k)]


class TopK:
    """Streaming exact top-k over named score tensors (see the module docstring)."""

    def __init__(self, sizes: dict[str, int], density: float, scope: str = "global",
                 mass_densities: tuple[float, ...] = (), pool_limit: int = 16 * 2**20):
        if scope not in ("global", "per-tensor"):
            raise SparseZOError(f"unknown scope {scope!r}; choose global or per-tensor")
        self.sizes, self.scope, self.density = dict(sizes), scope, density
        self.pos = {name: i for i, name in enumerate(sizes)}  # model order
        self.total_n = sum(sizes.values())
        self.k = exact_count(density, self.total_n)
        # mass densities whose top set the pool may hold (all when pool_limit allows)
        self.mass_k = {d: exact_count(d, self.total_n) for d in mass_densities}
        self.mass_k = {d: k for d, k in self.mass_k.items() if k <= max(pool_limit, self.k if scope == "global" else 0)}
        self.capacity = max([self.k if scope == "global" else 0, *self.mass_k.values()])
        self._values: list[torch.Tensor] = []  # candidates not merged into the pool yet
        self._keys: list[torch.Tensor] = []
        self._pending = 0
        self._floor: float | None = None  # the pool's capacity-th largest value after the last prune
        self.device: torch.device | None = None  # where the pool lives (that of the first scores offered)
        self.sums: dict[str, float] = {}
        self.per_tensor: dict[str, torch.Tensor] = {}

    def offer(self, name: str, scores: torch.Tensor) -> None:
        """Take one tensor's scores (any shape; fp32 recommended); they may be freed afterwards."""
        if name not in self.pos:
            raise SparseZOError(f"scores for {name}, which is not an eligible tensor")
        if name in self.sums:
            raise SparseZOError(f"scores for {name} were offered twice")
        if scores.numel() != self.sizes[name]:
            raise SparseZOError(f"scores for {name} have {scores.numel()} entries, expected {self.sizes[name]}")
        flat = scores.detach().reshape(-1).float()
        if self.device is None:
            self.device = flat.device
        if not torch.isfinite(flat).all():
            raise SparseZOError(f"scores of {name} are not finite (NaN/inf gradients); check the model and the "
                                "calibration data, or compute the scores in --dtype float32")
        self.sums[name] = flat.double().sum().item()
        if self.scope == "per-tensor":
            self.per_tensor[name] = tensor_top(flat, exact_count(self.density, flat.numel())).sort().values.cpu()
        if self.capacity == 0:
            return
        idx = tensor_top(flat, min(self.capacity, flat.numel()), self._floor)
        self._values.append(flat[idx].to(self.device))
        self._keys.append(idx.to(device=self.device, dtype=torch.int64) | (self.pos[name] << _SHIFT))
        self._pending += idx.numel()
        if self._pending > 2 * self.capacity:  # amortised: merge when twice the pool is waiting
            self._prune()

    def _prune(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge the waiting candidates and keep the top ``capacity`` of them (exact)."""
        values = torch.cat(self._values) if self._values else torch.empty(0, device=self.device)
        keys = torch.cat(self._keys) if self._keys else torch.empty(0, dtype=torch.int64, device=self.device)
        if values.numel() > self.capacity:
            keep = _top_by_order(values, self.capacity, keys)
            values, keys = values[keep], keys[keep]
        if values.numel() >= self.capacity > 0:
            self._floor = values.min().item()
        self._values, self._keys, self._pending = [values], [keys], values.numel()
        return values, keys

    def _sorted_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool in (value desc, key asc) order: independent of the order tensors were offered in."""
        values, keys = self._prune()
        by_key = torch.sort(keys).indices
        vals, keys = values[by_key], keys[by_key]
        by_val = torch.sort(vals, descending=True, stable=True).indices
        return vals[by_val], keys[by_val]

    def _check_complete(self) -> None:
        missing = [n for n in self.sizes if n not in self.sums]
        if missing:
            raise SparseZOError(f"no scores were offered for {missing[:3]} ({len(missing)} tensors)")

    def indices(self) -> dict[str, torch.Tensor]:
        """Sorted flat indices of the selected entries of every tensor, in model order."""
        self._check_complete()
        if self.scope == "per-tensor":
            return {n: self.per_tensor[n] for n in self.sizes}
        _, keys = self._sorted_pool()
        keys = torch.sort(keys[: self.k]).values.cpu()  # the only copy to the host: k indices
        pos, idx = keys >> _SHIFT, keys & ((1 << _SHIFT) - 1)
        counts = torch.bincount(pos, minlength=len(self.sizes)).tolist()
        parts = torch.split(idx, counts)
        return {n: parts[i] for n, i in self.pos.items()}

    def total(self) -> float:
        """Sum of all scores (double precision, summed in model order)."""
        self._check_complete()
        return sum(self.sums[n] for n in self.sizes)

    def mass(self) -> dict[str, float]:
        """Share of the total score held by the top d fraction of entries, for each tracked d."""
        total = self.total()
        if total <= 0:
            raise SparseZOError("all scores are zero; the calibration data produced no gradient")
        vals, _ = self._sorted_pool()
        prefix = vals.double().cumsum(0)
        return {f"{d:g}": prefix[k - 1].item() / total for d, k in sorted(self.mass_k.items())}
