"""One shard writer and one safe shard reader for the whole project (ARCHITECTURE.md, "Reading safely").

layout.py      shard names (`NNNNNN.tar` beside its `NNNNNN.parquet` ledger), member names `{key}.{member}`
writer.py      `ShardWriter`: byte-identical tars published atomically, ledger first; a full disk is `OutOfSpace`
reader.py      `read_shard`: the samples of a shard and a `Problem` for everything else, never decoding by itself
sample.py      `Sample` (raw member bytes, decoded only through its methods) and `Problem` (one ledger row)
caps.py        `MemberCaps`: the largest member of each kind the reader accepts
formats.py     the member formats parsed here: JSON within caps, safetensors; `BadMember` when one does not parse
localfile.py   a local shard opened once (pread, or read whole when small) and its lazily read `Members`
tarheaders.py  the quick pass over a plain local shard's tar headers (anything else is walked by `tarfile`)
damage.py      after the headers: an unreadable region's `truncated_tar` rows, `shard_damage` against the ledger

docs/reader.md has the checks, caps and reason codes. The names below are the package's public ones; tuning
constants (`localfile.WHOLE_SHARD`, `damage.TAIL_CHUNK`) live in, and are patched on, their own module.
"""
from contract.shards.caps import MemberCaps
from contract.shards.damage import shard_damage
from contract.shards.formats import JSON_MAX_BYTES, JSON_MAX_DEPTH, BadMember, dumps_json, load_safetensors, parse_json
from contract.shards.layout import list_shards, shard_done, shard_index, shard_name
from contract.shards.localfile import Members
from contract.shards.reader import read_shard
from contract.shards.sample import Problem, Sample
from contract.shards.writer import OutOfSpace, ShardWriter, disk_full

__all__ = ["BadMember", "JSON_MAX_BYTES", "JSON_MAX_DEPTH", "MemberCaps", "Members", "OutOfSpace", "Problem",
           "Sample", "ShardWriter", "disk_full", "dumps_json", "list_shards", "load_safetensors", "parse_json",
           "read_shard", "shard_damage", "shard_done", "shard_index", "shard_name"]
