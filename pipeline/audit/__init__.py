"""`prx-data audit`: caption statistics per dataset, source and caption variant, as a report people look at.

state.py       `AuditParams` and one group's mergeable `GroupState` (what the map hands the reduce, as safetensors)
scan.py        the map: one shard's captions of one group -> a `GroupState`
sketches.py    hashes and mergeable sketches: distinct counts (exact, then HyperLogLog), top-k, MinHash and LSH
figures.py     the reduce: `GroupAcc` merges a group's states and turns them into the reported figures
kernels.py     the compiled loops (numba): MinHash band keys, distinct words per caption
funnel.py      the ledger funnel, walking back through `_stage.json` inputs
report_html.py the self-contained HTML report (matplotlib, base64 PNG, plotted values embedded as JSON)
gate.py        `--fail-on` rules
The command itself is `pipeline/stages/audit.py`.
"""
