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


def small(trace):
    """The trace's JSON with its events cut to a few of each call: the fuzzer runs faster on
    small inputs, and mutates what is left."""
    kept, seen = [], {}
    for e in trace["events"]:
        seen[e["call"]] = seen.get(e["call"], 0) + 1
        if seen[e["call"]] <= 3 or e["call"] == "fd_prestat_dir_name":
            kept.append(e)
    trace["events"] = kept
    used = json.dumps(kept) + json.dumps(trace["outputs"])
    trace["blobs"] = {k: v for k, v in trace["blobs"].items() if k in used}
    return json.dumps(trace).encode()


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
        seed("trace", f"{name}.json", b"\x00" + small(json.loads(zlib.decompress(body, -15))))
    trace = json.loads(small(json.loads(zlib.decompress(body, -15))))
    b64 = lambda b: {"inline": __import__("base64").b64encode(b).decode()}
    dirent = lambda name, kind: (b"\0" * 16 + len(name).to_bytes(4, "little") + bytes([kind])
                                 + b"\0" * 3 + name)
    trace["header"]["grants"] = [{"guest": "/data", "writable": False}]
    trace["events"] = [
        {"call": "fd_prestat_dir_name", "args": [4, 0, 5], "result": 0, "writes": [[0, b64(b"/data")]]},
        {"call": "path_open", "args": [4, 1, 0, 3, 2, 0, 0, 0, 0], "result": 0, "path": "sub",
         "writes": [[0, b64((6).to_bytes(4, "little"))]]},
        {"call": "fd_readdir", "args": [6, 0, 128, 0, 0], "result": 0,
         "writes": [[0, b64(dirent(b".", 3) + dirent(b"a.csv", 4) + dirent(b"deeper", 3))], [0, b64(b"\x48\0\0\0")]]},
        {"call": "path_open", "args": [4, 1, 0, 9, 0, 0, 0, 0, 0], "result": 0, "path": "./sub/a.csv",
         "writes": [[0, b64((5).to_bytes(4, "little"))]]},
        {"call": "fd_read", "args": [5, 0, 1, 0], "result": 0, "writes": [[0, b64(b"a,b\n1,2\n")], [0, b64(b"\x08\0\0\0")]]},
        {"call": "fd_seek", "args": [5, 100, 0, 0], "result": 0, "writes": [[0, b64((100).to_bytes(8, "little"))]]},
        {"call": "fd_read", "args": [5, 0, 1, 0], "result": 0, "writes": [[0, b64(b"3,4\n")], [0, b64(b"\x04\0\0\0")]]},
        {"call": "fd_pread", "args": [5, 0, 1, 50, 0], "result": 0, "writes": [[0, b64(b"x")], [0, b64(b"\x01\0\0\0")]]},
        {"call": "clock_time_get", "args": [1, 1000, 0], "result": 0, "writes": [[0, b64((123456789).to_bytes(8, "little"))]]},
        {"call": "random_get", "args": [0, 4], "result": 0, "writes": [[0, b64(b"\1\2\3\4")]]},
    ]
    seed("trace", "files.json", b"\x00" + json.dumps(trace).encode())
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
