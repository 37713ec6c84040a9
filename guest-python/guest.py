"""host's half inside the sandbox.

The host runs this file as the first turn of a fresh interpreter, then a turn that starts
with `_start(PROTOCOL)` and calls `analyse()`; or `load()` then `invoke()`; or, to make a
bundle's pre-initialised image, `load()`, `warm_up()` then `freeze()`, after which each call
from the image runs only `invoke()`. Everything crosses the door (`_host.call`) as JSON: the
guest asks for its input and hands back its answer, so the host boundary sees (and a trace can
record) every byte that goes in or out. The messages, their shapes and the protocol version
are documented in host's `door.rs`; answers are checked against `_ANSWERS` here.

Why the parsing happens here and not in Rust: the grammar that decides what a cell means must
be the grammar of the interpreter that will run it, so a notebook written for Python 3.15
syntax is read by Python 3.15.
"""

import ast
import builtins
import datetime
import decimal
import gc
import json
import linecache
import re
import symtable
import sys
import traceback
import types

import _host

# A line magic or shell line, possibly assigned (`files = !ls`, `t = %time f()`).
_MAGIC_LINE = re.compile(
    r"^(?P<indent>[ \t]*)(?:(?P<target>[A-Za-z_][\w.]*)\s*=\s*)?(?P<sigil>%{1,2}|!(?!=))\S"
)
_CONSTANT = re.compile(r"^_*[A-Z][A-Z0-9_]*$")
# Scopes whose body runs where they are written; other nested scopes (functions, lambdas,
# annotations) run later, when the function is called.
_EAGER_SCOPES = {"module", "class", "listcomp", "setcomp", "dictcomp", "genexpr"}


# The door protocol's version: host's `door.rs` names the same, and every driving turn starts
# with `_start(VERSION)`. The messages are documented there.
PROTOCOL = 1


def _start(protocol):
    """Refuse a host that speaks another version of the door protocol than this guest."""
    if protocol != PROTOCOL:
        raise RuntimeError(f"host speaks door protocol {protocol!r}, this guest speaks {PROTOCOL}")


def _door(request):
    """Send one JSON request to the host and decode its JSON answer (None for no answer)."""
    answer = _host.call(json.dumps(request, separators=(",", ":")).encode())
    return json.loads(answer) if answer else None


# The shapes of host's answers: a type, `[shape]` (a list of it), `{str: shape}` (a mapping
# with string keys), or `{"field": shape, ...}` (an object with exactly these fields).
_ANSWERS = {
    "input": {"cells": [{"index": int, "source": str, "export": bool}]},
    "bundle": {"notebook": str, "chunks": [{"cell": int, "text": str}]},
    "warm_up": [{"function": str, "args": list, "kwargs": {str: object}}],
    "call": {"function": str, "env": {str: str}, "args": list, "kwargs": {str: object}},
}


class ProtocolError(Exception):
    """host answered with something the protocol does not allow: a bug on one side."""


def _ask(op):
    """Ask host for `op`'s answer, checked against the shape the protocol gives it."""
    answer = _door({"op": op})
    _check(answer, _ANSWERS[op], op)
    return answer


def _check(value, shape, where):
    if isinstance(shape, type):
        if not isinstance(value, shape) or (shape is int and isinstance(value, bool)):
            raise ProtocolError(f"host's `{where}` is a {type(value).__name__}, not a {shape.__name__}")
    elif isinstance(shape, list):
        _check(value, list, where)
        for i, item in enumerate(value):
            _check(item, shape[0], f"{where}[{i}]")
    elif str in shape:
        _check(value, dict, where)
        for key, item in value.items():
            _check(item, shape[str], f"{where}[{key!r}]")
    else:
        _check(value, dict, where)
        if set(value) != set(shape):
            raise ProtocolError(f"host's `{where}` has fields {sorted(value)}, not {sorted(shape)}")
        for key, item in value.items():
            _check(item, shape[key], f"{where}.{key}")


# ---------------------------------------------------------------------------------------------
# Analysis: what each top-level statement of each cell is, binds and uses.


def _strip_magics(source):
    """The cell's text with each magic or shell line replaced by `pass` at the same indent (or
    `name = None` for `name = !cmd`, so the name is still known to be bound by dropped code),
    so the rest parses and keeps its line numbers; and the numbers of the replaced lines with
    what they were (a magic or a shell line)."""
    lines = source.split("\n")
    magics = {}
    for i, line in enumerate(lines):
        m = _MAGIC_LINE.match(line)
        if m:
            magics[i + 1] = "shell" if m.group("sigil") == "!" else "magic"
            stand_in = f"{m.group('target')} = None" if m.group("target") else "pass"
            # Padded to the original length so column offsets after it stay meaningful.
            lines[i] = (m.group("indent") + stand_in).ljust(len(line))
    return "\n".join(lines), magics


def _statement_span(stmt):
    """(first line, first column, last line, end column) of a statement, decorators included."""
    first = stmt
    for dec in getattr(stmt, "decorator_list", ()):
        if dec.lineno < first.lineno or (
            dec.lineno == first.lineno and dec.col_offset < first.col_offset
        ):
            first = dec
    line, col = first.lineno, first.col_offset
    if first is not stmt:
        col = max(col - 1, 0)  # the `@` before the decorator's expression
    return line, col, stmt.end_lineno, stmt.end_col_offset


def _segment(lines, span):
    """The source of a span, as one top-level snippet symtable can read."""
    first, col, last, end_col = span
    raw = [line.encode() for line in lines[first - 1 : last]]
    if len(raw) == 1:
        raw[0] = raw[0][col:end_col]
    else:
        raw[0] = raw[0][col:]
        raw[-1] = raw[-1][:end_col]
    return b"\n".join(raw).decode()


def _scope_kind(table):
    kind = table.get_type()
    return getattr(kind, "value", kind)


def _uses(source):
    """The global names a statement reads: (eager, lazy). Eager names are read when the
    statement runs (an assignment's value, decorators, defaults, base classes); lazy ones only
    when a function it defines is called."""
    eager, lazy = set(), set()

    def walk(table, is_eager):
        kind = _scope_kind(table)
        here_eager = is_eager and kind in _EAGER_SCOPES
        for sym in table.get_symbols():
            if not sym.is_referenced():
                continue
            if kind == "module" or sym.is_global():
                (eager if here_eager else lazy).add(sym.get_name())
        for child in table.get_children():
            walk(child, here_eager)

    walk(symtable.symtable(source, "<statement>", "exec"), True)
    return eager, lazy


def _binds(source):
    """The module-level names a statement binds."""
    table = symtable.symtable(source, "<statement>", "exec")
    return {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}


def _kind(stmt, exported):
    """Whether a top-level statement is kept, and why."""
    if exported:
        return "export"
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return "import"
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return "definition"
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = []
        for target in targets:
            elts = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
            names.extend(elts)
        if names and all(isinstance(n, ast.Name) and _CONSTANT.match(n.id) for n in names):
            if isinstance(stmt, ast.AnnAssign) and stmt.value is None:
                return "code"
            return "constant"
    return "code"


def _analyse_cell(cell):
    source = cell["source"]
    first = source.lstrip().split("\n", 1)[0]
    if first.startswith("%%"):
        return {"index": cell["index"], "cell_magic": first.split()[0], "statements": []}
    text, magics = _strip_magics(source)
    try:
        return _analyse_statements(cell, text, magics)
    except SyntaxError as e:
        problem = {"line": e.lineno or 1, "message": e.msg}
    except (RecursionError, MemoryError) as e:
        # Nesting too deep for the parser (or symtable) is as unparseable as a syntax error:
        # the cell is dropped, and the notebook's other functions stay callable.
        problem = {"line": 1, "message": f"too deeply nested to parse ({type(e).__name__})"}
    return {"index": cell["index"], "syntax_error": problem, "statements": []}


def _analyse_statements(cell, text, magics):
    tree = ast.parse(text, filename=f"cell {cell['index']}")
    lines = text.split("\n")
    statements = []
    for stmt in tree.body:
        span = _statement_span(stmt)
        kind = _kind(stmt, cell.get("export", False))
        if span[0] in magics:
            kind = magics[span[0]]
        snippet = _segment(lines, span)
        eager, lazy = _uses(snippet)
        body_magics = [n for n in magics if span[0] < n <= span[2]]
        statements.append(
            {
                "span": list(span),
                "kind": kind,
                "name": getattr(stmt, "name", None),
                "function": isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)),
                "binds": sorted(_binds(snippet)),
                "star_import": isinstance(stmt, ast.ImportFrom)
                and any(a.name == "*" for a in stmt.names),
                "eager": sorted(eager),
                "lazy": sorted(lazy - eager),
                "magic_lines": body_magics,
            }
        )
    return {"index": cell["index"], "text": text, "statements": statements}


def analyse():
    """Answer the host's `analyse` request: every code cell, statement by statement."""
    request = _ask("input")
    cells = [_analyse_cell(cell) for cell in request["cells"]]
    _door({"op": "output", "cells": cells, "builtins": sorted(dir(builtins))})


# ---------------------------------------------------------------------------------------------
# Calls: load a bundle's source, call one function, hand back its value as JSON.

_GUEST_FILE = (lambda: None).__code__.co_filename
_module = None
_notebook = None
_cell_files = {}


def load():
    """Run the bundle's kept source, cell by cell, in a fresh module named after the notebook.

    Each cell is compiled under the name `NOTEBOOK, cell N` with its own line numbers, so a
    traceback points at the notebook, not at a generated file."""
    global _module, _notebook
    bundle = _ask("bundle")
    _notebook = bundle["notebook"]
    _module = types.ModuleType("__notebook__")
    _module.__file__ = _notebook
    sys.modules["__notebook__"] = _module
    try:
        for chunk in bundle["chunks"]:
            filename = f"{_notebook}, cell {chunk['cell']}"
            _cell_files[filename] = chunk["cell"]
            text = chunk["text"]
            linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
            exec(compile(text, filename, "exec"), _module.__dict__)
    except BaseException as e:
        _report_exception(e, "load")
        return False
    return True


# How many times the warm-up samples are called, in turn. CPython specialises a function's
# bytecode over its first few calls, not at once: the pandas example's `process()` takes
# 4.2 ms on its second call in the sandbox and 3.8 ms on its fifth.
_WARM_UP_ROUNDS = 3


def warm_up():
    """Between load and freeze when the bundle asks for it (`host bundle --warm-up`): call its
    functions on the sample inputs it carries, all of them in turn, three times over, so the
    one-time work of the first calls (imports inside functions, caches filled on first use,
    the interpreter specialising its bytecode) is done in the image, and converts their
    results as a call's would be (warming that path for the kinds of value the function
    returns). What these calls leave in module state is where every call starts; their
    results and output are dropped."""
    samples = _ask("warm_up")
    for call in samples * _WARM_UP_ROUNDS:
        try:
            value = getattr(_module, call["function"])(*call["args"], **call["kwargs"])
            if isinstance(value, types.CoroutineType):
                value = _drive(value)
        except BaseException as e:
            _report_exception(e, "warm-up")
            return False
        try:
            to_json(value)
        except Exception:
            pass  # A call returning this says why; the warm-up only warms.
    return True


def freeze():
    """End of pre-initialisation: what the loaded libraries import on first use is imported
    (numpy's random module) and host's own result conversion is run once on the kinds of
    value they return (pandas imports what its conversions need, and sets up each column type
    the first time one is converted: 770 page faults and 3 ms of a first call in a new
    process, for the example's frame), as every call would otherwise do it again; then what
    the load made is moved out of the garbage collector's reach, so no call spends time
    walking (and copying the pages of) objects that every call shares. Nothing of the
    bundle's own code runs here."""
    if "numpy" in sys.modules:
        # numpy imports its random module on first use (14 ms in the sandbox), and a fresh
        # instance would pay that in every call that draws a number.
        import numpy.random  # noqa: F401
    pandas = sys.modules.get("pandas")
    if pandas is not None:
        frame = pandas.DataFrame(
            {"i": [1], "f": [0.5], "b": [True], "s": ["s"], "t": [pandas.Timestamp(0)]}
        )
        to_json(frame)
        to_json(frame["i"])
    gc.collect()
    gc.freeze()


def invoke():
    """Call the requested function with the host's arguments and report what happened."""
    call = _ask("call")
    _fresh_process_state(call["env"])
    name = call["function"]
    function = getattr(_module, name, None)
    if not callable(function):
        _door({"op": "error", "phase": "call", "type": "NameError", "message": f"{name} is not defined", "frames": []})
        return
    try:
        value = function(*call["args"], **call["kwargs"])
        if isinstance(value, types.CoroutineType):
            value = _drive(value)
    except BaseException as e:
        _report_exception(e, "call")
        return
    try:
        encoded = json.dumps(to_json(value), separators=(",", ":"), allow_nan=False)
    except _Unconvertible as e:
        _door({"op": "error", "phase": "result", "type": "TypeError", "message": str(e), "frames": []})
        return
    except (RecursionError, MemoryError) as e:
        # json.dumps of what to_json made: only nesting past the limit gets here.
        message = f"the return value cannot be encoded as JSON ({type(e).__name__})"
        _door({"op": "error", "phase": "result", "type": "TypeError", "message": message, "frames": []})
        return
    _host.call(b'{"op":"result","value":' + encoded.encode() + b"}")


def _fresh_process_state(env):
    """What a fresh process would have, for a call that starts from a pre-initialised image:
    the call's own environment (the image holds the environment of the instance that made it),
    and fresh random state (the generators seeded while the bundle loaded would otherwise start
    every call from the same state; reseeding draws from the sandbox's random source, as a
    fresh import would)."""
    import os

    os.environ.clear()
    os.environ.update(env)
    if "random" in sys.modules:
        sys.modules["random"].seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        # As many words of entropy as `seed()` with no argument, mixed by MT19937's own
        # init_by_array: five times faster than `seed()`, which derives its words through a
        # SeedSequence (0.3 ms of every call in the sandbox).
        numpy_random.seed(sys.modules["numpy"].frombuffer(os.urandom(2496), dtype="uint32"))


def _drive(coroutine):
    """Run an `async def` function's coroutine to its end. asyncio's event loop needs a
    self-pipe the sandbox does not have, so coroutines that only await other coroutines run;
    one that waits on an event loop future is refused."""
    try:
        while True:
            if coroutine.send(None) is not None:
                coroutine.close()
                raise RuntimeError("the function awaits an event loop future; the sandbox has no event loop")
    except StopIteration as stop:
        return stop.value


# A traceback as Python prints it collapses a frame repeated more than this many times in a row
# ("[Previous line repeated N more times]"); host keeps at most _MAX_FRAMES frames of what is
# left, the outermost and the innermost halves, so a runaway recursion's report stays small
# (a million frames once made the report itself overrun the output limit).
_REPEATS_SHOWN = 3
_MAX_FRAMES = 100
_MAX_MESSAGE = 64 << 10


def _report_exception(exc, phase):
    """Hand an exception to the host: type, message and the frames from the notebook inward.
    Frames of this file (the driver) are left out: they are host machinery, not the user's."""
    places = []
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        if code.co_filename == _GUEST_FILE:
            continue
        place = (code.co_filename, lineno, code.co_name)
        if len(places) >= _REPEATS_SHOWN and all(p[0] == place for p in places[-_REPEATS_SHOWN:]):
            places[-1][1] += 1
        else:
            places.append([place, 0])
    omitted = max(len(places) - _MAX_FRAMES, 0)
    if omitted:
        places = places[: _MAX_FRAMES // 2] + places[-_MAX_FRAMES // 2 :]
    frames = []
    for (filename, lineno, name), repeated in places:
        cell = _cell_files.get(filename)
        frames.append(
            {
                "file": _notebook if cell is not None else filename,
                "cell": cell,
                "line": lineno,
                "function": name,
                "text": linecache.getline(filename, lineno).strip(),
                "repeated": repeated,
            }
        )
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__notebook__") else f"{kind.__module__}.{kind.__qualname__}"
    message = _message(exc)
    if len(message) > _MAX_MESSAGE:
        message = f"{message[:_MAX_MESSAGE]}... ({len(message) - _MAX_MESSAGE} more characters)"
    _door(
        {"op": "error", "phase": phase, "type": name, "message": message, "frames": frames, "omitted": omitted}
    )


def _message(exc):
    """An exception's message; a placeholder when its own `__str__` raises, as the user's
    exception classes may."""
    try:
        return str(exc)
    except BaseException as e:
        return f"<the exception's message could not be made: its __str__ raised {type(e).__name__}>"


def _describe(value):
    """`repr(value)` for a path in a message; a placeholder when `__repr__` raises."""
    try:
        return repr(value)
    except Exception:
        return f"<a {_type_name(value)} whose repr raised>"


# ---------------------------------------------------------------------------------------------
# Values to JSON. The rules are the ones README.md documents under "Return values".


class _Unconvertible(Exception):
    pass


# How deep a result may nest: far more than data has, and well inside the interpreter's own
# recursion limit, which `to_json` and `json.dumps` both use up level by level.
_MAX_DEPTH = 100


def to_json(value, path="result", _within=()):
    """A JSON-ready copy of a return value; raises _Unconvertible naming the first value (and
    where it sits) that has no JSON form, that nests too deep, that contains itself, or whose
    conversion raised. `_within` holds the ids of the containers `value` sits in."""
    try:
        return _to_json(value, path, _within)
    except _Unconvertible:
        raise
    except Exception as e:
        raise _Unconvertible(
            f"converting the return value at {path} raised {type(e).__name__}: {_message(e)}"
        ) from None


def _to_json(value, path, within):
    if value is None or isinstance(value, (bool, str)):
        return value
    # numpy and pandas first: their scalars subclass float and datetime but need their own rules.
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        return _numpy(value, path)
    if module == "pandas":
        return _pandas(value, path)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if id(value) in within:
            raise _Unconvertible(f"the return value contains itself at {path}, which has no JSON form")
        if len(within) >= _MAX_DEPTH:
            raise _Unconvertible(
                f"the return value nests deeper than {_MAX_DEPTH} levels at {path}, more than JSON results may"
            )
        within = (*within, id(value))
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[_key(k, path)] = to_json(v, f"{path}[{_describe(k)}]", within)
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{path}[{i}]", within) for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = list(value)
        try:
            items.sort()
        except Exception:
            pass
        return [to_json(v, f"{path}[{i}]", within) for i, v in enumerate(items)]
    raise _Unconvertible(
        f"the return value holds a {_type_name(value)} at {path}, which has no JSON form: "
        "return plain values (numbers, strings, lists, dicts), numpy or pandas objects"
    )


def _numpy(value, path):
    import numpy as np

    if isinstance(value, np.ndarray):
        return to_json(value.tolist(), path)
    if isinstance(value, np.datetime64):
        return None if np.isnat(value) else str(value)
    if isinstance(value, np.timedelta64):
        return None if np.isnat(value) else value / np.timedelta64(1, "s")
    if isinstance(value, np.generic):
        return to_json(value.item(), path)
    raise _Unconvertible(f"the return value holds a {_type_name(value)} at {path}, which has no JSON form")


def _pandas(value, path):
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        if not isinstance(value.index, pd.RangeIndex) or value.index.name is not None:
            value = value.reset_index()
        if not value.columns.is_unique:
            # pandas keeps one of each name, and says so on stderr.
            return [to_json(r, f"{path}[{i}]") for i, r in enumerate(value.to_dict("records"))]
        # Column by column: the same values as `to_dict("records")` (tolist boxes them the
        # same way), in half the time, which every call returning a frame pays.
        labels = list(value.columns)
        keys = [_key(label, path) for label in labels]
        columns = [series.tolist() for _, series in value.items()]
        rows = zip(*columns) if columns else ((),) * len(value)
        return [
            {key: to_json(v, f"{path}[{i}][{label!r}]") for key, label, v in zip(keys, labels, row)}
            for i, row in enumerate(rows)
        ]
    if isinstance(value, pd.Series):
        if isinstance(value.index, pd.RangeIndex) and value.index.name is None:
            return [to_json(v, f"{path}[{i}]") for i, v in enumerate(value.tolist())]
        return {_key(k, path): to_json(v, f"{path}[{k!r}]") for k, v in value.items()}
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, pd.Timedelta):
        return value.total_seconds()
    if isinstance(value, pd.Index):
        return to_json(value.tolist(), path)
    if isinstance(value, pd.Categorical):
        return to_json(list(value), path)
    raise _Unconvertible(f"the return value holds a {_type_name(value)} at {path}, which has no JSON form")


def _key(key, path):
    """A dict key as JSON's string key: strings as they are, numbers, booleans, None, dates
    by their JSON text."""
    if isinstance(key, str):
        return key
    converted = to_json(key, f"{path} (a key)")
    if isinstance(converted, (list, dict)):
        raise _Unconvertible(f"the return value has a {_type_name(key)} as a dict key at {path}")
    return json.dumps(converted) if not isinstance(converted, str) else converted


def _type_name(value):
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
