"""What `prx-data download` adds around img2dataset.

- `net`:      the urllib opener img2dataset's downloader uses inside prx tasks (user agent, byte cap,
              private-address guard) and the mapping of its error strings to ledger reason codes.
- `engine`:   runs img2dataset's own `Downloader` over one chunk of URLs into a temporary folder.
- `urllist`:  reads URL lists (parquet, csv, tsv, jsonl, txt).
- `sample`:   a raw sample's content key and caption text (shared with `prx-data ingest`).
- `report`:   `prx-data download-report`.
- `serve`:    a small loopback HTTP image server (demo, benchmark, tests).
"""
