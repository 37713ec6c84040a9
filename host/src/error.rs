//! The kinds of failure a user can act on, and the exit code each one gets.
//!
//! Anything that is not one of these is an internal error: a bug in host or its runtime.

use std::fmt;

/// The process exit codes of `host`, documented in README.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The call returned a value.
    Success = 0,
    /// The function (or the code it needs) raised, or returned a value with no JSON form.
    FunctionRaised = 1,
    /// Bad input or usage: a missing file, an unknown function, a malformed argument.
    Usage = 2,
    /// A limit was hit: memory, time or output.
    Limit = 3,
    /// Anything else: a bug in host or its runtime.
    Internal = 4,
    /// `host replay`: the replay went another way than the recording.
    Diverged = 5,
    /// `host evaluate`: more runs changed or newly failing than `--max-changed` or
    /// `--max-failing` allow.
    Regressed = 6,
}

/// Input the user gave that host cannot use. The message says what to change.
#[derive(Debug)]
pub enum UserError {
    BadInput(String),
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserError::BadInput(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for UserError {}

/// A shorthand for returning a [`UserError::BadInput`].
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    UserError::BadInput(message.into()).into()
}
