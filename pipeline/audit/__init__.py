"""`prx-data audit`: caption statistics per dataset, source and caption variant, as a report people look at.

stats.py       per-group mergeable accumulators (the map phase's partial state and the reduce)
funnel.py      the ledger funnel, walking back through `_stage.json` inputs
report_html.py the self-contained HTML report (matplotlib, base64 PNG, plotted values embedded as JSON)
gate.py        `--fail-on` rules
The command itself is `pipeline/stages/audit.py`.
"""
