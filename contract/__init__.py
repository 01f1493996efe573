"""The data contract: what every layer shares and no layer owns. Config dataclasses and their YAML, paths
(fs), image decoding, model loading, the shard reader and writer, the ledger, encoded shards and how they
are made (encoders/), errors and folder locks. It imports nothing from pipeline/, filters/, captioners/ or
trainer/."""
