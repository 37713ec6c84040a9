"""Baseline: the same call through papermill, as teams run notebooks in production today.

Writes a parameterised copy of the notebook (a `parameters` cell, the source host extracted
into the bundle, and a cell that calls the function and saves its result), then times
`papermill` executing it, in a subprocess, the way a scheduler would.

    python papermill_call.py BUNDLE FUNCTION INPUT WORKDIR
"""

import json
import os
import subprocess
import sys


def cell(source, tags=()):
    return {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": source,
            "outputs": [], "execution_count": None}


def main(bundle_path, function, input_path, workdir):
    with open(bundle_path) as f:
        bundle = json.load(f)
    out = os.path.join(workdir, "result.json")
    cells = [cell("input_path = ''\nresult_path = ''", tags=["parameters"])]
    cells += [cell(chunk["text"]) for chunk in bundle["chunks"]]
    cells.append(cell(
        "import json\n"
        "call = json.load(open(input_path))\n"
        f"value = {function}(*call.get('args', []), **call.get('kwargs', {{}}))\n"
        "value = value.to_dict('records') if hasattr(value, 'to_dict') else value\n"
        "json.dump(value, open(result_path, 'w'), default=str)\n"
    ))
    notebook = {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}
    source = os.path.join(workdir, "parameterised.ipynb")
    with open(source, "w") as f:
        json.dump(notebook, f)
    subprocess.run(
        [sys.executable, "-m", "papermill", "--log-level", "ERROR", source, os.path.join(workdir, "executed.ipynb"),
         "-p", "input_path", input_path, "-p", "result_path", out],
        check=True, stdout=subprocess.DEVNULL,
    )
    with open(out) as f:
        print(f.read())


if __name__ == "__main__":
    main(*sys.argv[1:])
