"""The length-generalization study (issue 14): every arm trained on the study corpus, evaluated
past the training length, reported as JSON + table + plot and logged to MLflow.

plan.py (arms, seeds, data, eval settings) -> runner.py (training and evaluation
subprocesses, resumable) -> evaluate.py (one run: perplexity vs length per held-out set,
RoPE PI/YaRN at inference, passkey) -> report.py (study.json / .md / .png) -> tracking.py
(MLflow, afterwards, from the run directories or the exported tarball). CLI: cli.py.
"""
