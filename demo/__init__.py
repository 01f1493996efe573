"""`make demo`: the whole project end to end on bundled photos, offline, with tiny random models.

It runs both `prx-data` and `prx-train`, so it lives outside `pipeline/` (which never imports the trainer).
`python -m demo [FOLDER]` runs `demo.main.STEPS` in order.
"""
