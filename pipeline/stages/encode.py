"""`prx-data encode`: VAE latents and text-encoder embeddings per caption variant, that know their encoders.

The trainer must not pay for the VAE or the text encoder per step. Each kept sample gets
`latent.safetensors` (`mean`, `logvar`, float32 C x h x w), one `emb_{variant}.safetensors` per caption
variant (`hidden`, bfloat16 L x D, real tokens only), optionally `repa.safetensors` (`features`), and a
`json.encoders` section naming every encoder; the folder gets `_empty_prompt.safetensors` once. Read it
back with `contract.encoded`. `--vae none` is pixel space: `pixels.webp` (the crop itself, lossless;
contract/encoders/pixels.py) instead of `latent.safetensors`.

Work per batch: decode, crop and clean captions in CPU threads, or in `--prepare-processes` processes that
also tokenise (the next batch is prepared while the current one is encoded), then batched VAE / teacher
forwards per bucket size and text-encoder forwards over captions sorted by length, in BF16 autocast on a GPU;
a writer thread writes the batch while the next one is encoded. Models load once per worker.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from contract import fs, ledger
from contract.config import CommonConfig, option
from contract.encoded import (EMPTY_PROMPT_FILE, LATENT_MEMBER, ORIGINAL, REPA_MEMBER, caption_member,
                              check_variant_name, embedding_member, variant_of_member)
from contract.encoders import buckets as bk
from contract.encoders.pixels import PIXELS_MEMBER, PixelSpace, encode_image, is_pixel_space, pixel_info
from contract.images import DEFAULT_MAX_PIXELS, ImageRejected
from pipeline.device_decode import DECODERS, crop_on_device, on_device
from pipeline.device_decode import provenance as decode_provenance
from pipeline.prepare_pool import prepare_processes_option
from pipeline.runner import cached, worker_device
from contract.shards import BadMember, Sample, ShardWriter, dumps_json
from pipeline.stage import MapStage, Result, PrxError, Task, keep, reject

FORMAT_VERSION = 1
log = logging.getLogger(__name__)

ledger.register_reasons({
    "no_caption_variant": (ledger.REJECTED, "encode: none of the requested caption variants is present, "
                                            "non-empty after cleaning and at least one token (detail lists them)"),
    "nonfinite_latent": (ledger.FAILED, "encode: the VAE returned NaN or infinite values for this image"),
})


@dataclass
class EncodeConfig(CommonConfig):
    vae: str = option("flux1", help="VAE: alias from manifests/models.yaml, hub id or folder "
                                    "(a diffusers AutoencoderKL or FLUX.2's AutoencoderKLFlux2), or none: "
                                    "pixel space, the crop itself stored losslessly")
    text_encoder: str = option("t5gemma-2b", help="text encoder: alias, hub id or folder (t5gemma-2b is gated: "
                                                  "accept its licence on the hub and set HF_TOKEN)")
    resolution: int = option(256, help="square side, or the diffusers PRX bin set with --buckets ar (256/512/1024)")
    buckets: str = option("square", choices=["square", "ar"],
                          help="square: centre square crop; ar: diffusers' PRX aspect-ratio bins")
    variants: list[str] = option(default_factory=lambda: [ORIGINAL, "long", "short"],
                                 help="caption variants to encode (original = the txt member, others = "
                                      "caption_{variant}.txt); a sample keeps those it has")
    max_length: int = option(256, help="maximum tokens per caption (longer ones are truncated)", minimum=1)
    cleaning: str | None = option(None, choices=["prx", "basic", "none"],
                                  help="caption cleaning: prx = diffusers PRXPipeline TextPreprocessor.clean_text "
                                       "(its default), basic = basic_clean, none (default: the text encoder "
                                       "alias's cleaning in manifests/models.yaml, PRX's for it, else prx)")
    repa: str | None = option(None, help="REPA teacher (e.g. dinov2): store its patch tokens at the denoiser grid")
    repa_patch_size: int = option(2, help="the denoiser's patch size: REPA features at latent / patch size", minimum=1)
    drop_images: bool = option(False, help="do not copy the image member (encoded shards only)")
    precision: str = option("auto", choices=["auto", "float32", "bf16"],
                            help="encoder compute: auto = BF16 autocast on a GPU, float32 on the CPU")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, help="reject images whose header declares more pixels",
                                   minimum=1)
    batch_size: int = option(32, runtime=True, help="images (and captions) per encoder forward", minimum=1)
    decode_threads: int = option(4, runtime=True, help="CPU threads that decode, crop and clean captions", minimum=1)
    prepare_processes: int = prepare_processes_option()
    decode: str = option("cpu", runtime=True, choices=list(DECODERS),
                         help="JPEG decoder: cpu (Pillow) or gpu (torchvision's nvJPEG decode and the crop's resize on "
                              "the device; other images, and any it cannot read, go through the CPU decoder)")
    decode_device: str | None = option(None, runtime=True,
                                       help="torch device of --decode gpu (default: the worker's GPU, the CPU "
                                            "without one; cpu runs the same code path with the output of --decode cpu)")

    def __post_init__(self):
        super().__post_init__()
        if self.cleaning is None:  # the model's own (contract.encoders.text.default_cleaning), recorded as chosen
            from contract.encoders.text import default_cleaning

            self.cleaning = default_cleaning(self.text_encoder)


@dataclass
class Padding:
    """The text encoder's padding waste: tokens its forwards computed / real caption tokens."""

    real: int = 0
    computed: int = 0
    forwards: int = 0
    worst: float = 0.0      # the most wasteful forward's ratio

    def add(self, real: int, computed: int) -> None:
        self.real, self.computed, self.forwards = self.real + real, self.computed + computed, self.forwards + 1
        self.worst = max(self.worst, computed / max(real, 1))

    @property
    def ratio(self) -> float:
        return self.computed / max(self.real, 1)

    def describe(self) -> str:
        return (f"text-encoder padding {self.ratio:.3f} (tokens computed / real: {self.computed:,} / {self.real:,} "
                f"over {self.forwards} forwards; worst forward {self.worst:.3f})")


@dataclass
class Prepared:
    """One sample after the CPU work: decoded crop, cleaned captions, or the Result that ends it."""

    sample: Sample
    meta: dict[str, Any] = field(default_factory=dict)
    crop: bk.Crop | None = None
    pixels: Any = None                     # uint8 H x W x 3 (numpy; a torch tensor on the device after a GPU resize)
    texts: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    no_tokens: list[str] = field(default_factory=list)  # variants the text encoder's tokenizer makes 0 tokens of
    tokens: dict[str, tuple[list[int], bool]] = field(default_factory=dict)  # (ids, cut?), by a prepare process
    done: Result | None = None


class EncodeStage(MapStage):
    """Encode images (VAE mean/logvar) and caption variants (text encoder hidden states) into shards."""

    name = "encode"
    help = "VAE latents + text embeddings per caption variant (+ optional REPA features) -> encoded shards"
    config_cls = EncodeConfig
    owned = (EMPTY_PROMPT_FILE,)
    uses_model = True
    write_behind = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.batch_size = max(1, int(cfg.batch_size))
        self.prefetch_threads = max(1, int(cfg.decode_threads))
        self.prepare_processes = int(cfg.prepare_processes)
        self._record: dict[str, Any] | None = None
        self.padding = Padding()

    # ------------------------------------------------------------------ driver side
    def validate(self) -> None:
        cfg = self.cfg
        if not cfg.input:
            raise PrxError("--in is required: a folder of shards (ingest, filter or recaption output)")
        if not fs.exists(cfg.input):
            raise PrxError(f"input {cfg.input} does not exist")
        if not cfg.variants:
            raise PrxError("--variants needs at least one caption variant (e.g. original,long,short)")
        try:
            for v in cfg.variants:
                check_variant_name(v)
            bk.check_resolution(cfg.resolution, cfg.buckets)
        except ValueError as exc:
            raise PrxError(str(exc)) from None
        if len(set(cfg.variants)) != len(cfg.variants):
            raise PrxError(f"--variants lists a variant twice: {cfg.variants}")
        if cfg.max_length < 1:
            raise PrxError("--max-length must be at least 1")
        if cfg.repa_patch_size < 1:
            raise PrxError("--repa-patch-size must be at least 1")
        if cfg.prepare_processes and cfg.decode == "gpu":
            raise PrxError("--prepare-processes decodes on the CPU in its processes; with --decode gpu the decode "
                           "is on the device: use one or the other")
        self.record()

    def record(self) -> dict[str, Any]:
        """What `_stage.json` records about the encoders (read from configs; no weights loaded here)."""
        if self._record is None:
            from contract.encoders import repa as repa_mod
            from contract.encoders import text as text_mod
            from contract.encoders import vae as vae_mod

            cfg = self.cfg
            vinfo = pixel_info() if is_pixel_space(cfg.vae) else vae_mod.vae_info(vae_mod.vae_spec(cfg.vae))
            from contract.models import resolve

            tinfo = text_mod.text_info(resolve(cfg.text_encoder), cfg.max_length, cfg.cleaning)
            rinfo = None
            if cfg.repa:
                rinfo = repa_mod.repa_info(resolve(cfg.repa, repa_mod.DEFAULT_CLASS), cfg.repa_patch_size,
                                           vinfo["downsample"])
            self._record = {"format_version": FORMAT_VERSION, "vae": vinfo, "text_encoder": tinfo,
                            "variants": list(cfg.variants), "resolution": cfg.resolution, "buckets": cfg.buckets,
                            "repa": rinfo, "empty_prompt": EMPTY_PROMPT_FILE}
        return self._record

    def provenance(self) -> dict[str, Any]:
        return {"encoded": self.record(), **decode_provenance(self.cfg.decode)}

    # ------------------------------------------------------------------ worker side
    def models(self):
        """(vae, text encoder, teacher or None), loaded once per worker process."""
        cfg = self.cfg
        device = worker_device()
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda"))

        def load():
            from contract.encoders.repa import load_teacher
            from contract.encoders.text import load_text_encoder
            from contract.encoders.vae import load_vae

            vae = PixelSpace() if is_pixel_space(cfg.vae) else load_vae(cfg.vae, device, bf16)
            text = load_text_encoder(cfg.text_encoder, cfg.max_length, cfg.cleaning, device, bf16)
            teacher = (load_teacher(cfg.repa, cfg.repa_patch_size, vae.info["downsample"], device, bf16)
                       if cfg.repa else None)
            return vae, text, teacher

        key = ("encode", cfg.vae, cfg.text_encoder, cfg.max_length, cfg.cleaning, cfg.repa, cfg.repa_patch_size,
               device, bf16)
        return cached(key, load)

    def write_empty_prompt(self, text) -> None:
        """`_empty_prompt.safetensors` once per folder: atomic, and idempotent (same model, same bytes)."""
        from safetensors.torch import save

        path = fs.join(self.cfg.out, EMPTY_PROMPT_FILE)
        if fs.exists(path):
            return
        hidden = text.encode_empty_prompt()
        # no safetensors metadata: its key order is not stable, and _stage.json names the encoder
        fs.write_bytes_atomic(path, save({"hidden": hidden.contiguous()}))

    def process(self, task: Task, writer: ShardWriter) -> None:
        _vae, text, _teacher = self.models()
        self.write_empty_prompt(text)
        self.padding = Padding()
        super().process(task, writer)
        log.info("encode shard %06d: %s", task.index, self.padding.describe())

    def process_prepared(self, samples: list[Sample], task: Task, prepared: list[Prepared]) -> list[Result]:
        return self.encode_batch(prepared, *self.models())

    # ------------------------------------------------------------------ CPU part (threads or processes)
    def prepare(self, sample: Sample) -> Prepared:
        from contract.encoders.text import caption_tokens, cleaner

        p = Prepared(sample)
        try:
            p.meta = sample.meta()
        except BadMember as exc:
            p.done = reject(sample, "bad_member", str(exc))
            return p
        if not self._crop_on_device(sample, p):
            try:
                img, _info = sample.image(self.cfg.max_image_pixels)
            except ImageRejected as exc:
                p.done = reject(sample, exc.reason, exc.detail)
                return p
            p.crop = bk.plan_crop(img.width, img.height, self.cfg.resolution, self.cfg.buckets)
            p.pixels = bk.crop_resize(img, p.crop)
        clean = cached(("encode-cleaner", self.cfg.cleaning), lambda: cleaner(self.cfg.cleaning))
        for v in self.cfg.variants:
            raw = sample.text(caption_member(v))
            if raw is None:
                p.missing.append(v)
                continue
            cleaned = clean(raw)
            if not cleaned.strip():
                p.empty.append(v)
                continue
            p.texts[v] = cleaned
        if not p.texts:
            p.done = reject(sample, "no_caption_variant", self._missing_detail(p))
        elif self.prepare_processes:  # a process has its own tokenizer (threads would share one, not thread-safe)
            p.tokens = dict(zip(p.texts, caption_tokens(self._tokenizer(), list(p.texts.values()),
                                                        self.cfg.max_length)))
        return p

    def _tokenizer(self):
        from contract.encoders.text import load_tokenizer
        from contract.models import resolve

        name = self.cfg.text_encoder
        return cached(("encode-tokenizer", name), lambda: load_tokenizer(resolve(name)))

    def _crop_on_device(self, sample: Sample, p: Prepared) -> bool:
        """--decode gpu: the crop decoded and resized on the device (p.pixels a uint8 h x w x 3 tensor there);
        False when the device path does not take the image (the CPU path then decodes or rejects it)."""
        if self.cfg.decode != "gpu" or sample.image_member is None:
            return False
        got = on_device(sample.members[sample.image_member], self.cfg.max_image_pixels,
                        self.cfg.decode_device or worker_device())
        if got is None:
            return False
        img, info = got
        p.crop = bk.plan_crop(info.width, info.height, self.cfg.resolution, self.cfg.buckets)
        p.pixels = crop_on_device(img, p.crop)
        return True

    @staticmethod
    def _missing_detail(p: Prepared) -> str:
        parts = []
        if p.missing:
            parts.append("missing caption variant(s): " + ", ".join(p.missing))
        if p.empty:
            parts.append("empty after cleaning: " + ", ".join(p.empty))
        if p.no_tokens:
            parts.append("0 tokens for the text encoder: " + ", ".join(p.no_tokens))
        return "; ".join(parts)

    # ------------------------------------------------------------------ model part
    def _tokenize(self, prepared: list[Prepared], text) -> dict[tuple[int, str], tuple[list[int], bool]]:
        """(token ids as the text encoder gets them, truncated?) of every caption to encode: those a prepare
        process tokenised, the rest in one tokenizer call for the batch (`caption_tokens`). A caption the
        tokenizer makes 0 tokens of (one that adds no special tokens) has nothing to encode: the variant is
        dropped, and a sample left with none gets its `no_caption_variant` row."""
        from contract.encoders.text import caption_tokens

        items = [(i, v, t) for i, p in enumerate(prepared) if p.done is None for v, t in p.texts.items()]
        todo = [k for k, (i, v, _) in enumerate(items) if v not in prepared[i].tokens]
        here = dict(zip(todo, caption_tokens(text.tokenizer, [items[k][2] for k in todo], text.max_length)
                        if todo else []))
        tokens = {}
        for k, (i, v, _) in enumerate(items):
            p = prepared[i]
            x, cut = here[k] if k in here else p.tokens[v]
            tokens[(i, v)] = (x, cut)
            if not x:
                del p.texts[v]
                p.no_tokens.append(v)
                if not p.texts:
                    p.done = reject(p.sample, "no_caption_variant", self._missing_detail(p))
        return tokens

    def _encode_images(self, prepared: list[Prepared], todo: list[int], vae, teacher) -> tuple[dict, dict]:
        """({i: (mean, logvar, finite?)}, {i: REPA features}): one forward per bucket size, in chunks of
        batch_size; nothing to run in pixel space without a teacher."""
        latents: dict[int, tuple[Any, Any, bool]] = {}
        feats: dict[int, Any] = {}
        if isinstance(vae, PixelSpace) and teacher is None:
            return latents, feats
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in todo:
            by_size.setdefault(prepared[i].crop.size, []).append(i)
        for size in sorted(by_size):
            idx = by_size[size]
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                pixels = bk.to_tensor([prepared[i].pixels for i in chunk])
                if not isinstance(vae, PixelSpace):
                    mean, logvar = vae.encode(pixels)
                    finite = (mean.isfinite().flatten(1).all(1) & logvar.isfinite().flatten(1).all(1)).tolist()
                    for j, i in enumerate(chunk):
                        latents[i] = (mean[j].contiguous(), logvar[j].contiguous(), finite[j])
                if teacher is not None:
                    f = teacher.features(pixels)
                    for j, i in enumerate(chunk):
                        feats[i] = f[j].contiguous()
        return latents, feats

    def _encode_texts(self, items: list[tuple[int, str, str, list[int]]], text) -> dict[tuple[int, str], Any]:
        """Hidden states of each (sample, variant, caption, token ids); one forward per batch_size
        captions, sorted by length so a forward pads little (its padding counted in `self.padding`)."""
        items = sorted(items, key=lambda x: (-len(x[2]), x[0], x[1]))
        hidden: dict[tuple[int, str], Any] = {}
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            tok = text.pad([x[3] for x in chunk])
            self.padding.add(int(tok["attention_mask"].sum()), tok["input_ids"].numel())
            for (i, v, _, _), h in zip(chunk, text.encode_tokens(tok)):
                hidden[(i, v)] = h
        return hidden

    def encode_batch(self, prepared: list[Prepared], vae, text, teacher) -> list[Result]:
        from safetensors.torch import save

        tokens = self._tokenize(prepared, text)
        todo = [i for i, p in enumerate(prepared) if p.done is None]
        latents, feats = self._encode_images(prepared, todo, vae, teacher)
        hidden = self._encode_texts([(i, v, t, tokens[(i, v)][0]) for i in todo
                                     for v, t in prepared[i].texts.items()], text)

        results = []
        vrec = {k: vae.info[k] for k in ("name", "id", "revision", "subfolder", "scaling_factor", "shift_factor",
                                         "latent_channels") if k in vae.info}
        trec = {k: text.info[k] for k in ("name", "id", "revision", "max_length", "cleaning") if k in text.info}
        compute = "bfloat16-autocast" if vae.bf16 else "float32"
        for i, p in enumerate(prepared):
            if p.done is not None:
                results.append(p.done)
                continue
            image = self.image_members(p, latents.get(i))
            if not isinstance(image, tuple):
                results.append(image)
                continue
            members, shape = image
            enc: dict[str, Any] = {
                "vae": {**vrec, "dtype": vae.info["dtype"], "compute": compute},
                "latent": {**p.crop.meta(), "buckets": self.cfg.buckets, "shape": shape},
                "text_encoder": {**trec, "compute": compute},
                "captions": {},
            }
            for v in self.cfg.variants:
                if v not in p.texts:
                    continue
                h = hidden[(i, v)]
                members[embedding_member(v)] = save({"hidden": h})
                enc["captions"][v] = {"member": embedding_member(v), "source": caption_member(v),
                                      "tokens": int(h.shape[0]),
                                      "truncated": tokens[(i, v)][1]}
            if p.missing or p.empty or p.no_tokens:
                enc["missing_variants"] = sorted(p.missing + p.empty + p.no_tokens)
            if teacher is not None:
                members[REPA_MEMBER] = save({"features": feats[i]})
                gh, gw = teacher.grid(*p.crop.size)
                enc["repa"] = {k: teacher.info[k] for k in ("name", "id", "revision") if k in teacher.info}
                enc["repa"].update({"grid": [gh, gw], "shape": list(feats[i].shape), "compute": compute})
            meta = dict(p.meta)
            meta["encoders"] = enc
            drop = tuple(m for m in p.sample.members
                         if m in (LATENT_MEMBER, PIXELS_MEMBER, REPA_MEMBER) or variant_of_member(m) is not None)
            if self.cfg.drop_images and p.sample.image_member:
                drop += (p.sample.image_member,)
            members["json"] = dumps_json(meta)
            results.append(keep(p.sample, members=members, detail=self._missing_detail(p), drop=drop))
        return results

    @staticmethod
    def image_members(p: Prepared, latent) -> tuple[dict[str, bytes], list[int]] | Result:
        """The image in the encoded space, with its shape: the VAE posterior (mean, logvar, finite?), or in pixel
        space (no latent) the crop itself; a `nonfinite_latent` row for a posterior with NaN or infinite values."""
        from safetensors.torch import save

        if latent is None:
            pixels = p.pixels.cpu().numpy() if hasattr(p.pixels, "cpu") else p.pixels   # a GPU crop: to the host
            return {PIXELS_MEMBER: encode_image(pixels)}, [3, *p.crop.size]
        mean, logvar, finite = latent
        if not finite:
            return reject(p.sample, "nonfinite_latent", f"crop {p.crop.box} at {p.crop.size}")
        return {LATENT_MEMBER: save({"mean": mean, "logvar": logvar})}, list(mean.shape)


STAGE = EncodeStage
