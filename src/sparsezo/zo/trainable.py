"""The trainable set: one contiguous fp32 master vector θ over all masked entries.

Why fp32: ZO updates (lr × g × z) are far below bf16 resolution, so they must accumulate in a
full-precision copy. θ is cheap when the set is sparse (0.1% of 7B = 26 MB). Before each
forward the relevant slice of θ is cast to the compute dtype and written into the weights;
entries outside the mask are never read or written.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import SparseZOError
from ..masks import Mask


CHUNK = 1 << 22  # θ entries processed at once (bounds temporaries in full ZO)


class TrainableParams:
    """fp32 master θ plus the map from θ ranges to (tensor, flat indices)."""

    def __init__(self, model: nn.Module, mask: Mask):
        targets = mask.check_model(model)
        dtypes = {t.dtype for t, _ in targets.values()}
        if len(dtypes) != 1:
            raise SparseZOError(f"trainable tensors have mixed dtypes {sorted(map(str, dtypes))}; load the model in one dtype")
        self.dtype = dtypes.pop()
        self.mask = mask
        # θ follows model order (check_model's), the same for a mask computed on the model, read back
        # from its file (JSON headers sort keys) or built into a 4-bit model, so checkpoints,
        # trajectories and noise positions never depend on how the mask was obtained.
        self.names = list(targets)
        # storage: the tensor holding each masked tensor's trainable entries (a dense weight, or a
        # 4-bit layer's exact-values vector); indices: flat positions in it, None = all of it.
        self.storage = [targets[n][0] for n in self.names]
        self.indices = [None if i is None else i.to(t.device) for t, i in (targets[n] for n in self.names)]
        sizes = [t.numel() if i is None else i.numel() for t, i in zip(self.storage, self.indices)]
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        device = self.storage[0].device
        self.theta = torch.empty(self.offsets[-1], dtype=torch.float32, device=device)
        with torch.no_grad():
            for k, (t, i) in enumerate(zip(self.storage, self.indices)):
                flat = t.reshape(-1)
                self.theta[self.offsets[k] : self.offsets[k + 1]] = flat.float() if i is None else flat[i].float()

    @property
    def numel(self) -> int:
        return self.theta.numel()

    def blocks(self) -> Iterator[tuple[int, int]]:
        """θ in chunks of ``CHUNK`` entries (one chunk for any sparse set up to 4 M entries)."""
        for s in range(0, self.numel, CHUNK):
            yield s, min(self.numel, s + CHUNK)

    def _spans(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(tensor k, first, last) of its trainable entries that θ[start:end] covers, in order."""
        first = bisect.bisect_right(self.offsets, start) - 1  # tensors overlapping [start, end) only
        for k in range(max(first, 0), len(self.storage)):
            if self.offsets[k] >= end:
                break
            lo, hi = max(start, self.offsets[k]), min(end, self.offsets[k + 1])
            if lo < hi:
                yield k, lo - self.offsets[k], hi - self.offsets[k]

    @torch.no_grad()
    def write(self, values: torch.Tensor, start: int = 0) -> None:
        """Cast ``values`` (= new θ[start:start+len]) to the compute dtype and store them in the weights."""
        for k, a, b in self._spans(start, start + values.numel()):
            flat, idx = self.storage[k].view(-1), self.indices[k]
            v = values[self.offsets[k] + a - start : self.offsets[k] + b - start]
            if idx is None:  # copy_ casts on the fly: one pass, no compute-dtype temporary
                flat[a:b].copy_(v)
            else:
                flat.index_copy_(0, idx[a:b], v.to(self.dtype))

    @torch.no_grad()
    def read(self, start: int, end: int) -> torch.Tensor:
        """What the weights hold now for θ[start:end], in the compute dtype (the inverse of ``write``)."""
        parts = []
        for k, a, b in self._spans(start, end):
            flat, idx = self.storage[k].view(-1), self.indices[k]
            parts.append(flat[a:b] if idx is None else flat[idx[a:b]])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def restore(self) -> None:
        """Write the unperturbed θ back: weights become exactly cast(θ) again."""
        for s, e in self.blocks():
            self.write(self.theta[s:e], s)

    def rounded(self, values: torch.Tensor) -> torch.Tensor:
        """What the weights will actually hold for ``values``: cast to the compute dtype and back."""
        return values.to(self.dtype).float()

    def state(self) -> dict[str, torch.Tensor]:
        """θ as per-tensor values (for deltas): {name: values} in mask order."""
        return {n: self.theta[self.offsets[k] : self.offsets[k + 1]] for k, n in enumerate(self.names)}

    def load_values(self, values: dict[str, torch.Tensor]) -> None:
        """Set θ from per-tensor values and write them into the model."""
        for k, n in enumerate(self.names):
            v = values[n].reshape(-1)
            if v.numel() != self.offsets[k + 1] - self.offsets[k]:
                raise SparseZOError(f"values for {n} have {v.numel()} entries, the mask selects {self.offsets[k + 1] - self.offsets[k]}")
            self.theta[self.offsets[k] : self.offsets[k + 1]] = v.to(self.theta)
        self.restore()
