"""Baselines for `make bench`'s serving figures: a notebook's functions behind a plain Python
HTTP server, the way a team serves them today without host.

    python native_server.py NOTEBOOK            # (b) in-process: no isolation at all
    python native_server.py NOTEBOOK --fresh    # (c) each call in a fresh `python` process

Both answer `POST /call/FUNCTION` with a body `{"args": [...], "kwargs": {...}}` and answer
`{"result": VALUE}`, over HTTP/1.1 with keep-alive, one thread per connection
(`ThreadingHTTPServer`). They listen on a free loopback port and print
`listening on http://127.0.0.1:PORT` on stdout once they can be called.

The notebook's functions are loaded as notebook importers do (`ipynb.fs.defs`, nbimporter):
of each code cell, only the top-level imports, `def`s, classes and ALL_CAPS assignments run,
once, in one module; IPython's `%` and `!` lines are dropped first, as plain Python cannot
parse them. With `--fresh`, each call starts `python native_server.py NOTEBOOK --call
FUNCTION`, which loads the notebook (importing pandas) and calls the function with the
body read from stdin: a fresh process per call, which is the isolation users get today.
"""

import ast
import json
import subprocess
import sys
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def kept(statement):
    """Whether a notebook importer runs this top-level statement."""
    if isinstance(statement, KEPT):
        return True
    return isinstance(statement, ast.Assign) and all(
        isinstance(t, ast.Name) and t.id.isupper() for t in statement.targets
    )


def load(notebook_path):
    """The notebook's definitions, imports and constants, run in a new module."""
    with open(notebook_path) as f:
        notebook = json.load(f)
    module = types.ModuleType("notebook")
    for number, cell in enumerate(notebook["cells"], 1):
        if cell["cell_type"] != "code":
            continue
        source = cell["source"]
        source = "".join(source) if isinstance(source, list) else source
        if source.lstrip().startswith("%%"):
            continue
        lines = [
            "" if line.lstrip().startswith(("%", "!")) else line
            for line in source.splitlines()
        ]
        tree = ast.parse("\n".join(lines))
        tree.body = [s for s in tree.body if kept(s)]
        exec(compile(tree, f"cell {number}", "exec"), module.__dict__)
    return module


def call(module, function, body):
    """`function(*args, **kwargs)` from a request body, as the JSON text of the answer."""
    request = json.loads(body)
    value = getattr(module, function)(*request.get("args", []), **request.get("kwargs", {}))
    if hasattr(value, "to_dict"):
        value = value.to_dict("records")
    return json.dumps({"result": value}, default=str)


def serve(notebook_path, fresh):
    module = None if fresh else load(notebook_path)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: with Nagle on, the second waits for the
        # client's delayed ACK (40 ms on Linux) and the baseline would measure that.
        disable_nagle_algorithm = True

        def do_POST(self):
            function = self.path.removeprefix("/call/")
            body = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                if fresh:
                    answer = subprocess.run(
                        [sys.executable, __file__, notebook_path, "--call", function],
                        input=body,
                        capture_output=True,
                        check=True,
                    ).stdout
                else:
                    answer = call(module, function, body).encode()
                status = 200
            except Exception as e:  # the baseline answers a failure, as any server would
                answer, status = json.dumps({"error": repr(e)}).encode(), 500
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


def main(args):
    if len(args) == 3 and args[1] == "--call":
        sys.stdout.write(call(load(args[0]), args[2], sys.stdin.buffer.read()))
    elif len(args) in (1, 2) and args[1:] in ([], ["--fresh"]):
        serve(args[0], fresh=len(args) == 2)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
