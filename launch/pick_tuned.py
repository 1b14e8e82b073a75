"""Prints, as MEGAFIRE_FUSED_CONFIGS JSON, the fastest launch configs one encoding got in a
``megafire bench attention --tune --json X.json`` run (rows in X_tune.json): the best forward
and the best backward candidate, each with its own mask-skip flag.
Usage: python3 launch/pick_tuned.py X_tune.json ENCODING"""
import json
import sys

rows = [r for r in json.load(open(sys.argv[1])) if r["enc"] == sys.argv[2]]
if not rows:
    sys.exit(f"no tuning rows for {sys.argv[2]} in {sys.argv[1]}")
out = {}
for d in sorted({r["D"] for r in rows}):
    fwd = min((r for r in rows if r["D"] == d and "fwd" in r["cfg"]), key=lambda r: r["ms"])
    bwd = min((r for r in rows if r["D"] == d and "dq" in r["cfg"]), key=lambda r: r["ms"])
    out[str(d)] = {"fwd": fwd["cfg"]["fwd"], "skip_fwd": bool(fwd["cfg"]["skip"]), "dq": bwd["cfg"]["dq"],
                   "dkdv": bwd["cfg"]["dkdv"], "skip_bwd": bool(bwd["cfg"]["skip"])}
print(json.dumps(out))
