"""Baseline: the same call in a native CPython subprocess.

Loads the functions the way a user would without host (the notebook's definitions imported,
top-level code skipped: here, exactly the source host extracted into the bundle), calls the
function with the input file's arguments and prints the result as JSON.

    python native_call.py BUNDLE FUNCTION INPUT
"""

import json
import sys
import types


def main(bundle_path, function, input_path):
    with open(bundle_path) as f:
        bundle = json.load(f)
    module = types.ModuleType("notebook")
    for chunk in bundle["chunks"]:
        exec(compile(chunk["text"], f"cell {chunk['cell']}", "exec"), module.__dict__)
    with open(input_path) as f:
        call = json.load(f)
    value = getattr(module, function)(*call.get("args", []), **call.get("kwargs", {}))
    if hasattr(value, "to_dict"):
        value = value.to_dict("records")
    print(json.dumps(value, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
