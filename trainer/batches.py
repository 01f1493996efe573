"""From the loader to the device: worker processes, pinned batches, padding and caption dropout on the device,
logging values kept on the device, and one rank's data error stopping every rank.

- `LoaderFeed`: a `torch.utils.data.DataLoader` over `PlanStream`. Every worker runs the cheap sequential
  plan (trainer/data.py) and collates only its own share of batches (batch i goes to worker i mod W); the
  DataLoader hands batches back in order, so the batches are the same for any number of workers (0 = in
  this process). Each batch carries the loader state right after it; the feed keeps the state of the last
  batch handed out, which is what a checkpoint saves.
- `device_inputs`: non_blocking copies of the pinned batch, then padding (`index_copy_` into zeros, mask from
  the lengths) and caption dropout on the device; the dropout draws stay on the CPU generator, so a run is
  the same on any device.
- `StepStats`: loss, per-timestep-bin losses and grad norm summed on the device; `drain()` reads them with one
  copy to the host (log and checkpoint steps only), and checks that every step's loss was finite.
- `RankAgreement`: with DDP, the ranks agree after every batch fetch (a one-element all_reduce on a gloo group)
  that all of them have data; if one has a data error every rank stops with its message, instead of the
  others waiting forever in the gradient all_reduce.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from contract.errors import PrxError
from trainer.config import TrainConfig
from trainer.data import Batch, DataError, DataSpec, MixtureLoader
from trainer.metrics import BIN_NAMES, TIMESTEP_BINS
from trainer.objective import caption_dropout


@dataclass
class LoaderFailure:
    """A data error in a worker, handed to the training process as a value (one clean message)."""
    message: str


@dataclass
class LoaderSettings:
    """What a rank's batches depend on: `MixtureLoader`'s arguments, named as TrainConfig's options, whose
    defaults these are (the loader's own, written once in trainer/data.py)."""
    batch_size: int
    seed: int = TrainConfig.seed
    rank: int = 0
    text_max_length: int = TrainConfig.text_max_length
    open_shards: int = TrainConfig.open_shards
    shuffle_buffer: int = TrainConfig.shuffle_buffer

    @classmethod
    def of(cls, cfg: TrainConfig, **given: int) -> LoaderSettings:
        """The config's values of the fields named alike; `given` (rank, or another batch size or seed) wins."""
        named = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        return cls(**{**named, **given})

    def loader(self, spec: DataSpec) -> MixtureLoader:
        return MixtureLoader(spec, **dataclasses.asdict(self))


class PlanStream(IterableDataset):
    """Batches from `state` on: worker w of W collates batches w, w + W, ... of the one plan."""

    def __init__(self, spec: DataSpec, settings: LoaderSettings, state: dict[str, Any] | None):
        self.spec, self.settings, self.state = spec, settings, state

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        loader = self.settings.loader(self.spec)
        try:
            if self.state is not None:
                loader.load_state(self.state)
            i = 0
            while True:
                items = loader.next_plan()
                if i % workers == worker:
                    batch = loader.collate(items)
                    batch.state = loader.state()
                    yield batch
                i += 1
        except (DataError, PrxError, ValueError) as exc:
            yield LoaderFailure(str(exc))


class LoaderFeed:
    """The training process's end of the loader: `next()` batches in order, `state()` for checkpoints."""

    def __init__(self, spec: DataSpec, settings: LoaderSettings, state: dict[str, Any] | None = None,
                 workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
        self._state = state if state is not None else settings.loader(spec).state()
        # its own generator: the DataLoader seeds workers from it, not from (and not advancing) torch's global RNG
        self._loader = DataLoader(PlanStream(spec, settings, state), batch_size=None, num_workers=workers,
                                  pin_memory=pin_memory, prefetch_factor=prefetch if workers > 0 else None,
                                  generator=torch.Generator().manual_seed(settings.seed))
        self._it = None

    def next(self) -> Batch:
        if self._it is None:
            self._it = iter(self._loader)
        got = next(self._it)
        if isinstance(got, LoaderFailure):
            self.close()
            raise DataError(got.message)
        self._state = got.state
        return got

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


# ------------------------------------------------------------------------------------------- device side
def device_inputs(batch: Batch, device: torch.device, empty_emb: torch.Tensor, empty_mask: torch.Tensor,
                  dropout: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, embeddings padded to text_len, mask) on `device`, caption dropout applied there.
    `empty_emb` / `empty_mask`: the empty prompt padded to text_len, already on `device`."""
    non_blocking = device.type == "cuda"
    x0 = batch.x0.to(device, non_blocking=non_blocking)
    emb, mask = batch.padded(device, non_blocking=non_blocking)
    emb, mask, _ = caption_dropout(emb, mask, empty_emb, empty_mask, dropout, generator)
    return x0, emb, mask


class StepStats:
    """Logging values accumulated on the device; `drain()` is the only host sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self._bounds = torch.tensor(TIMESTEP_BINS, dtype=torch.float32, device=device)
        self._reset()

    def _reset(self):
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=self.device)  # noqa: E731
        self.step_loss = z(())
        self.losses: list[torch.Tensor] = []
        self.bin_sum, self.bin_n = z(len(BIN_NAMES)), z(len(BIN_NAMES))
        self.grad_norm = z(())

    def add_micro(self, per_sample: torch.Tensor, t: torch.Tensor, grad_accum: int,
                  loss: torch.Tensor | None = None) -> None:
        """One micro-batch: its per-sample flow losses (for the timestep bins) and the loss it trained on
        (default their mean; with REPA the total)."""
        per = per_sample.detach().float()
        t = t.to(per.device, non_blocking=True).float()
        self.step_loss = self.step_loss + (per.mean() if loss is None else loss.detach().float()) / grad_accum
        sel = ((t.unsqueeze(1) >= self._bounds[:, 0]) & (t.unsqueeze(1) < self._bounds[:, 1])).float()  # B x bins
        self.bin_sum += (per.unsqueeze(1) * sel).sum(0)
        self.bin_n += sel.sum(0)

    def end_step(self, grad_norm: torch.Tensor | float) -> torch.Tensor:
        """Close the step; returns its loss (a device tensor)."""
        loss, self.step_loss = self.step_loss, torch.zeros((), device=self.device)
        self.losses.append(loss)
        self.grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32).to(self.device)
        return loss

    def drain(self, first_step: int) -> tuple[list[float], dict[str, tuple[float, int]], float]:
        """(losses of the steps since the last drain, {bin: (sum, count)}, last grad norm); one copy to the host.
        Raises FloatingPointError naming the first step whose loss is not finite."""
        n = len(self.losses)
        flat = torch.cat([torch.stack(self.losses) if n else self.bin_sum[:0], self.bin_sum, self.bin_n,
                          self.grad_norm.view(1)]).cpu().tolist()
        losses, k = flat[:n], len(BIN_NAMES)
        bins = {name: (flat[n + i], int(flat[n + k + i])) for i, name in enumerate(BIN_NAMES)}
        grad_norm = flat[-1]
        self._reset()
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                raise FloatingPointError(f"step {first_step + i + 1}: loss is {value}; stopping (last checkpoint "
                                         "kept)")
        return losses, bins, grad_norm


# ------------------------------------------------------------------------------------------- DDP
class RankAgreement:
    """Every rank learns, after each fetch, whether some rank failed to get its batch; then all stop with the
    failing ranks' messages."""

    MAX_BYTES = 2048

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.group = rank, world, None
        if world > 1:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")  # a CPU flag: no device sync

    def fetch(self, fn: Callable[[], Any]) -> Any:
        try:
            out, err = fn(), ""
        except (DataError, PrxError) as exc:
            out, err = None, str(exc)
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([1 if err else 0], dtype=torch.int32)
            dist.all_reduce(flag, group=self.group)
            if int(flag.item()):
                agreed = DataError(self._messages(err))
                agreed.agreed = True  # every rank raises it: the CLI lets every rank print before any exits
                raise agreed
        if err:
            raise DataError(err)
        return out

    def _messages(self, err: str) -> str:
        import torch.distributed as dist

        text = f"rank {self.rank}: {err}".encode("utf-8")[: self.MAX_BYTES] if err else b""
        mine = torch.zeros(self.MAX_BYTES, dtype=torch.uint8)
        mine[: len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        msgs = [bytes(t.tolist()).rstrip(b"\0").decode("utf-8", errors="replace") for t in every]
        return "; ".join(m for m in msgs if m)
