"""Streaming loader over encoded shards: sources and caption variants mixed by weight, deterministically.

Reads shards only through the project's reader (`contract.shards.read_shard`) and the encoded-member reader
(`contract.encoded`). Nothing here unpickles anything. docs/training.md explains the data path for users.

Two halves
- The *plan* (`MixtureLoader.next_plan`): which sample each draw takes, which caption variant, which batch it
  lands in. Sequential, cheap (it touches member names and the small `json` member only), deterministic.
- The *collate* (`collate`): reads the latents and the drawn variant's embedding of one planned batch, samples
  the latents from the stored moments and packs the embeddings (unpadded; padding happens on the device, see
  trainer/batches.py). This is the heavy part; loader workers split it (trainer/batches.py).

Shuffling (per source, per rank)
- Shard order: epoch e permutes *all* shards of the source with a seed shared by every rank; rank r of W takes
  positions r, r+W, ... of that permutation, so ranks read disjoint shards in each epoch and the assignment
  rotates every epoch (when the count does not divide, ranks hold ceil or floor of n/W shards per epoch; over
  epochs every shard lands on every rank, so no sample is favoured).
- `open_shards` shards are open at once; every read picks one of them uniformly (a counter-keyed hash), and
  a finished shard is replaced by the next one of the epoch's shard order (the next epoch starts when every
  shard of this one is done, so an epoch reads every sample of the rank's shards exactly once).
- The reads are cut into blocks of `block` samples (the source's share of `--shuffle-buffer`); each block is
  emitted in a seeded random order. A batch therefore mixes the open shards of every source it draws from.
- A stream's position is small: the block's starting point (next shard number, the open shards' numbers and
  offsets, the read counter) and the offset inside the block. Seeking re-reads that one block.

Determinism and exact resume
- Every random choice of draw number d (which source, which caption variant) comes from a hash of
  (seed, rank, d), so the n-th draw is the same whatever happened before; a batch's latents are drawn from
  the stored moments with a generator seeded by its first draw.
- Samples wait in per-bucket queues (one bucket per latent shape C x h x w) until a bucket holds a batch.
  The saved state is: the next draw number n, the earliest draw n0 still waiting, the stream positions just
  before n0, and which draws in [n0, n) were already emitted. Resuming replays draws n0..n-1 (emitted
  ones are only skipped past, not collated) and lands on exactly the next batch.

Caption variants: a sample is trained on one variant drawn with the configured weights among the variants
it has (missing variants' weight renormalised over the rest). Realised per-source and per-variant counts
(of samples actually put in batches) are part of the state and logged.
"""
from __future__ import annotations

import copy
import hashlib
import os
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch

from contract import encoded
from contract.encoders.vae import DETERMINISTIC
from contract.errors import PrxError
from contract.ledger import read_stage_json
from contract.shards import BadMember, Problem, Sample, list_shards, read_shard


class DataError(RuntimeError):
    """A shard that cannot be trained on; the message names the shard and what is wrong."""


def seed_for(*parts: Any) -> int:
    """A 63-bit seed from any tuple (stable across processes and Python versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def uniform(*parts: Any) -> float:
    """A number in [0, 1) from any tuple: counter-based, so draw n needs nothing of draws before it."""
    return (seed_for(*parts) >> 10) / float(2**53)


# ------------------------------------------------------------------------------------------- sources
@dataclass
class SourceData:
    name: str
    folder: str
    weight: float
    shards: list[str]          # every shard of the source, in folder order (ranks split them per epoch)
    info: dict[str, Any]       # encoded.encoded_info(folder)
    rank: int = 0
    world: int = 1
    audit_source: str | None = None  # what `prx-data audit` calls it: the samples' json `source`

    def shards_per_rank(self) -> int:
        """How many shards this rank reads in each epoch (ceil or floor of n / world)."""
        return len(range(self.rank, len(self.shards), self.world))


@dataclass
class DataSpec:
    sources: list[SourceData]
    captions: dict[str, float]
    latent_channels: int
    text_dim: int
    empty_prompt: torch.Tensor  # L x D bfloat16
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    with_repa: bool = False     # batches carry the stored REPA features (`batch.repa`)


# Encoder record fields that must agree between sources: the model, and how captions became embeddings.
SAME_MODEL_KEYS = {"vae": ("id", "revision", "subfolder"),
                   "text_encoder": ("id", "revision", "subfolder", "max_length", "cleaning")}


def _differences(a: dict, b: dict, keys: tuple[str, ...]) -> list[str]:
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def first_sample_source(shards: list[str]) -> str | None:
    """The `source` field of the first sample's json (what `prx-data audit` groups by), or None."""
    for path in shards[:1]:
        for item in read_shard(path):
            if isinstance(item, Problem):
                return None
            try:
                value = item.meta().get("source")
            except BadMember:
                return None
            return str(value) if value else None
    return None


def open_sources(mixture, vae: str | None = None, text_encoder: str | None = None, rank: int = 0,
                 world: int = 1, with_repa: bool = False) -> DataSpec:
    """Check every source folder (encoded, complete, same encoders; REPA features when `with_repa`) and record
    this rank's place."""
    sources = []
    first = None
    for src in mixture.sources:
        info = encoded.check_encoders(src.folder, vae=vae, text_encoder=text_encoder)
        if info.get("status") not in (None, "complete"):
            raise PrxError(f"{src.folder}: its encode run is {info.get('status')!r}, not complete: rerun the same "
                             "`prx-data encode` command to finish it")
        res = getattr(mixture, "resolution", None)
        if res and info.get("resolution") and int(info["resolution"]) != int(res):
            raise PrxError(f"source {src.name!r} ({src.folder}) was encoded at resolution {info['resolution']}, "
                             f"the mixture asks for {res}: re-encode it with `prx-data encode --resolution {res}` "
                             "or change the mixture")
        if with_repa and info.get("repa") is None:
            raise PrxError(f"source {src.name!r} ({src.folder}) has no REPA features: re-encode it with "
                             "`prx-data encode --repa dinov2` (or turn REPA off: --repa-weight 0)")
        if first is None:
            first = info
        else:
            for label, key in (("VAE", "vae"), ("text encoder", "text_encoder")):
                diff = _differences(first[key], info[key], SAME_MODEL_KEYS[key])
                if diff:
                    raise encoded.EncoderMismatch(
                        f"sources {mixture.sources[0].name!r} and {src.name!r} were encoded with different {label}s "
                        f"({'; '.join(diff)}): re-encode one of them with `prx-data encode` so every source uses "
                        "the same models, cleaning and max length")
        shards = list_shards(src.folder)
        if not shards:
            raise PrxError(f"{src.folder}: no NNNNNN.tar shards in it")
        if len(shards) < world:
            raise PrxError(f"source {src.name!r} has {len(shards)} shard(s), fewer than the {world} processes: "
                             "every rank needs its own shards (use fewer processes or more, smaller shards)")
        audit = audit_source_name(src.folder, shards)
        sources.append(SourceData(src.name, src.folder, float(src.weight), shards, info, rank, world, audit))
    empty = encoded.load_empty_prompt(mixture.sources[0].folder)
    vae_info, te_info = first["vae"], first["text_encoder"]
    channels = vae_info.get("latent_channels")
    dim = te_info.get("hidden_size") or int(empty.shape[1])
    if int(empty.shape[1]) != int(dim):
        raise PrxError(f"{mixture.sources[0].folder}: the empty prompt is {empty.shape[1]} wide but the text "
                         f"encoder record says {dim}: re-encode")
    return DataSpec(sources, dict(mixture.captions), int(channels) if channels else 0, int(dim), empty,
                    vae_info, te_info, with_repa)


CAPTION_PROBE = 64  # samples of a source's first shard looked at for the asked caption variants


def check_captions(spec: DataSpec) -> None:
    """Every source has the asked caption variants (PRX's baseline: long only), judged from the first samples
    of its first shard: a source never recaptioned stops here, not after thousands of skipped draws."""
    wanted = {v for v, w in spec.captions.items() if w > 0}
    for src in spec.sources:
        found, probed = _probe_captions(src.shards[0], wanted)
        if probed and not found:
            raise PrxError(
                f"source {src.name!r} ({src.folder}) has no {'/'.join(sorted(wanted))} caption embeddings (none in "
                f"the first {probed} samples of {os.path.basename(src.shards[0])}); PRX's baseline trains on long "
                "recaptions: run `prx-data recaption` on its input and re-encode it, or choose the variants it has "
                "with --caption (e.g. --caption original=1)")


def _probe_captions(shard: str, wanted: set[str]) -> tuple[bool, int]:
    """(a sample with one of `wanted` was seen, samples looked at) over the first CAPTION_PROBE samples."""
    probed = 0
    for item in read_shard(shard):
        if isinstance(item, Problem):
            continue
        if set(encoded.available_variants(item)) & wanted:
            return True, probed + 1
        probed += 1
        if probed >= CAPTION_PROBE:
            break
    return False, probed


def audit_source_name(folder: str, shards: list[str] | None = None) -> str | None:
    """What `prx-data audit` calls the source of `folder`: the json `source` of its first sample (written by
    `prx-data ingest --source`, default the ingest input folder's name), else the ingest run's record."""
    shards = list_shards(folder) if shards is None else shards
    return first_sample_source(shards) or ingest_source_name(folder)


def ingest_source_name(folder: str) -> str | None:
    """The source name `prx-data ingest` recorded for the data in `folder` (following `_stage.json` inputs
    back to the ingest run), i.e. the `source` every sample's json carries and `prx-data audit` reports."""
    seen = set()
    while folder and folder not in seen:
        seen.add(folder)
        try:
            doc = read_stage_json(folder)
        except (OSError, ValueError):
            return None
        if not doc:
            return None
        if doc.get("stage") == "ingest":
            cfg = doc.get("config") or {}
            src = cfg.get("source") or posixpath.basename(str(cfg.get("input") or "").rstrip("/").removeprefix("hf:"))
            return src or None
        inputs = doc.get("inputs") or []
        folder = inputs[0] if inputs and isinstance(inputs[0], str) else None
    return None


# ------------------------------------------------------------------------------------------- streams
class SourceStream:
    """One source's samples for this rank, forever: `open_shards` shards interleaved, emitted in shuffled
    blocks; its position is a few integers (see the module docstring)."""

    def __init__(self, src: SourceData, index: int, seed: int, open_shards: int, block: int):
        self.src, self.index, self.seed, self.block = src, index, seed, max(1, block)
        self.n_rank = src.shards_per_rank()
        self.k = max(1, min(open_shards, self.n_rank))
        self._perms: dict[int, list[int]] = {}
        self._set_raw({"next": 0, "slots": [], "reads": 0})
        self._start = self._raw()
        self._items: list[Sample] = []
        self._order: list[int] = []
        self._pos = 0

    # raw interleaved reads -------------------------------------------------------------------------
    def _raw(self) -> dict[str, Any]:
        return {"next": self._next, "slots": [list(s) for s in self._slots], "reads": self._reads}

    def _set_raw(self, raw: dict[str, Any]) -> None:
        self._next, self._reads = int(raw["next"]), int(raw["reads"])
        self._slots = [[int(g), int(off)] for g, off in raw["slots"]]
        self._iters: dict[int, Iterator] = {}

    def shard_path(self, g: int) -> str:
        """The g-th shard this rank opens (g counts on across epochs)."""
        epoch, i = divmod(g, self.n_rank)
        perm = self._perms.get(epoch)
        if perm is None:
            n = len(self.src.shards)
            perm = np.random.default_rng(seed_for(self.seed, "shards", self.index, epoch)).permutation(n).tolist()
            if len(self._perms) > 4:  # open shards straddle at most a couple of epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return self.src.shards[perm[self.src.rank + i * self.src.world]]

    def _problem(self, item: Problem, path: str) -> DataError:
        """The error for a reader Problem: a damaged tar (`truncated_tar`, `read_error`: a rerun of the encode
        command that wrote it redoes it) or a bad sample in a readable one."""
        damaged = item.reason in ("truncated_tar", "read_error")
        fix = ("Rerun the `prx-data encode` command that wrote it (it redoes damaged shards)" if damaged else
               "Fix or remove the shard (re-run `prx-data encode` for it)")
        return DataError(f"{'damaged' if damaged else 'bad'} shard {path} (source {self.src.name!r}): {item.reason}"
                         f"{': ' + item.detail if item.detail else ''} (sample {item.input_id}). {fix} and resume")

    def _read(self, g: int, offset: int) -> Sample | None:
        """The sample after the first `offset` of shard g, or None at its end."""
        it = self._iters.get(g)
        path = self.shard_path(g)
        if it is None:
            it = self._iters[g] = iter(read_shard(path))
            for _ in range(offset):  # resume: skip what was read before
                item = next(it, None)
                if item is None:
                    return None
                if isinstance(item, Problem):
                    raise self._problem(item, path)
        item = next(it, None)
        if isinstance(item, Problem):
            raise self._problem(item, path)
        return item

    def _raw_next(self) -> Sample:
        empty_run = 0
        while True:
            # refill free slots, but start epoch e + 1 only when epoch e is done: each epoch reads every sample once
            while len(self._slots) < self.k and (not self._slots or
                                                 self._next // self.n_rank == self._slots[0][0] // self.n_rank):
                self._slots.append([self._next, 0])
                self._next += 1
            j = int(uniform(self.seed, "interleave", self.src.rank, self.index, self._reads) * len(self._slots))
            g, offset = self._slots[j]
            sample = self._read(g, offset)
            if sample is not None:
                self._slots[j][1] += 1
                self._reads += 1
                return sample
            self._iters.pop(g, None)
            del self._slots[j]
            empty_run = empty_run + 1 if offset == 0 else 0
            if empty_run > 2 * self.n_rank + self.k:
                raise DataError(f"source {self.src.name!r} ({self.src.folder}) has no samples in this rank's shards")

    # shuffled blocks -----------------------------------------------------------------------------
    def position(self) -> dict[str, Any]:
        if self._pos >= len(self._items):
            return {"start": self._raw(), "pos": 0}
        return {"start": copy.deepcopy(self._start), "pos": self._pos}

    def seek(self, position: dict[str, Any]) -> None:
        self._set_raw(position["start"])
        self._items, self._order, self._pos = [], [], 0
        if int(position["pos"]) > 0:
            self._fill()
            self._pos = int(position["pos"])

    def _fill(self) -> None:
        self._start = self._raw()
        self._items = [self._raw_next() for _ in range(self.block)]
        g = np.random.default_rng(seed_for(self.seed, "block", self.src.rank, self.index, self._start["reads"]))
        self._order = g.permutation(len(self._items)).tolist()
        self._pos = 0

    def next(self) -> Sample:
        if self._pos >= len(self._items):
            self._fill()
        sample = self._items[self._order[self._pos]]
        self._pos += 1
        return sample


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
    """One planned sample: which sample, which variant; nothing decoded yet."""
    draw: int
    source: str
    variant: str
    sample: Sample
    shape: tuple            # latent C x h x w (the bucket)
    tokens: int | None      # the variant's token count, from the json (None when not recorded)
    snapshot: list = field(default_factory=list)  # stream positions before this draw


@dataclass
class Batch:
    """A collated batch, on the host. Embeddings are packed without padding: `tokens` (N x D) holds every
    sample's tokens one after another, `index` their flat positions in a (B * text_len) padded layout, so
    padding is one `index_copy_` wherever the batch goes (`padded`)."""
    x0: torch.Tensor        # B x C x h x w float32 (sampled from the moments, scaled)
    tokens: torch.Tensor    # N x D bfloat16
    index: torch.Tensor     # N int64: b * text_len + position
    lengths: torch.Tensor   # B int64 (after truncation to text_len)
    text_len: int
    sources: list[str]
    variants: list[str]
    keys: list[str]
    shards: list[str]
    draws: list[int]
    state: dict[str, Any] | None = None  # the loader's state right after this batch (for checkpoints)
    repa: torch.Tensor | None = None     # B x N x D bfloat16 REPA features (DataSpec.with_repa only)

    def __len__(self):
        return self.x0.shape[0]

    def pin_memory(self) -> "Batch":
        """Page-locked copies (DataLoader's pin_memory thread calls this)."""
        return replace(self, x0=self.x0.pin_memory(), tokens=self.tokens.pin_memory(),
                       index=self.index.pin_memory(), lengths=self.lengths.pin_memory(),
                       repa=None if self.repa is None else self.repa.pin_memory())

    def padded(self, device: torch.device | str | None = None,
               non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x text_len x D embeddings zero-padded, B x text_len mask of real tokens), built on `device`."""
        return pad_packed(self.tokens, self.index, self.lengths, self.text_len, device, non_blocking)


def pad_packed(tokens: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor, length: int,
               device: torch.device | str | None = None, non_blocking: bool = False):
    """Packed tokens -> (B x length x D zero-padded, mask); no host sync (the positions come precomputed)."""
    device = torch.device(device) if device is not None else tokens.device
    tokens = tokens.to(device, non_blocking=non_blocking)
    index = index.to(device, non_blocking=non_blocking)
    lengths = lengths.to(device, non_blocking=non_blocking)
    b = lengths.shape[0]
    out = torch.zeros(b * length, tokens.shape[1], dtype=tokens.dtype, device=device)
    out.index_copy_(0, index, tokens)
    mask = torch.arange(length, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return out.view(b, length, tokens.shape[1]), mask


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


def _bad(item: Item, exc: Exception) -> DataError:
    return DataError(f"bad shard {item.sample.shard} (source {item.source!r}): sample {item.sample.key}: {exc}. "
                     "Fix or remove the shard (re-run `prx-data encode` for it) and resume")


def cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(tensors)` (CPU, along rows) as one single-threaded copy: numpy's. torch.cat's intra-op threads
    cost several times the CPU of the copy itself on a busy host (~300 MB of embeddings per batch of 256);
    bfloat16 goes through int16 views, so the bytes are the same."""
    dtype = tensors[0].dtype
    raw = torch.int16 if dtype == torch.bfloat16 else dtype
    return torch.from_numpy(np.concatenate([t.view(raw).numpy() for t in tensors])).view(dtype)


def collate(items: list[Item], spec: DataSpec, text_max_length: int, seed: int, rank: int) -> Batch:
    """Read and pack one planned batch (the part loader workers run)."""
    means, logvars, toks, index, lengths, repas = [], [], [], [], [], []
    for b, it in enumerate(items):
        try:
            mean, logvar = encoded.read_image(it.sample)
            emb = encoded.read_embedding(it.sample, it.variant)
            repa = encoded.read_repa(it.sample) if spec.with_repa else None
        except BadMember as exc:
            raise _bad(it, exc) from None
        if spec.with_repa and repa is None:
            raise _bad(it, "no repa.safetensors (re-encode the source with `prx-data encode --repa dinov2`)")
        repas.append(repa)
        if tuple(mean.shape) != it.shape:
            raise _bad(it, f"latent is {tuple(mean.shape)}, its json says {it.shape}")
        if emb is None or emb.shape[1] != spec.text_dim:
            raise _bad(it, f"embedding {encoded.embedding_member(it.variant)} is "
                           f"{'missing' if emb is None else f'{emb.shape[1]} wide'}, the folder's text encoder is "
                           f"{spec.text_dim} wide")
        n = min(emb.shape[0], text_max_length)
        means.append(mean)
        logvars.append(logvar)
        toks.append(emb[:n])
        index.append(torch.arange(n) + b * text_max_length)
        lengths.append(n)
    if logvars[0] is None:  # pixel space: the stored crop itself, in [-1, 1]
        x0 = torch.stack(means)
    elif spec.vae.get("posterior") == DETERMINISTIC:  # DC-AE: the stored latent itself
        x0 = encoded.scale_latent(torch.stack(means), spec.vae).float()
    else:  # latents drawn from the stored moments, one call per batch, seeded by the batch's first draw
        g = torch.Generator().manual_seed(seed_for(seed, "posterior", rank, items[0].draw))
        x0 = encoded.sample_posterior(torch.stack(means), torch.stack(logvars), generator=g)
        x0 = encoded.scale_latent(x0, spec.vae).float()
    return Batch(x0, cat_rows(toks), torch.cat(index), torch.tensor(lengths, dtype=torch.int64), text_max_length,
                 [it.source for it in items], [it.variant for it in items], [it.sample.key for it in items],
                 [os.path.basename(it.sample.shard) for it in items], [it.draw for it in items],
                 repa=torch.stack(repas) if spec.with_repa else None)


# The loader's defaults, written once: TrainConfig's options of the same names (and so LoaderSettings) refer to them.
TEXT_MAX_LENGTH = 256  # text embeddings are padded (with a mask) to this many tokens
OPEN_SHARDS = 8        # shards of each source a rank reads at once
SHUFFLE_BUFFER = 2048  # samples shuffled together per rank


class MixtureLoader:
    """Plans batches from weighted sources (`next_plan`), collates them (`next_batch` = both), saves `state()`."""

    MAX_SKIPPED = 10_000  # consecutive draws with none of the asked caption variants: stop instead of spinning

    def __init__(self, spec: DataSpec, batch_size: int, seed: int = 0, rank: int = 0,
                 text_max_length: int = TEXT_MAX_LENGTH, open_shards: int = OPEN_SHARDS,
                 shuffle_buffer: int = SHUFFLE_BUFFER, max_wait_batches: int = 64):
        self.spec, self.batch_size, self.seed, self.rank = spec, batch_size, seed, rank
        self.text_max_length = text_max_length
        self.max_wait = max_wait_batches * batch_size
        self.source_weights = {s.name: s.weight for s in spec.sources}
        block = max(1, shuffle_buffer // max(1, len(spec.sources)))
        self.streams = [SourceStream(s, i, seed, open_shards, block) for i, s in enumerate(spec.sources)]
        self.by_name = {s.name: st for s, st in zip(spec.sources, self.streams)}
        self.n = 0
        self.buckets: dict[tuple, list[Item]] = {}
        self.counts = self._zero_counts()

    def _zero_counts(self) -> dict[str, Any]:
        return {"source": {s.name: 0 for s in self.spec.sources},
                "variant": {v: 0 for v in self.spec.captions},
                "skipped_no_variant": 0, "truncated_text": 0, "samples": 0, "batches": 0}

    # ---- one draw
    def _draw(self, d: int, light: bool = False) -> Item | None:
        snapshot = [st.position() for st in self.streams]
        stream = self.by_name[choose(self.source_weights, uniform(self.seed, "draw", self.rank, d, "source"))]
        sample = stream.next()
        if light:
            return None
        variant = choose(variant_weights(self.spec.captions, encoded.available_variants(sample)),
                         uniform(self.seed, "draw", self.rank, d, "variant"))
        if variant is None:
            self.counts["skipped_no_variant"] += 1
            return None
        shape, tokens = self._shape_and_tokens(sample, variant, stream)
        return Item(d, stream.src.name, variant, sample, shape, tokens, snapshot)

    def _shape_and_tokens(self, sample: Sample, variant: str, stream: SourceStream) -> tuple[tuple, int | None]:
        """The latent shape (bucket) and token count from the small json member; the latent's header if the
        json does not record it."""
        try:
            enc = encoded.encoder_meta(sample)
            shape = (enc.get("latent") or {}).get("shape")
            tokens = ((enc.get("captions") or {}).get(variant) or {}).get("tokens")
            if not (isinstance(shape, list) and len(shape) == 3):
                shape = list(encoded.read_image(sample)[0].shape)
        except BadMember as exc:
            raise DataError(f"bad shard {sample.shard} (source {stream.src.name!r}): sample {sample.key}: {exc}. "
                            "Fix or remove the shard (re-run `prx-data encode` for it) and resume") from None
        return tuple(int(x) for x in shape), (int(tokens) if isinstance(tokens, int) else None)

    # ---- batching
    def _take(self, shape: tuple) -> list[Item]:
        items = self.buckets[shape][: self.batch_size]
        self.buckets[shape] = self.buckets[shape][len(items):]
        if not self.buckets[shape]:
            del self.buckets[shape]
        for it in items:
            self.counts["source"][it.source] = self.counts["source"].get(it.source, 0) + 1
            self.counts["variant"][it.variant] = self.counts["variant"].get(it.variant, 0) + 1
            self.counts["truncated_text"] += int((it.tokens or 0) > self.text_max_length)
        self.counts["samples"] += len(items)
        self.counts["batches"] += 1
        return items

    def _pending(self) -> list[Item]:
        return [it for items in self.buckets.values() for it in items]

    def next_plan(self) -> list[Item]:
        """The next batch's items, in order (no member decoded beyond the json)."""
        skipped = 0  # consecutive draws without a usable caption variant
        while True:
            pending = self._pending()
            if pending and self.n - min(it.draw for it in pending) > self.max_wait:
                # a rare bucket has waited too long: emit it as a smaller batch (deterministic)
                return self._take(min(pending, key=lambda it: it.draw).shape)
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
            self.buckets.setdefault(item.shape, []).append(item)
            if len(self.buckets[item.shape]) >= self.batch_size:
                return self._take(item.shape)

    def collate(self, items: list[Item]) -> Batch:
        return collate(items, self.spec, self.text_max_length, self.seed, self.rank)

    def next_batch(self) -> Batch:
        batch = self.collate(self.next_plan())
        batch.state = self.state()
        return batch

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
        return {"version": 2, "seed": self.seed, "rank": self.rank, "next_draw": self.n, "replay_from": n0,
                "replay_skip": skip, "streams": copy.deepcopy(streams), "sources": [s.name for s in self.spec.sources],
                "counts": copy.deepcopy(self.counts)}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != 2:
            raise ValueError(f"the checkpoint's loader state is version {state.get('version')}, this trainer reads "
                             "version 2 (shuffle buffer over open shards): resume it with the trainer that wrote it")
        if state.get("sources") != [s.name for s in self.spec.sources]:
            raise ValueError(f"the checkpoint's data sources {state.get('sources')} differ from the config's "
                             f"{[s.name for s in self.spec.sources]}")
        if int(state["seed"]) != self.seed or int(state["rank"]) != self.rank:
            raise ValueError("the checkpoint's loader seed/rank differ from this run's")
        for st, pos in zip(self.streams, state["streams"]):
            st.seek(pos)
        self.buckets = {}
        skip = set(state["replay_skip"])
        self.counts = copy.deepcopy(state["counts"])
        for d in range(int(state["replay_from"]), int(state["next_draw"])):
            if d in skip:
                self._draw(d, light=True)
                continue
            saved = copy.deepcopy(self.counts)
            item = self._draw(d)
            self.counts = saved  # replaying a waiting draw must not recount anything
            if item is not None:
                self.buckets.setdefault(item.shape, []).append(item)
        self.n = int(state["next_draw"])


# ------------------------------------------------------------------------------------------- mixing quality
def same_shard_rate(batches: list[Batch]) -> float:
    """Fraction of within-batch sample pairs that come from the same shard (of the same source)."""
    same = pairs = 0
    for b in batches:
        ids = list(zip(b.sources, b.shards))
        n = len(ids)
        pairs += n * (n - 1) // 2
        counts: dict = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        same += sum(c * (c - 1) // 2 for c in counts.values())
    return same / pairs if pairs else 0.0


def expected_same_shard_rate(weights: dict[str, float], open_shards: dict[str, int]) -> float:
    """What `same_shard_rate` is when each draw picks a source by weight and then one of its `open_shards[s]`
    open shards uniformly: sum over sources of p_s^2 / k_s. With every shard open (k_s = shards of s) this
    is the rate of a uniform draw over all samples (for equal-sized shards)."""
    total = sum(weights.values())
    return sum((w / total) ** 2 / max(1, open_shards[s]) for s, w in weights.items())


def consecutive_overlap(batches: list[Batch]) -> float:
    """Batch-to-batch correlation: mean fraction of batch i+1's samples whose shard also feeds batch i."""
    if len(batches) < 2:
        return 0.0
    fr = []
    for a, b in zip(batches, batches[1:]):
        prev = set(zip(a.sources, a.shards))
        fr.append(sum((s in prev) for s in zip(b.sources, b.shards)) / len(b))
    return float(np.mean(fr))
