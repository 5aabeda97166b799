use std::path::PathBuf;

/// Errors at the I/O and validation boundary of the model crate. Every variant names the file
/// or tensor it is about, so that the CLI can print one clear line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS message is part of the text and not a `source()` as well, so that a chain printed
    /// with `{:#}` says it once.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: invalid JSON: {err}", path.display())]
    Json { path: PathBuf, err: serde_json::Error },
    /// A file that parsed but whose content we cannot use (unsupported option, bad value).
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    /// A bad line of a data file (JSONL prompts, ...): file, 1-based line, what is wrong.
    #[error("{}:{line}: {msg}", path.display())]
    Line { path: PathBuf, line: usize, msg: String },
    /// A weight that is missing, mis-shaped or of an unsupported dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    /// Tokenizer or chat template problems.
    #[error("{0}")]
    Tokenizer(String),
    /// Bad input to a model call (empty prompt, too long for the context, ...).
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), err: source }
    }
    pub(crate) fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Invalid { path: path.into(), msg: msg.into() }
    }
    pub(crate) fn line(path: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::Line { path: path.into(), line, msg: msg.into() }
    }
    pub(crate) fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { name: name.into(), msg: msg.into() }
    }
}
