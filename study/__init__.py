"""`prx-study`: a whole ablation table from one file (docs/study.md).

spec.py reads and checks the study file, plan.py turns it into runs (a train config and evaluation steps each),
execute.py runs them (local or Slurm through submitit) and knows which are done, report.py builds the table
with the baseline's seed noise, cli.py is the command. A study drives `prx-train`, `prx-eval` and `prx-sample`
as subprocesses and reads their files (RUN/summary.json, RUN/eval/step-N/metrics.json); nothing imports it.
"""
