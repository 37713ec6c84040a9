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
# with string keys), or `{"field": shape, ...}` (an object with exactly these fields; a field
# written `"name?"` may be absent).
_ANSWERS = {
    "input": {"cells": [{"index": int, "source": str, "export": bool}]},
    "bundle": {
        "notebook": str,
        "chunks": [{"cell": int, "text": str}],
        "modules": [
            {"name": str, "file": str, "package": bool, "chunks": [{"cell?": int, "text": str}], "sha256": str}
        ],
    },
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
        fields = {key.rstrip("?"): item for key, item in shape.items()}
        required = {key for key in shape if not key.endswith("?")}
        if not required <= set(value) <= set(fields):
            raise ProtocolError(f"host's `{where}` has fields {sorted(value)}, not {sorted(shape)}")
        for key, item in value.items():
            _check(item, fields[key], f"{where}.{key}")


# ---------------------------------------------------------------------------------------------
# Analysis: what each top-level statement of each cell is, binds and uses.

# IPython's escapes at the start of a logical line (IPython.core.inputtransformer2): magics
# `%` and `%%`, shell `!` and `!!`, help `?` and `??`, and the autocall escapes `/`, `,`, `;`.
_ESCAPE = re.compile(r"(?:%|!(?!=)|\?|[/,;](?=\S))")
# `files = !ls`, `t = %time f()`: the value of a magic or a shell line, assigned.
_ESCAPE_ASSIGN = re.compile(
    r"(?P<target>[A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*)\s*=\s*(?P<sigil>%|!(?!=))"
)
# IPython's prompts pasted with the code (`>>> `, `... `), removed when the cell starts with one.
_CLASSIC_PROMPT = re.compile(r"^(?:>>>|\.\.\.)(?: |$)")


def _ipython_lines(source):
    """The cell as IPython hands it to Python, line for line, so line numbers stay the cell's:
    the uniform indentation of its first line removed, pasted `>>>` prompts removed, and each
    line magic, shell or help escape (with the lines a trailing backslash continues) replaced.
    At the top level the stand-in is `pass` (or `name = None` for `name = !cmd`, so the name is
    known to be bound by dropped code); inside a block it is a call to `__host_magic__`, which
    raises a clear error if it is reached. Returns the lines and, by line number, what each
    escape was (`magic` or `shell`)."""
    # Python reads `\r\n` and a lone `\r` as line ends too; the lines here must be its lines.
    lines = source.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    first = next((line for line in lines if line.strip()), "")
    indent = first[: len(first) - len(first.lstrip())]
    if indent:
        lines = [line[len(indent) :] if line.startswith(indent) else line for line in lines]
    if _CLASSIC_PROMPT.match(first.lstrip()):
        lines = [line[4:] if _CLASSIC_PROMPT.match(line) else line for line in lines]
    escapes = {}
    depth, quote, continued = 0, None, False
    start = None  # where the current logical line started
    i = 0
    while i < len(lines):
        line = lines[i]
        if depth == 0 and quote is None and not continued:
            start = i
            body = line.lstrip()
            pad = line[: len(line) - len(body)]
            assign = _ESCAPE_ASSIGN.match(body)
            if assign or _ESCAPE.match(body):
                last = i
                while lines[last].endswith("\\") and last + 1 < len(lines):
                    last += 1
                sigil = assign.group("sigil") if assign else body[0]
                target = assign.group("target") if assign else None
                _replace(lines, escapes, i, last, pad, target, "shell" if sigil == "!" else "magic")
                i = last + 1
                continue
        depth, quote, continued, tail = _scan(line, depth, quote)
        if depth == 0 and quote is None and not continued and tail == "?":
            # `obj?`, `obj.method??`: help, at the end of a logical line.
            body = lines[start].lstrip()
            _replace(lines, escapes, start, i, lines[start][: len(lines[start]) - len(body)], None, "magic")
        i += 1
    return lines, escapes


def _replace(lines, escapes, first, last, pad, target, kind):
    """Replaces lines `first..last` (one escape) by its stand-in, see `_ipython_lines`."""
    original = " ".join(line.strip().rstrip("\\").strip() for line in lines[first : last + 1])
    if pad:
        stand_in = f"__host_magic__({original!r})"
        if target:
            stand_in = f"{target} = {stand_in}"
    else:
        stand_in = f"{target} = None" if target else "pass"
    lines[first] = pad + stand_in
    for k in range(first + 1, last + 1):
        lines[k] = ""
    escapes[first + 1] = kind


def _scan(line, depth, quote):
    """Python's tokens, as far as logical lines go: the bracket depth and open string after
    `line`, whether a backslash continues it, and its last character outside strings and
    comments."""
    i, tail, n = 0, "", len(line)
    while i < n:
        ch = line[i]
        if quote is not None:
            if ch == "\\":
                i += 2
            elif line.startswith(quote, i):
                i += len(quote)
                quote, tail = None, ch
            else:
                i += 1
            continue
        if ch == "#":
            return depth, None, False, tail
        if ch in "'\"":
            quote = line[i : i + 3] if line[i : i + 3] in ("'''", '"""') else ch
            i += len(quote)
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        if not ch.isspace():
            tail = ch
        i += 1
    continued = line.endswith("\\")
    if quote in ("'", '"') and not continued:
        quote = None  # an unterminated short string ends with its line (a syntax error)
    return depth, quote, continued and quote is None, tail


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


def _scope_kind(table):
    kind = table.get_type()
    return getattr(kind, "value", kind)


def _is_type_checking(test):
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`: a block that never runs."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _AsItRuns(ast.NodeTransformer):
    """A statement reduced to what runs, for `symtable`: annotations go (CPython 3.14+ does not
    evaluate them when a definition runs, nor does `from __future__ import annotations`), so
    do `if TYPE_CHECKING:` blocks (they never run), and `await`, `async for` and `async with`
    become their plain forms (the same names; `symtable` refuses them at the top level, where
    IPython's autoawait runs them)."""

    def visit_arg(self, node):
        node.annotation = None
        return node

    def visit_FunctionDef(self, node):
        node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        self.generic_visit(node)
        if node.value is not None:
            return ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno)
        # `x: int` binds nothing; `obj.x: int` still evaluates `obj`.
        return ast.Pass() if isinstance(node.target, ast.Name) else ast.Expr(node.target)

    def visit_If(self, node):
        if _is_type_checking(node.test):
            node.body = [ast.Pass()]
        return self.generic_visit(node)

    def visit_Await(self, node):
        return self.visit(node.value)

    def visit_AsyncFor(self, node):
        return self.generic_visit(ast.For(**{f: getattr(node, f) for f in node._fields}))

    def visit_AsyncWith(self, node):
        return self.generic_visit(ast.With(**{f: getattr(node, f) for f in node._fields}))

    def visit_comprehension(self, node):
        node.is_async = 0
        return self.generic_visit(node)


def _awaits_at_top_level(stmt):
    """Whether a statement awaits outside any function: IPython's autoawait runs it, Python
    as a module cannot."""
    todo = [stmt]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            return True
        if isinstance(node, ast.comprehension) and node.is_async:
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            # Its body runs when it is called; its decorators and defaults run here.
            todo.extend(getattr(node, "decorator_list", ()))
            todo.extend(node.args.defaults)
            todo.extend(d for d in node.args.kw_defaults if d is not None)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return False


def _uses(table):
    """The global names a statement reads: (eager, lazy). Eager names are read when the
    statement runs (an assignment's value, decorators, defaults, base classes); lazy ones only
    when a function it defines is called. Annotation scopes are not walked: their names are
    read only if something asks for the annotations."""
    eager, lazy = set(), set()

    def walk(table, is_eager):
        kind = _scope_kind(table)
        if kind == "annotation":
            return
        here_eager = is_eager and kind in _EAGER_SCOPES
        for sym in table.get_symbols():
            if not sym.is_referenced():
                continue
            if kind == "module" or sym.is_global():
                (eager if here_eager else lazy).add(sym.get_name())
        for child in table.get_children():
            walk(child, here_eager)

    walk(table, True)
    return eager, lazy


def _binds(table):
    """The module-level names a statement binds."""
    return {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}


def _imports(stmt):
    """The top-level modules a statement imports by absolute name, in its body too."""
    names = []
    for node in ast.walk(stmt):
        if isinstance(node, ast.Import):
            names.extend(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    return sorted(set(names))


_found = {}


def _in_runtime(module):
    """Whether the interpreter can import a top-level module (finding it imports nothing), or
    the guest stands in for it (IPython)."""
    if module in ("IPython", "importnb"):
        return True
    if module not in _found:
        import importlib.util

        try:
            _found[module] = (
                module in sys.modules
                or module in sys.builtin_module_names
                or importlib.util.find_spec(module) is not None
            )
        except Exception:  # a broken module's own finder code, a name it cannot take
            _found[module] = False
    return _found[module]


def _star_names(stmt):
    """The names `from MODULE import *` may bind, else None: it may bind anything. A module
    already imported says so itself (its `__all__`, else its public names); another module of
    the runtime by the one literal `__all__` its compiled code assigns (the runtime carries
    compiled code, not source). Finding and reading it imports nothing."""
    module = stmt.module or ""
    if stmt.level:
        return None
    loaded = sys.modules.get(module)
    if loaded is not None:
        names = getattr(loaded, "__all__", None)
        if names is None:
            names = [n for n in vars(loaded) if not n.startswith("_")]
        return sorted(str(n) for n in names)
    if "." in module or not _in_runtime(module):
        return None
    import importlib.util

    try:
        return _literal_all(importlib.util.find_spec(module).loader.get_code(module))
    except Exception:
        return None


def _literal_all(code):
    """The names of `__all__ = [...]` (or a tuple) in a module's code, when it is assigned once
    from string constants and never read back (no `__all__ += ...`); else None."""
    import dis

    ops = [i for i in dis.get_instructions(code) if i.opname not in ("CACHE", "NOP", "EXTENDED_ARG")]
    uses = [k for k, i in enumerate(ops) if i.argval == "__all__" and i.opname.endswith("_NAME")]
    if len(uses) != 1 or ops[uses[0]].opname != "STORE_NAME":
        return None
    before = ops[: uses[0]]

    def strings(value):
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        return sorted(value) if ok else None

    if not before:
        return None
    last = before[-1]
    if last.opname == "LOAD_CONST":  # a constant tuple
        return strings(last.argval)
    if last.opname in ("LIST_EXTEND", "CALL_INTRINSIC_1") and len(before) >= 2:
        # BUILD_LIST 0, LOAD_CONST (...), LIST_EXTEND (a list); LIST_TO_TUPLE for a tuple.
        k = -2 if last.opname == "LIST_EXTEND" else -3
        return strings(before[k].argval) if before[k].opname == "LOAD_CONST" else None
    if last.opname in ("BUILD_LIST", "BUILD_TUPLE") and len(before) > last.arg:
        loads = before[len(before) - 1 - last.arg : -1]
        if all(i.opname == "LOAD_CONST" and isinstance(i.argval, str) for i in loads):
            return sorted(i.argval for i in loads)
    return None


def _imports_notebooks(stmt):
    """`with Notebook(): import other`: importnb importing notebooks, which is an import."""
    return all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in stmt.body) and all(
        isinstance(item.context_expr, ast.Call)
        and getattr(item.context_expr.func, "id", getattr(item.context_expr.func, "attr", None)) == "Notebook"
        for item in stmt.items
    )


def _kind(stmt, exported):
    """Whether a top-level statement is kept, and why."""
    if _awaits_at_top_level(stmt):
        return "code"
    if exported:
        return "export"
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return "import"
    if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
        # What runs is its `else`: kept when that only imports.
        if all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in stmt.orelse):
            return "import"
    if isinstance(stmt, ast.With) and _imports_notebooks(stmt):
        return "import"
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return "definition"
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = []
        for target in targets:
            elts = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
            names.extend(elts)
        # ALL_CAPS as Python sees it: `str.isupper()`, so `ÄNDERUNG` counts.
        if names and all(isinstance(n, ast.Name) and n.id.isupper() for n in names):
            if isinstance(stmt, ast.AnnAssign) and stmt.value is None:
                return "code"
            return "constant"
    return "code"


def _analyse_cell(cell):
    first = cell["source"].lstrip().split("\n", 1)[0]
    if first.startswith("%%"):
        return {"index": cell["index"], "cell_magic": first.split()[0], "statements": []}
    lines, escapes = _ipython_lines(cell["source"])
    text = "\n".join(lines)
    try:
        tree = compile(
            text,
            f"cell {cell['index']}",
            "exec",
            ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True,
        )
    except (SyntaxError, ValueError) as e:
        return {
            "index": cell["index"],
            "syntax_error": {"line": getattr(e, "lineno", None) or 1, "message": getattr(e, "msg", str(e))},
            "statements": [],
        }
    statements = []
    for stmt in tree.body:
        span = _statement_span(stmt)
        kind = escapes.get(span[0]) or _kind(stmt, cell.get("export", False))
        runs = ast.fix_missing_locations(_AsItRuns().visit(ast.Module(body=[stmt], type_ignores=[])))
        try:
            table = symtable.symtable(ast.unparse(runs), "<statement>", "exec")
        except SyntaxError as e:
            # Valid to the parser, refused by the compiler (`return` outside a function,
            # `nonlocal` at the top level): it cannot run, so it is dropped and binds nothing.
            statements.append(
                {
                    "span": list(span), "kind": "code", "name": None, "function": False,
                    "binds": [], "eager": [], "lazy": [], "error": e.msg,
                }
            )
            continue
        eager, lazy = _uses(table)
        imports = _imports(stmt)
        star = isinstance(stmt, ast.ImportFrom) and any(a.name == "*" for a in stmt.names)
        statements.append(
            {
                "span": list(span),
                "kind": kind,
                "name": getattr(stmt, "name", None),
                "function": isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)),
                "binds": sorted(_binds(table)),
                "star_import": star,
                "star_names": _star_names(stmt) if star else None,
                "eager": sorted(eager),
                "lazy": sorted(lazy - eager),
                "magic_lines": [n for n in escapes if span[0] < n <= span[2]],
                "imports": imports,
                "missing": [m for m in imports if not _in_runtime(m)],
            }
        )
    return {"index": cell["index"], "text": text, "statements": statements}


def _analyse_or_drop(cell):
    """A cell the interpreter's own parser or compiler cannot take (nesting too deep for it)
    is dropped whole and named, like a cell that does not parse: never a failed analysis."""
    try:
        return _analyse_cell(cell)
    except Exception as e:
        if isinstance(e, (RecursionError, MemoryError)):
            why = f"host cannot analyse it: too deeply nested to parse ({type(e).__name__})"
        else:
            why = f"host cannot analyse it ({type(e).__name__}: {_message(e)})"
        return {"index": cell["index"], "syntax_error": {"line": 1, "message": why}, "statements": []}


def analyse():
    """Answer the host's `analyse` request: every code cell, statement by statement."""
    request = _ask("input")
    cells = [_analyse_or_drop(cell) for cell in request["cells"]]
    _door({"op": "output", "cells": cells, "builtins": sorted(dir(builtins))})


# ---------------------------------------------------------------------------------------------
# Calls: load a bundle's source, call one function, hand back its value as JSON.

_GUEST_FILE = (lambda: None).__code__.co_filename
_module = None
_notebook = None
# Compiled file name -> (the notebook or module file a user knows, its cell or None).
_cell_files = {}
# Where `make runtime` extracts matplotlib's data files: it reads them by path, which the zip
# holding matplotlib cannot serve.
_MPL_DATA = "/usr/local/lib/matplotlib/mpl-data"


def load():
    """Run the bundle's kept source, cell by cell, in a fresh module named after the notebook.

    Each cell is compiled under the name `NOTEBOOK, cell N` with its own line numbers, so a
    traceback points at the notebook, not at a generated file. The modules bundled with it
    (the notebook's neighbours and wheels) are importable by their names."""
    global _module, _notebook
    bundle = _ask("bundle")
    _notebook = bundle["notebook"]
    builtins.__host_magic__ = _magic_unavailable
    sys.meta_path.insert(0, _Bundled(bundle.get("modules", [])))
    _module = types.ModuleType("__notebook__")
    _module.__file__ = _notebook
    sys.modules["__notebook__"] = _module
    try:
        for chunk in bundle["chunks"]:
            _run_chunk(_notebook, chunk, _module.__dict__)
    except BaseException as e:
        _report_exception(e, "load")
        return False
    return True


def _run_chunk(file, chunk, namespace):
    """Compile and run one chunk of kept source under the name tracebacks show: `FILE, cell N`
    for a notebook's cell, `FILE` for a module's source."""
    cell = chunk.get("cell")
    filename = file if cell is None else f"{file}, cell {cell}"
    _cell_files[filename] = (file, cell)
    text = chunk["text"]
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    exec(compile(text, filename, "exec", dont_inherit=True), namespace)


def _magic_unavailable(line):
    """What an IPython magic or shell line inside a function becomes: an error if reached."""
    what = "a shell command" if re.match(r"\s*(?:[\w.]+\s*=\s*)?!", line) else "an IPython magic"
    raise RuntimeError(
        f"`{line}` is {what}, which needs IPython; the sandbox runs the function's Python only, "
        "without IPython or a shell: do what it does in Python, or take it out of the function"
    )


class _Bundled:
    """The import system's view of what the bundle brings: its modules (the notebook's
    neighbours, the wheels' modules), found first as a notebook's own folder is on
    `sys.path` first in Jupyter; and matplotlib, pointed at its data files and at the Agg
    backend, with `pyplot.show()` doing nothing (there is no screen)."""

    def __init__(self, modules):
        self.modules = {m["name"]: m for m in modules}

    def find_spec(self, name, path=None, target=None):
        import importlib.util

        module = self.modules.get(name) or _IPYTHON.get(name)
        if module is not None:
            return importlib.util.spec_from_loader(
                name, self, origin=module["file"], is_package=module.get("package", False)
            )
        adjust = _MATPLOTLIB_ADJUSTMENTS.get(name)
        if adjust is None:
            return None
        for finder in sys.meta_path:
            found = None if finder is self else getattr(finder, "find_spec", None)
            spec = found(name, path, target) if found else None
            if spec is not None:
                spec.loader = _Adjusted(spec.loader, *adjust)
                return spec
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        bundled = self.modules.get(module.__name__) or _IPYTHON[module.__name__]
        for chunk in bundled["chunks"]:
            _run_chunk(bundled["file"], chunk, module.__dict__)


_IPYTHON_DISPLAY = """\
__all__ = ["display", "update_display", "clear_output", "DisplayObject", "HTML", "Markdown",
           "Latex", "Math", "JSON", "SVG", "Javascript", "Image", "Code", "Pretty", "IFrame",
           "Audio", "Video", "YouTubeVideo", "FileLink", "FileLinks", "ProgressBar",
           "display_html", "display_markdown", "display_latex", "display_json", "display_svg",
           "display_png", "display_jpeg", "display_javascript", "display_pretty"]


def display(*objs, **kwargs):
    \"\"\"IPython's `display` where no IPython shell runs: it prints the objects.\"\"\"
    print(*objs)


def update_display(obj, **kwargs):
    display(obj)


display_html = display_markdown = display_latex = display_json = display_svg = display
display_png = display_jpeg = display_javascript = display_pretty = display


def clear_output(wait=False):
    \"\"\"Nothing to clear: the output is a stream.\"\"\"


class DisplayObject:
    def __init__(self, data=None, url=None, filename=None, metadata=None, *args, **kwargs):
        self.data, self.url, self.filename, self.metadata = data, url, filename, metadata

    def __repr__(self):
        return f"<IPython.core.display.{type(self).__name__} object>"


class HTML(DisplayObject): pass
class Markdown(DisplayObject): pass
class Latex(DisplayObject): pass
class Math(DisplayObject): pass
class JSON(DisplayObject): pass
class SVG(DisplayObject): pass
class Javascript(DisplayObject): pass
class Image(DisplayObject): pass
class Code(DisplayObject): pass
class Pretty(DisplayObject): pass
class Audio(DisplayObject): pass
class Video(DisplayObject): pass
class FileLink(DisplayObject): pass
class FileLinks(DisplayObject): pass
class ProgressBar(DisplayObject): pass
class IFrame(DisplayObject):
    def __init__(self, src, width, height, *args, **kwargs):
        super().__init__(data=src)
class YouTubeVideo(IFrame):
    def __init__(self, id, width=400, height=300, *args, **kwargs):
        super().__init__(id, width, height)
"""

_IMPORTNB = """\
class Notebook:
    \"\"\"importnb's notebook loader: host bundles the notebooks imported under it.\"\"\"

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def get_ipython():
    return None
"""

# IPython is not in the runtime. What functions use of it works as it does where no IPython
# shell runs (a notebook imported as a module, nbimporter-style): `display()` prints,
# `clear_output()` does nothing, `get_ipython()` is None, the rich display classes hold their
# data. A bundled IPython (a wheel) comes first.
_IPYTHON = {
    name: {"name": name, "file": "<host's IPython stand-in>", "package": package, "chunks": [{"text": text}]}
    for name, package, text in [
        ("IPython", True, "def get_ipython():\n    return None\n"),
        ("IPython.display", False, _IPYTHON_DISPLAY),
        ("IPython.core", True, ""),
        ("IPython.core.display", False, "from IPython.display import *\n"),
        ("IPython.core.display_functions", False, "from IPython.display import display, update_display, clear_output\n"),
        # importnb's loader: the notebooks imported under it are bundled, so it has nothing to do.
        ("importnb", False, _IMPORTNB),
    ]
}


class _Adjusted:
    """A module's own loader, with something done before and after its code runs."""

    def __init__(self, loader, before, after):
        self._loader, self._before, self._after = loader, before, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._before(module)
        self._loader.exec_module(module)
        self._after(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _matplotlib_before(module):
    import os

    if not os.path.isdir(_MPL_DATA):
        raise ImportError(
            f"matplotlib's data files are not in the runtime ({_MPL_DATA}): "
            "run `make runtime` again, which extracts them"
        )
    # matplotlib finds its data beside its `__file__`; its rc file is named outright, so that
    # finding it does not ask for a configuration folder, which the sandbox has not.
    module.__file__ = os.path.join(os.path.dirname(_MPL_DATA), "__init__.py")
    os.environ["MATPLOTLIBRC"] = os.path.join(_MPL_DATA, "matplotlibrc")


def _matplotlib_after(module):
    import logging
    import os

    os.environ.pop("MATPLOTLIBRC", None)
    # No writable folder for its caches: the font list is built in memory (and kept in the
    # bundle's image), and the failure to save it is not worth a warning in every call.
    module.get_cachedir = module.get_configdir = lambda: "/nonexistent/matplotlib"
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    module.use("agg")


def _pyplot_after(module):
    module.show = lambda *args, **kwargs: None


_MATPLOTLIB_ADJUSTMENTS = {
    "matplotlib": (_matplotlib_before, _matplotlib_after),
    "matplotlib.pyplot": (lambda module: None, _pyplot_after),
}


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
    _run_call_turns_directly()
    gc.collect()
    gc.freeze()


# The turn host runs for each call from an image (`Script::Call` in door.rs).
_CALL_TURN = f"_start({PROTOCOL})\ninvoke()\n"


def _run_call_turns_directly():
    """The runtime runs a turn by parsing and compiling its source (`_reactor._run_turn`):
    0.1 ms of every call in the sandbox for these two lines, a fifth of a trivial call. A call
    from an image always sends the same text, so that text runs `invoke()` directly (as the
    compiled turn would: `_start` accepts this guest's own protocol, and `invoke()` returns
    None, which the interactive echo does not show); any other text, a host speaking another
    protocol's included, still goes the runtime's way."""
    reactor = sys.modules.get("_reactor")
    compiled = getattr(reactor, "_run_turn", None)
    if compiled is None:
        return

    def run_turn(text, *rest):
        if text == _CALL_TURN:
            return invoke()
        return compiled(text, *rest)

    reactor._run_turn = run_turn


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
        file, cell = _cell_files.get(filename, (filename, None))
        frames.append(
            {
                "file": file,
                "cell": cell,
                "line": lineno,
                "function": name,
                "text": linecache.getline(filename, lineno).strip(),
                "repeated": repeated,
            }
        )
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__notebook__") else f"{kind.__module__}.{kind.__qualname__}"
    # Python prints an exception's notes under its message; host's own note says when the
    # error is the sandbox's edge.
    notes = [n for n in getattr(exc, "__notes__", ()) if isinstance(n, str)]
    note = _sandbox_note(exc)
    if note:
        notes.append(note)
    message = "\n".join([_message(exc), *notes])
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


_PROCESS_MODULES = {"os", "_socket", "socket", "select", "signal", "_thread", "subprocess", "multiprocessing"}


def _sandbox_note(exc):
    """Why an error comes from the sandbox's edge and what helps, or None: a path outside
    every granted folder, or a process, socket or thread, which WASI preview 1 does not have."""
    import errno
    import os

    lacking = (errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)
    # WASI's CPython leaves out what it cannot do (`_socket.getaddrinfo`, `os.fork`).
    absent = getattr(exc, "obj", None) if isinstance(exc, AttributeError) else None
    if (
        (isinstance(exc, OSError) and exc.errno in lacking)
        or (isinstance(exc, RuntimeError) and "can't start new thread" in str(exc))
        or getattr(absent, "__name__", None) in _PROCESS_MODULES
    ):
        return (
            "host: the sandbox (WASI preview 1) has no processes, sockets or threads, and no flag "
            "gives them: compute in the function itself, and pass what it needs as arguments or "
            "in files granted with --grant HOST_DIR:GUEST_DIR"
        )
    missing = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EBADF, getattr(errno, "ENOTCAPABLE", -1))
    if not isinstance(exc, OSError) or exc.errno not in missing:
        return None
    try:
        # No file name: the working directory's (`os.listdir()`).
        path = os.path.abspath(os.fsdecode(exc.filename if exc.filename is not None else "."))
    except (TypeError, ValueError):
        return None
    place = path
    while place not in ("/", ""):
        if os.path.isdir(place):
            return None  # inside a granted folder (or the runtime's library): a plain error
        place = os.path.dirname(place)
    return (
        f"host: `{path}` is outside every folder granted to the sandbox, which sees only the "
        "folders given with --grant HOST_DIR:GUEST_DIR[:ro|rw] (the working directory is `/`)"
    )


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


# Types whose values convert to themselves, matched exactly (numpy's scalars subclass int and
# float, and have their own rules): most of a frame's cells, checked before anything else.
_SELF = frozenset({int, str, bool, type(None)})


def _itself(value):
    """Whether `value` converts to itself: a plain int, str, bool, None or finite float (NaN
    and infinities, for which `value - value` is NaN, become null further on)."""
    kind = type(value)
    return kind in _SELF or (kind is float and value - value == 0)


def _to_json(value, path, within):
    if _itself(value):
        return value
    if isinstance(value, (bool, str)):
        return value
    # numpy and pandas first: their scalars subclass float and datetime but need their own rules.
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        return _numpy(value, path)
    if module == "pandas":
        return _pandas(value, path)
    if module == "matplotlib":
        return _matplotlib(value, path)
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
            # Plain cells as they are: the path an error message would need is built only for
            # the others (building it for every cell was 0.3 ms of the example's call).
            {
                key: v if _itself(v) else to_json(v, f"{path}[{i}][{label!r}]")
                for key, label, v in zip(keys, labels, row)
            }
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


def _matplotlib(value, path):
    """A figure, or the figure of an axes, as the PNG Jupyter would show."""
    import base64
    import io

    from matplotlib.axes import Axes
    from matplotlib.figure import FigureBase

    figure = value.figure if isinstance(value, Axes) else value
    if not isinstance(figure, FigureBase):
        raise _Unconvertible(f"the return value holds a {_type_name(value)} at {path}, which has no JSON form")
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return {"image/png": base64.b64encode(png.getvalue()).decode()}


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
