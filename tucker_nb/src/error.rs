//! The library's one error type. Every variant names the file, layer or value at fault so the CLI
//! and the notebook can show it in one readable line.

use std::path::PathBuf;

/// Errors raised by tucker_nb.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("{path}: missing tensor `{key}` (expected by torchvision's ResNet18)")]
    MissingKey { path: PathBuf, key: String },

    #[error("{path}: unexpected tensor `{key}` (not part of a ResNet18 state_dict)")]
    UnexpectedKey { path: PathBuf, key: String },

    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected}")]
    Shape {
        path: PathBuf,
        key: String,
        found: Vec<i64>,
        expected: String,
    },

    #[error("layer {layer}: {message}")]
    Layer { layer: String, message: String },

    #[error("invalid {what}: {message}")]
    Value { what: String, message: String },

    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        Error::File {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub(crate) fn layer(layer: impl Into<String>, message: impl ToString) -> Self {
        Error::Layer {
            layer: layer.into(),
            message: message.to_string(),
        }
    }

    pub(crate) fn value(what: impl Into<String>, message: impl ToString) -> Self {
        Error::Value {
            what: what.into(),
            message: message.to_string(),
        }
    }
}

/// `Ok` when `ok`, else "invalid WHAT: VALUE (must be RULE)".
pub(crate) fn check(ok: bool, what: &str, value: impl std::fmt::Display, rule: &str) -> Result<()> {
    match ok {
        true => Ok(()),
        false => Err(Error::value(what, format!("{value} (must be {rule})"))),
    }
}

/// Largest image side accepted for model inputs and stored images.
pub const MAX_IMAGE_SIDE: i64 = 4096;

/// An image side in 1..=[`MAX_IMAGE_SIDE`].
pub fn check_image_side(what: &str, side: i64) -> Result<()> {
    check(
        (1..=MAX_IMAGE_SIDE).contains(&side),
        what,
        side,
        &format!("in 1..={MAX_IMAGE_SIDE}"),
    )
}

/// A count ≥ 1 (batch sizes, image counts).
pub fn check_count(what: &str, n: usize) -> Result<()> {
    check(n >= 1, what, n, "≥ 1")
}

/// libtorch errors carry a C++ backtrace; the first line says what went wrong.
pub(crate) fn first_line(message: &str) -> &str {
    message
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(message)
        .trim()
}
