"""Baseline: the same call in a native CPython subprocess.

Loads the functions the way a user would without host (the notebook's definitions imported,
top-level code skipped: here, exactly the source host extracted into the bundle), calls the
function with the input file's arguments and prints the result as JSON.

    python native_call.py BUNDLE FUNCTION INPUT [REPEAT]

With REPEAT, it calls the function that many times in this process and prints how long each
call took instead (the bench's floor: the function's own time, first call and warm).
"""

import json
import sys
import time
import types


def main(bundle_path, function, input_path, repeat=None):
    with open(bundle_path) as f:
        bundle = json.load(f)
    module = types.ModuleType("notebook")
    for chunk in bundle["chunks"]:
        exec(compile(chunk["text"], f"cell {chunk['cell']}", "exec"), module.__dict__)
    with open(input_path) as f:
        call = json.load(f)
    if repeat is not None:
        # How long the function itself takes, call after call in this one process (ms).
        times = []
        for _ in range(int(repeat)):
            started = time.perf_counter()
            getattr(module, function)(*call.get("args", []), **call.get("kwargs", {}))
            times.append((time.perf_counter() - started) * 1000)
        print(json.dumps(times))
        return
    value = getattr(module, function)(*call.get("args", []), **call.get("kwargs", {}))
    if hasattr(value, "to_dict"):
        value = value.to_dict("records")
    print(json.dumps(value, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
