//! The door between host and guest: the guest's Python source, the protocol version, and
//! every message that crosses `host::call`, as typed values in both directions.
//!
//! # The protocol
//!
//! The guest is CPython in a fresh Wasmtime instance. host drives it in *turns*: each turn is
//! Python source run in the interpreter's one persistent session (the runtime's `turn`
//! export). The first turn is [`GUEST_SOURCE`] (`guest-python/guest.py`); the next is one of
//! the [`Script`]s, which names the protocol version it speaks. The guest refuses a version
//! other than its own, so a host and a guest (or a pre-initialised image) from different
//! builds never misread each other.
//!
//! During a turn the guest talks to host through one import,
//! `host::call(ptr, len, out_ptr_ptr, out_len_ptr) -> i32`: it sends one JSON object, a
//! [`GuestMessage`] tagged by `op`, and gets back either a JSON answer (written into memory
//! from the guest's `host_alloc`, status 0) or nothing (status 0, length 0). Status -2 means
//! host could not read the request. Requests that *ask* (`input`, `bundle`, `warm_up`,
//! `call`) are answered from what host set up for the run ([`Door::answer`]); messages that
//! *hand back* (`output`, `result`, `error`) are kept, in order, in [`Door::received`].
//!
//! | op        | direction     | answer / payload                                          |
//! |-----------|---------------|-----------------------------------------------------------|
//! | `input`   | guest asks    | [`AnalysisInput`]: the notebook's code cells              |
//! | `output`  | guest hands   | [`Analysis`]: each cell statement by statement            |
//! | `bundle`  | guest asks    | [`BundleSource`]: the kept source, and bundled modules    |
//! | `warm_up` | guest asks    | a list of [`WarmUp`] samples                              |
//! | `call`    | guest asks    | [`CallInput`]: function, arguments, environment           |
//! | `result`  | guest hands   | `{"value": JSON}`: the converted return value             |
//! | `error`   | guest hands   | [`GuestException`]: what raised, and where                |
//!
//! Every byte crosses this door (or a WASI import), so a trace sees all that goes in or out.
//! A message that does not match its type is an internal error naming the op and the field.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::bad_input;

/// The guest's half of host, run as the first turn of every instance.
pub const GUEST_SOURCE: &str = include_str!("../../guest-python/guest.py");

/// The protocol version, as the guest's `PROTOCOL` must say it. Change it with any change to
/// a message's shape.
macro_rules! protocol {
    () => {
        "1"
    };
}

/// The protocol version host speaks.
pub const PROTOCOL: &str = protocol!();

/// What a run asks the guest to do after [`GUEST_SOURCE`]: the driving turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Analyse the notebook's cells (`input` → `output`).
    Analyse,
    /// Load the bundle, run its warm-up calls, then make the call.
    LoadAndCall,
    /// Load the bundle and run its warm-up calls, then ready the memory to be saved as an image.
    LoadAndFreeze,
    /// In an instance started from a bundle's image: make the call.
    Call,
}

impl Script {
    /// The turns to run, in order.
    pub fn turns(self) -> &'static [&'static str] {
        match self {
            Script::Analyse => &[
                GUEST_SOURCE,
                concat!("_start(", protocol!(), ")\nanalyse()\n"),
            ],
            Script::LoadAndCall => &[
                GUEST_SOURCE,
                concat!(
                    "_start(",
                    protocol!(),
                    ")\nif load() and warm_up():\n    invoke()\n"
                ),
            ],
            Script::LoadAndFreeze => &[
                GUEST_SOURCE,
                concat!(
                    "_start(",
                    protocol!(),
                    ")\nif load() and warm_up():\n    freeze()\n"
                ),
            ],
            Script::Call => &[concat!("_start(", protocol!(), ")\ninvoke()\n")],
        }
    }
}

/// A message from the guest, tagged by `op`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// Asks for the cells to analyse.
    Input,
    /// Hands back the analysis.
    Output(Analysis),
    /// Asks for the bundle's source.
    Bundle,
    /// Asks for the warm-up samples.
    WarmUp,
    /// Asks for the call to make.
    Call,
    /// Hands back the call's value, converted to JSON.
    Result { value: Value },
    /// Hands back an exception.
    Error(GuestException),
}

/// The messages that ask for something, each answered by what the run was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ask {
    Input,
    Bundle,
    WarmUp,
    Call,
}

impl GuestMessage {
    /// Parses one request, naming the op and what is wrong when it is malformed.
    pub fn parse(bytes: &[u8]) -> Result<GuestMessage> {
        serde_json::from_slice(bytes).map_err(|e| {
            #[derive(Deserialize)]
            struct Probe {
                op: String,
            }
            match serde_json::from_slice::<Probe>(bytes) {
                Ok(p) => anyhow!("the guest sent a malformed `{}` message: {e}", p.op),
                Err(_) => anyhow!("the guest sent a message host cannot read: {e}"),
            }
        })
    }

    /// What it asks for, when it asks.
    fn ask(&self) -> Option<Ask> {
        match self {
            GuestMessage::Input => Some(Ask::Input),
            GuestMessage::Bundle => Some(Ask::Bundle),
            GuestMessage::WarmUp => Some(Ask::WarmUp),
            GuestMessage::Call => Some(Ask::Call),
            _ => None,
        }
    }
}

/// The host end of the door for one run: the answers it gives and what the guest handed back.
#[derive(Debug, Default, Clone)]
pub struct Door {
    answers: BTreeMap<Ask, Vec<u8>>,
    /// What the guest handed back (`output`, `result`, `error`), in order.
    pub received: Vec<GuestMessage>,
    /// The first message host could not read, which makes the run an internal error.
    pub malformed: Option<String>,
}

impl Door {
    /// The door with the cells an analysis reads.
    pub fn input(self, input: &AnalysisInput<'_>) -> Door {
        self.with(Ask::Input, input)
    }

    /// The door with a bundle's source and warm-up samples, which `load()` and `warm_up()` ask for.
    pub fn bundle(self, source: &BundleSource<'_>, warm_up: &[WarmUp]) -> Door {
        self.with(Ask::Bundle, source).with(Ask::WarmUp, &warm_up)
    }

    /// The door with the call `invoke()` asks for.
    pub fn call(self, call: &CallInput<'_>) -> Door {
        self.with(Ask::Call, call)
    }

    fn with(mut self, ask: Ask, value: &impl Serialize) -> Door {
        // Serialising these plain types cannot fail: their maps have string keys.
        let bytes = serde_json::to_vec(value).expect("door answers serialise");
        self.answers.insert(ask, bytes);
        self
    }

    /// Handles one request: the answer for one that asks (None if the run has no answer for
    /// it), an empty answer for one that hands back.
    pub fn handle(&mut self, request: &[u8]) -> Option<Vec<u8>> {
        let message = match GuestMessage::parse(request) {
            Ok(message) => message,
            Err(e) => {
                self.malformed.get_or_insert_with(|| format!("{e:#}"));
                return None;
            }
        };
        match message.ask() {
            Some(ask) => self.answers.get(&ask).cloned(),
            None => {
                self.received.push(message);
                Some(Vec::new())
            }
        }
    }

    /// Fails with the first malformed message, if there was one.
    pub fn check(&self) -> Result<()> {
        match &self.malformed {
            Some(why) => Err(anyhow!("{why}")),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Analysis: the notebook's cells in, each cell's statements out.

/// The `input` answer: the notebook's code cells.
#[derive(Debug, Serialize)]
pub struct AnalysisInput<'a> {
    pub cells: Vec<CellSource<'a>>,
}

/// One code cell to analyse.
#[derive(Debug, Serialize)]
pub struct CellSource<'a> {
    /// The cell's number in the notebook (from 1, all cells counted).
    pub index: usize,
    pub source: &'a str,
    /// Tagged `export`: every statement is kept.
    pub export: bool,
}

/// The `output` message: what the guest reports for a notebook's code cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    pub cells: Vec<CellAnalysis>,
    /// The interpreter's builtin names: a global that is one of these needs no definition.
    pub builtins: Vec<String>,
}

/// One code cell, statement by statement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellAnalysis {
    /// The cell's number in the notebook (from 1, all cells counted).
    pub index: usize,
    /// The cell's text with magic and shell lines turned into `pass` (same line numbers).
    #[serde(default)]
    pub text: Option<String>,
    /// Set when the cell starts with a cell magic (`%%time`): the whole cell is dropped.
    #[serde(default)]
    pub cell_magic: Option<String>,
    /// Set when the cell does not parse: the whole cell is dropped.
    #[serde(default)]
    pub syntax_error: Option<SyntaxProblem>,
    pub statements: Vec<Statement>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntaxProblem {
    pub line: usize,
    pub message: String,
}

/// One top-level statement of a cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    /// (first line, first column, last line, end column): lines from 1, columns in UTF-8
    /// bytes, decorators included.
    pub span: [usize; 4],
    pub kind: Kind,
    /// The name a `def` or `class` defines.
    #[serde(default)]
    pub name: Option<String>,
    /// Whether it is a `def` or `async def` (something `host run` can call).
    #[serde(default)]
    pub function: bool,
    pub binds: Vec<String>,
    #[serde(default)]
    pub star_import: bool,
    /// Globals read when the statement runs.
    pub eager: Vec<String>,
    /// Globals read only when a function the statement defines is called.
    pub lazy: Vec<String>,
    /// Magic or shell lines inside the statement's body, replaced by a call that raises if
    /// it is reached.
    #[serde(default)]
    pub magic_lines: Vec<usize>,
    /// For a star import, the names it may bind when the guest can tell without importing
    /// the module (its `__all__`); `None`: it may bind anything.
    #[serde(default)]
    pub star_names: Option<Vec<String>>,
    /// The top-level modules it imports by absolute name (in its body too).
    #[serde(default)]
    pub imports: Vec<String>,
    /// Those of `imports` the runtime does not have.
    #[serde(default)]
    pub missing: Vec<String>,
}

/// Why a statement is kept or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Import,
    Definition,
    /// An assignment to ALL_CAPS names only.
    Constant,
    /// Any statement of a cell tagged `export`.
    Export,
    /// Other top-level code: dropped.
    Code,
    /// An IPython line magic (`%matplotlib inline`): dropped.
    Magic,
    /// A shell line (`!pip install x`): dropped.
    Shell,
}

// ---------------------------------------------------------------------------------------
// Loading a bundle, and calling.

/// The kept source of one cell: its text with everything not needed blanked out, so each
/// kept line keeps its number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub cell: usize,
    pub text: String,
}

/// The `bundle` answer: what `load()` runs.
#[derive(Debug, Serialize)]
pub struct BundleSource<'a> {
    /// The notebook's file name, which tracebacks show.
    pub notebook: &'a str,
    pub chunks: &'a [Chunk],
    /// Modules the source may import that the runtime does not have.
    pub modules: &'a [Module],
}

/// A module carried in a bundle, importable by its name inside the sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Module {
    /// The name it is imported by (`helpers`, `utils.text`).
    pub name: String,
    /// Where it came from: a path relative to the notebook's folder, or `WHEEL:PATH`. What
    /// tracebacks and `host inspect` show.
    pub file: String,
    /// Whether it is a package (its submodules are carried too).
    #[serde(default)]
    pub package: bool,
    /// Its source: one chunk for a `.py` file; a sibling notebook's kept cells.
    pub chunks: Vec<ModuleChunk>,
    /// sha256 of the source that runs.
    pub sha256: String,
}

/// Source run as one unit: a module's whole file (`cell` absent) or one cell of a notebook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleChunk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<usize>,
    pub text: String,
}

/// A call made before a bundle's image is saved, so that the one-time work of a function's
/// first calls (imports inside functions, caches filled on first use, the interpreter
/// specialising its bytecode) is already done in every call's starting state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WarmUp {
    pub function: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
}

/// A function's arguments: positional and keyword, as JSON values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arguments {
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
}

impl Arguments {
    /// From JSON text holding `{"args": [...], "kwargs": {...}}`; `name` says where the text
    /// came from, for the message when it is not that.
    pub fn from_json(name: &str, text: &[u8]) -> Result<Arguments> {
        let value: Value = serde_json::from_slice(text)
            .map_err(|e| bad_input(format!("input {name} is not valid JSON: {e}")))?;
        if let Value::Object(o) = &value
            && let Some(k) = o.keys().find(|k| *k != "args" && *k != "kwargs")
        {
            return Err(bad_input(format!(
                "input {name} has an unknown key `{k}`: expected {{\"args\": [...], \"kwargs\": {{...}}}}"
            )));
        }
        serde_json::from_value(value).map_err(|e| {
            bad_input(format!(
                "input {name} must be {{\"args\": [...], \"kwargs\": {{...}}}}: {e}"
            ))
        })
    }
}

/// The `call` answer: what `invoke()` calls, and the environment it sees.
#[derive(Debug, Serialize)]
pub struct CallInput<'a> {
    pub function: &'a str,
    pub env: BTreeMap<&'a str, &'a str>,
    pub args: &'a [Value],
    pub kwargs: &'a Map<String, Value>,
}

/// The `error` message: an exception raised in the guest, with the frames that lead to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestException {
    /// `load` (running the kept definitions), `warm-up` (the bundle's warm-up calls, in a call
    /// that loads the bundle itself), `call`, or `result` (converting the value).
    pub phase: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub frames: Vec<Frame>,
    /// Frames left out between the outermost and the innermost ones shown, in a deep stack.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One traceback frame: in the notebook (`cell` set) or in a library file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frame {
    pub file: String,
    pub cell: Option<usize>,
    pub line: usize,
    pub function: String,
    pub text: String,
    /// How many more times this frame repeats right below it (a recursion), as Python's
    /// "[Previous line repeated N more times]" says.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeated: usize,
}

impl fmt::Display for GuestException {
    /// Python's traceback, with notebook frames written `churn.ipynb, cell 7, line 3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.frames.is_empty() {
            writeln!(f, "Traceback (most recent call last):")?;
        }
        for (i, frame) in self.frames.iter().enumerate() {
            if self.omitted > 0 && i == self.frames.len() / 2 {
                writeln!(f, "  [{} frames omitted]", self.omitted)?;
            }
            let place = match frame.cell {
                Some(cell) => format!("{}, cell {cell}, line {}", frame.file, frame.line),
                None => format!("{}, line {}", frame.file, frame.line),
            };
            let function = if frame.function == "<module>" {
                String::new()
            } else {
                format!(", in {}", frame.function)
            };
            writeln!(f, "  {place}{function}")?;
            if !frame.text.is_empty() {
                writeln!(f, "    {}", frame.text)?;
            }
            if frame.repeated > 0 {
                writeln!(
                    f,
                    "  [Previous line repeated {} more times]",
                    frame.repeated
                )?;
            }
        }
        if self.message.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_guest_speaks_the_same_protocol_version() {
        assert!(
            GUEST_SOURCE.contains(&format!("\nPROTOCOL = {PROTOCOL}\n")),
            "guest.py must say PROTOCOL = {PROTOCOL}"
        );
        for script in [
            Script::Analyse,
            Script::LoadAndCall,
            Script::LoadAndFreeze,
            Script::Call,
        ] {
            let turns = script.turns();
            assert!(
                turns
                    .last()
                    .unwrap()
                    .starts_with(&format!("_start({PROTOCOL})\n"))
            );
        }
    }

    #[test]
    fn the_guest_knows_the_call_turn_it_runs_without_compiling() {
        // guest.py's `_run_call_turns_directly` runs this exact text as `invoke()`; were the
        // two to differ, every call would compile its turn again (correct, but slower).
        assert_eq!(
            Script::Call.turns(),
            [format!("_start({PROTOCOL})\ninvoke()\n")]
        );
        assert!(GUEST_SOURCE.contains("\n_CALL_TURN = f\"_start({PROTOCOL})\\ninvoke()\\n\"\n"));
    }

    #[test]
    fn messages_are_typed_and_malformed_ones_are_named() {
        let mut door = Door::default().call(&CallInput {
            function: "f",
            env: BTreeMap::new(),
            args: &[json!(1)],
            kwargs: &Map::new(),
        });
        assert_eq!(
            door.handle(br#"{"op":"call"}"#).unwrap(),
            br#"{"function":"f","env":{},"args":[1],"kwargs":{}}"#
        );
        // Asked, but not answered in this run.
        assert_eq!(door.handle(br#"{"op":"bundle"}"#), None);
        assert_eq!(door.handle(br#"{"op":"result","value":[1]}"#), Some(vec![]));
        assert_eq!(door.received, [GuestMessage::Result { value: json!([1]) }]);
        door.check().unwrap();

        assert_eq!(door.handle(br#"{"op":"error","type":"E"}"#), None);
        let why = door.check().unwrap_err().to_string();
        assert!(why.contains("malformed `error` message"), "{why}");
        assert!(why.contains("missing field `phase`"), "{why}");

        let mut door = Door::default();
        assert_eq!(door.handle(b"not json"), None);
        assert!(
            door.check()
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
        let mut door = Door::default();
        assert_eq!(door.handle(br#"{"op":"launch"}"#), None);
        assert!(door.check().unwrap_err().to_string().contains("`launch`"));
    }

    #[test]
    fn arguments_name_what_is_wrong() {
        let ok = Arguments::from_json("x", br#"{"args": [1], "kwargs": {"a": 2}}"#).unwrap();
        assert_eq!(ok.args, [json!(1)]);
        for (text, needle) in [
            (&b"{"[..], "not valid JSON"),
            (br#"{"arg": []}"#, "unknown key `arg`"),
            (br#"{"args": 3}"#, "must be"),
            (br#"[1]"#, "must be"),
        ] {
            let e = Arguments::from_json("x", text).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
