"""Streaming loader over encoded shards: sources and caption variants mixed by weight, deterministically.

Reads shards only through the project's reader (`pipeline.shards.read_shard`) and the encoded-member reader
(`pipeline.encoded`). Nothing here unpickles anything.

Determinism and exact resume
- Every random choice of draw number d (which source, which caption variant) comes from a generator seeded
  by (seed, rank, d), so the n-th draw is the same whatever happened before; a batch's latents are drawn
  from the stored moments with a generator seeded by its first draw.
- Each source is a stream: per epoch a seeded permutation of this rank's shards; inside a shard, windows
  of `shuffle_window` samples are permuted (seeded by epoch, shard and window). A stream's position is
  (epoch, shard, offset), three integers.
- Samples wait in per-bucket queues (one bucket per latent shape C x h x w) until a bucket holds a batch.
  The saved state is: the next draw number n, the earliest draw n0 still waiting, the stream positions just
  before n0, and which draws in [n0, n) were already emitted. Resuming replays draws n0..n-1 (emitted
  ones are only skipped past, not decoded) and lands on exactly the next batch.
- DDP: rank r of W reads shards r, r+W, r+2W, ... of every source (distinct shards per rank).

Caption variants: a sample is trained on one variant drawn with the configured weights among the variants
it has (missing variants' weight renormalised over the rest). Realised per-source and per-variant counts
(of samples actually put in batches) are part of the state and logged.
"""
from __future__ import annotations

import copy
import hashlib
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from pipeline import encoded
from pipeline.shards import BadMember, Problem, list_shards, read_shard
from pipeline.errors import StageError


class DataError(RuntimeError):
    """A shard that cannot be trained on; the message names the shard and what is wrong."""


def seed_for(*parts: Any) -> int:
    """A 63-bit seed from any tuple (stable across processes and Python versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------------- sources
@dataclass
class SourceData:
    name: str
    folder: str
    weight: float
    shards: list[str]          # this rank's shards, in folder order
    info: dict[str, Any]       # encoded.encoded_info(folder)


@dataclass
class DataSpec:
    sources: list[SourceData]
    captions: dict[str, float]
    latent_channels: int
    text_dim: int
    empty_prompt: torch.Tensor  # L x D bfloat16
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)


def _same_model(a: dict, b: dict) -> bool:
    return (a.get("id"), a.get("revision"), a.get("subfolder")) == (b.get("id"), b.get("revision"), b.get("subfolder"))


def open_sources(mixture, vae: str | None = None, text_encoder: str | None = None, rank: int = 0,
                 world: int = 1, with_repa: bool = False) -> DataSpec:
    """Check every source folder (encoded, complete, same encoders) and pick this rank's shards."""
    sources = []
    first = None
    for src in mixture.sources:
        info = encoded.check_encoders(src.folder, vae=vae, text_encoder=text_encoder)
        if with_repa and info.get("repa") is None:
            raise StageError(f"source {src.name!r} ({src.folder}) has no REPA features: re-encode it with "
                             "`prx-data encode --repa dinov2` (or turn REPA off: --repa-weight 0)")
        if info.get("status") not in (None, "complete"):
            raise StageError(f"{src.folder}: its encode run is {info.get('status')!r}, not complete: rerun the same "
                             "`prx-data encode` command to finish it")
        res = getattr(mixture, "resolution", None)
        if res and info.get("resolution") and int(info["resolution"]) != int(res):
            raise StageError(f"source {src.name!r} ({src.folder}) was encoded at resolution {info['resolution']}, "
                             f"the mixture asks for {res}: re-encode it with `prx-data encode --resolution {res}` "
                             "or change the mixture")
        if first is None:
            first = info
        else:
            for label, key in (("VAE", "vae"), ("text encoder", "text_encoder")):
                if not _same_model(info[key], first[key]):
                    raise encoded.EncoderMismatch(
                        f"sources {mixture.sources[0].name!r} and {src.name!r} were encoded with different {label}s "
                        f"({first[key].get('id')} vs {info[key].get('id')}): re-encode one of them with "
                        "`prx-data encode` so every source uses the same models")
        shards = list_shards(src.folder)
        if not shards:
            raise StageError(f"{src.folder}: no NNNNNN.tar shards in it")
        if len(shards) < world:
            raise StageError(f"source {src.name!r} has {len(shards)} shard(s), fewer than the {world} processes: "
                             "every rank needs its own shards (use fewer processes or more, smaller shards)")
        sources.append(SourceData(src.name, src.folder, float(src.weight), shards[rank::world], info))
    empty = encoded.load_empty_prompt(mixture.sources[0].folder)
    vae_info, te_info = first["vae"], first["text_encoder"]
    channels = vae_info.get("latent_channels")
    dim = te_info.get("hidden_size") or int(empty.shape[1])
    if int(empty.shape[1]) != int(dim):
        raise StageError(f"{mixture.sources[0].folder}: the empty prompt is {empty.shape[1]} wide but the text "
                         f"encoder record says {dim}: re-encode")
    return DataSpec(sources, dict(mixture.captions), int(channels) if channels else 0, int(dim), empty,
                    vae_info, te_info)


# ------------------------------------------------------------------------------------------- streams
class SourceStream:
    """One source's samples for this rank, forever, in a seeded order with a 3-integer position."""

    def __init__(self, src: SourceData, index: int, seed: int, rank: int, window: int):
        self.src, self.index, self.seed, self.rank, self.window = src, index, seed, rank, window
        self.epoch = self.shard = self.offset = 0
        self._iter: Iterator | None = None
        self._path: str | None = None
        self._win: list = []
        self._win_start = 0
        self._eof = False

    # position ------------------------------------------------------------------------------------
    def position(self) -> list[int]:
        return [self.epoch, self.shard, self.offset]

    def seek(self, pos: list[int]) -> None:
        self.epoch, self.shard, self.offset = (int(x) for x in pos)
        self._close()

    def _close(self):
        self._iter, self._path, self._win, self._win_start = None, None, [], 0

    # order ---------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[str]:
        perm = np.random.default_rng(seed_for(self.seed, "shards", self.rank, self.index, epoch)).permutation(
            len(self.src.shards))
        return [self.src.shards[i] for i in perm]

    def _raw_next(self):
        """Next sample of the open shard in file order, or None at its end; problems stop training."""
        try:
            item = next(self._iter)
        except StopIteration:
            return None
        if isinstance(item, Problem):
            raise DataError(f"bad shard {self._path} (source {self.src.name!r}): {item.reason}"
                            f"{': ' + item.detail if item.detail else ''} (sample {item.input_id}). Fix or remove "
                            "the shard (re-run `prx-data encode` for it) and resume")
        return item

    def _fill_window(self) -> bool:
        """Read the window that holds self.offset; False if the shard has no more samples."""
        start = (self.offset // self.window) * self.window
        if self._iter is None:
            self._path = self._order(self.epoch)[self.shard]
            self._iter = iter(read_shard(self._path))
            self._eof = False
            for _ in range(start):  # resume: skip whole windows already consumed
                if self._raw_next() is None:
                    return False
        elif self._eof:
            return False
        items = []
        while len(items) < self.window:
            s = self._raw_next()
            if s is None:
                self._eof = True
                break
            items.append(s)
        if not items or self.offset - start >= len(items):
            return False
        perm = np.random.default_rng(seed_for(self.seed, "window", self.rank, self.index, self.epoch, self.shard,
                                              start)).permutation(len(items))
        self._win = [items[i] for i in perm]
        self._win_start = start
        return True

    def next(self):
        for _ in range(2 * len(self.src.shards) + 2):
            if self._iter is not None and self._win_start <= self.offset < self._win_start + len(self._win):
                sample = self._win[self.offset - self._win_start]
                self.offset += 1
                return sample
            if self._fill_window():
                continue
            # shard exhausted
            self._close()
            self.shard, self.offset = self.shard + 1, 0
            if self.shard >= len(self.src.shards):
                self.epoch, self.shard = self.epoch + 1, 0
        raise DataError(f"source {self.src.name!r} ({self.src.folder}) has no samples in this rank's shards")


# ------------------------------------------------------------------------------------------- mixing
def choose(weights: dict[str, float], u: float) -> str | None:
    """Inverse-CDF pick over the positive weights (renormalised), in the dict's order; None if none."""
    items = [(k, w) for k, w in weights.items() if w > 0]
    total = sum(w for _, w in items)
    if total <= 0:
        return None
    acc = 0.0
    for k, w in items:
        acc += w / total
        if u < acc:
            return k
    return items[-1][0]


def variant_weights(requested: dict[str, float], available: list[str]) -> dict[str, float]:
    """Weights over the variants this sample has: the requested ones (missing ones dropped, i.e. the rest
    renormalised), or every available variant equally when none were requested."""
    if not requested:
        return {v: 1.0 for v in available}
    return {v: w for v, w in requested.items() if v in available}


@dataclass
class Item:
    draw: int
    source: str
    variant: str
    key: str
    mean: torch.Tensor      # C x h x w float32: the VAE posterior's moments (sampled when the batch is made)
    logvar: torch.Tensor
    emb: torch.Tensor       # L x D bfloat16, unpadded (padded when the batch is made)
    snapshot: list = field(default_factory=list)  # stream positions before this draw
    repa: torch.Tensor | None = None  # N x D bfloat16 REPA features (with_repa only)


@dataclass
class Batch:
    x0: torch.Tensor
    emb: torch.Tensor
    mask: torch.Tensor
    sources: list[str]
    variants: list[str]
    keys: list[str]
    draws: list[int]
    repa: torch.Tensor | None = None  # B x N x D REPA features (with_repa only)

    def __len__(self):
        return self.x0.shape[0]


def pad_embedding(emb: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """L x D -> (length x D zero-padded, mask of real tokens, truncated?)."""
    n = emb.shape[0]
    truncated = n > length
    n = min(n, length)
    out = torch.zeros(length, emb.shape[1], dtype=emb.dtype)
    out[:n] = emb[:n]
    mask = torch.zeros(length, dtype=torch.bool)
    mask[:n] = True
    return out, mask, truncated


class MixtureLoader:
    """Batches of (x0, padded embedding, mask) from weighted sources; iterate it, save `state()`."""

    MAX_SKIPPED = 10_000  # consecutive draws with none of the asked caption variants: stop instead of spinning

    def __init__(self, spec: DataSpec, batch_size: int, seed: int = 0, rank: int = 0, text_max_length: int = 256,
                 shuffle_window: int = 64, max_wait_batches: int = 64, with_repa: bool = False):
        self.spec, self.batch_size, self.seed, self.rank = spec, batch_size, seed, rank
        self.with_repa = with_repa
        self.text_max_length = text_max_length
        self.max_wait = max_wait_batches * batch_size
        weights = {s.name: s.weight for s in spec.sources}
        self.source_weights = weights
        self.streams = [SourceStream(s, i, seed, rank, shuffle_window) for i, s in enumerate(spec.sources)]
        self.by_name = {s.name: st for s, st in zip(spec.sources, self.streams)}
        self.n = 0
        self.buckets: dict[tuple, list[Item]] = {}
        self.counts = self._zero_counts()

    def _zero_counts(self) -> dict[str, Any]:
        return {"source": {s.name: 0 for s in self.spec.sources},
                "variant": {v: 0 for v in self.spec.captions},
                "skipped_no_variant": 0, "truncated_text": 0, "samples": 0, "batches": 0}

    # ---- one draw
    def _generator(self, d: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed_for(self.seed, "draw", self.rank, d))

    def _pick_source(self, g: torch.Generator) -> SourceStream:
        u = float(torch.rand(1, generator=g))
        return self.by_name[choose(self.source_weights, u)]

    def _draw(self, d: int, light: bool = False) -> Item | None:
        snapshot = [st.position() for st in self.streams]
        g = self._generator(d)
        stream = self._pick_source(g)
        sample = stream.next()
        if light:
            return None
        u_var = float(torch.rand(1, generator=g))
        try:
            variants = encoded.available_variants(sample)
            variant = choose(variant_weights(self.spec.captions, variants), u_var)
            if variant is None:
                self.counts["skipped_no_variant"] += 1
                return None
            emb = encoded.read_embedding(sample, variant)
            mean, logvar = encoded.read_latent(sample)
            repa = encoded.read_repa(sample) if self.with_repa else None
        except BadMember as exc:
            raise DataError(f"bad shard {sample.shard} (source {stream.src.name!r}): sample {sample.key}: {exc}. "
                            "Fix or remove the shard (re-run `prx-data encode` for it) and resume") from None
        if emb.shape[1] != self.spec.text_dim:
            raise DataError(f"bad shard {sample.shard}: sample {sample.key} has {emb.shape[1]}-wide embeddings, "
                            f"the folder's text encoder is {self.spec.text_dim} wide")
        if self.with_repa and repa is None:
            raise DataError(f"bad shard {sample.shard}: sample {sample.key} has no repa.safetensors: re-encode the "
                            "source with `prx-data encode --repa dinov2`")
        return Item(d, stream.src.name, variant, sample.key, mean, logvar, emb, snapshot, repa)

    # ---- batching
    def _emit(self, shape: tuple, n: int | None = None) -> Batch:
        items = self.buckets[shape][: n or self.batch_size]
        self.buckets[shape] = self.buckets[shape][len(items):]
        if not self.buckets[shape]:
            del self.buckets[shape]
        embs, masks = [], []
        for it in items:
            self.counts["source"][it.source] = self.counts["source"].get(it.source, 0) + 1
            self.counts["variant"][it.variant] = self.counts["variant"].get(it.variant, 0) + 1
            emb, mask, truncated = pad_embedding(it.emb, self.text_max_length)
            embs.append(emb)
            masks.append(mask)
            self.counts["truncated_text"] += int(truncated)
        self.counts["samples"] += len(items)
        self.counts["batches"] += 1
        # latents drawn from the stored moments, one call per batch, seeded by the batch's first draw
        g = torch.Generator().manual_seed(seed_for(self.seed, "posterior", self.rank, items[0].draw))
        x0 = encoded.sample_posterior(torch.stack([it.mean for it in items]), torch.stack([it.logvar for it in items]),
                                      generator=g)
        x0 = encoded.scale_latent(x0, self.spec.vae).float()
        repa = torch.stack([it.repa for it in items]) if self.with_repa else None
        return Batch(x0, torch.stack(embs), torch.stack(masks), [it.source for it in items],
                     [it.variant for it in items], [it.key for it in items], [it.draw for it in items], repa)

    def _pending(self) -> list[Item]:
        return [it for items in self.buckets.values() for it in items]

    def next_batch(self) -> Batch:
        skipped = 0  # consecutive draws without a usable caption variant
        while True:
            pending = self._pending()
            if pending and self.n - min(it.draw for it in pending) > self.max_wait:
                # a rare bucket has waited too long: emit it as a smaller batch (deterministic)
                oldest = min(pending, key=lambda it: it.draw)
                return self._emit(tuple(oldest.mean.shape))
            d = self.n
            item = self._draw(d)
            self.n += 1
            if item is None:
                skipped += 1
                if skipped >= self.MAX_SKIPPED:
                    raise DataError(f"none of the last {skipped} samples drawn has an embedding for the caption "
                                    f"variants asked for ({self.spec.captions}): check --caption / the mixture's "
                                    "`captions` against the variants `prx-data encode` wrote")
                continue
            skipped = 0
            shape = tuple(item.mean.shape)
            self.buckets.setdefault(shape, []).append(item)
            if len(self.buckets[shape]) >= self.batch_size:
                return self._emit(shape)

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ---- state
    def state(self) -> dict[str, Any]:
        pending = sorted(self._pending(), key=lambda it: it.draw)
        if pending:
            n0 = pending[0].draw
            streams = pending[0].snapshot
        else:
            n0 = self.n
            streams = [st.position() for st in self.streams]
        waiting = {it.draw for it in pending}
        skip = [d for d in range(n0, self.n) if d not in waiting]
        return {"version": 1, "seed": self.seed, "rank": self.rank, "next_draw": self.n, "replay_from": n0,
                "replay_skip": skip, "streams": streams, "sources": [s.name for s in self.spec.sources],
                "counts": copy.deepcopy(self.counts)}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("sources") != [s.name for s in self.spec.sources]:
            raise ValueError(f"the checkpoint's data sources {state.get('sources')} differ from the config's "
                             f"{[s.name for s in self.spec.sources]}")
        if int(state["seed"]) != self.seed or int(state["rank"]) != self.rank:
            raise ValueError("the checkpoint's loader seed/rank differ from this run's")
        for st, pos in zip(self.streams, state["streams"]):
            st.seek(pos)
        self.buckets = {}
        skip = set(state["replay_skip"])
        counts = copy.deepcopy(state["counts"])
        self.counts = counts
        for d in range(int(state["replay_from"]), int(state["next_draw"])):
            if d in skip:
                self._draw(d, light=True)
                continue
            saved = copy.deepcopy(self.counts)
            item = self._draw(d)
            self.counts = saved  # replaying a waiting draw must not recount anything
            if item is not None:
                self.buckets.setdefault(tuple(item.mean.shape), []).append(item)
        self.n = int(state["next_draw"])


class Prefetcher:
    """Runs a loader in a background thread, `depth` batches ahead; `state()` is the state after the last
    batch handed out (what a checkpoint must save)."""

    def __init__(self, loader: MixtureLoader, depth: int = 2):
        self.loader = loader
        self._state = loader.state()
        self.depth = depth
        self._q: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self):
        try:
            while not self._stop.is_set():
                batch = self.loader.next_batch()
                item = (batch, self.loader.state())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._q.put(exc)

    def next(self) -> Batch:
        if self.depth <= 0:
            batch = self.loader.next_batch()
            self._state = self.loader.state()
            return batch
        if self._thread is None:
            self._q = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._run, name="prx-loader", daemon=True)
            self._thread.start()
        got = self._q.get()
        if isinstance(got, BaseException):
            raise got
        batch, self._state = got
        return batch

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
