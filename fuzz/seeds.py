"""Writes fuzz/corpus/<target>/: the seed corpus `make fuzz` starts from.

Run from the repository's root, once, after `make prepare`:
    python3 fuzz/seeds.py
It records a call and makes a bundle with target/release/host, and takes the analysis of
notebooks/churn.ipynb from host's cache (where `host bundle` left it). Seeds are named by
what they are, so re-running rewrites the same files.
"""

import glob
import json
import os
import subprocess
import tempfile
import zlib

HOST = "target/release/host"
CORPUS = "fuzz/corpus"


def seed(target, name, data):
    os.makedirs(f"{CORPUS}/{target}", exist_ok=True)
    with open(f"{CORPUS}/{target}/{name}", "wb") as f:
        f.write(data)


def host(*args):
    subprocess.run([HOST, *args], check=True, stdout=subprocess.DEVNULL)


def main():
    tmp = tempfile.mkdtemp()
    for nb in sorted(glob.glob("notebooks/*.ipynb")):
        seed("notebook", os.path.basename(nb), open(nb, "rb").read())
    seed("notebook", "minimal.ipynb", b'{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": []}')

    host("bundle", "notebooks/churn.ipynb", "-o", f"{tmp}/churn.bundle")
    bundle = open(f"{tmp}/churn.bundle", "rb").read()
    seed("bundle", "churn.bundle", bundle)

    # The trace target's first byte: even for the trace's JSON, odd for a trace file.
    # scoring reads its model from a grant: the recorded files replay rebuilds.
    calls = {
        "churn": ["notebooks/churn.ipynb", "process", "--input", "notebooks/churn-input.json"],
        "scoring": ["notebooks/scoring.ipynb", "predict", "--input", "notebooks/scoring-input.json",
                    "--grant", "notebooks/models:/models:ro"],
    }
    for name, call in calls.items():
        host("run", *call, "--record", f"{tmp}/{name}.trace")
        trace = open(f"{tmp}/{name}.trace", "rb").read()
        body = trace.split(b"\n", 2)[2]
        seed("trace", f"{name}.json", b"\x00" + zlib.decompress(body, -15))
    seed("trace", "churn.trace", b"\x01" + open(f"{tmp}/churn.trace", "rb").read())

    argv = [
        ["run", "notebooks/churn.ipynb", "process", "--input", "notebooks/churn-input.json"],
        ["run", "nb.ipynb", "f", "--args", '[1, "a", {"b": [null]}]', "--kwargs", '{"n": 3}',
         "--grant", "./models:/models:ro", "--grant", "/tmp/out:/out/:rw", "--env", "A=b=c",
         "--memory", "512MiB", "--timeout", "1.5m", "--max-output", "16k", "--envelope"],
        ["run", "nb.ipynb", "f", "--timeout", "500ms", "--no-image", "--record", "x.trace"],
        ["bundle", "nb.ipynb", "-o", "x.bundle", "--warm-up", "process=in.json"],
        ["inspect", "nb.ipynb"],
        ["replay", "x.trace", "--notebook", "new.ipynb"],
        ["--runtime", "rt", "--cache-dir", "c", "prepare"],
        ["--help"],
    ]
    for i, a in enumerate(argv):
        seed("args", f"argv-{i}", "\0".join(a).encode())
    seed("args", "input.json", open("notebooks/churn-input.json", "rb").read())

    seed("door", "asks", b"\0".join(json.dumps({"op": op}).encode()
                                    for op in ["input", "bundle", "warm_up", "call"]))
    seed("door", "result", b'{"op": "result", "value": {"a": [1, 2.5, "x", null, true]}}')
    seed("door", "error", json.dumps({
        "op": "error", "phase": "call", "type": "ValueError", "message": "bad", "frames": [
            {"file": "churn.ipynb", "cell": 3, "line": 2, "function": "process", "text": "x"}],
    }).encode())
    # The analysis `host bundle` cached for notebooks/churn.ipynb: the guest's `output` message.
    cache = os.environ.get("HOST_CACHE_DIR", os.path.expanduser("~/.cache/host"))
    for path in sorted(glob.glob(f"{cache}/analysis/*.json")):
        analysis = json.load(open(path))
        if any(s.get("name") == "to_units" for c in analysis["cells"] for s in c["statements"]):
            seed("door", "output-churn", json.dumps({"op": "output", **analysis}).encode())
            break
    else:
        raise SystemExit("no cached analysis of notebooks/churn.ipynb: run `host bundle` on it")


main()
