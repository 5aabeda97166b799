//! `opsa-train`: training loops, one straight-line function per method ([`opsa::train_opsa`]),
//! over small reusable pieces: [`config`], [`data`], [`optim`] (AdamW, global gradient
//! clipping), [`schedule`], [`checkpoint`].

pub mod checkpoint;
pub mod cli_support;
pub mod compare;
pub mod config;
pub mod data;
pub mod copsd;
pub mod method;
pub mod opsa;
pub mod optim;
pub mod plan;
pub mod refine;
pub mod run;
pub mod schedule;
pub mod sft;
pub mod toy;

pub use config::TrainConfig;
pub use copsd::train_copsd;
pub use method::train;
pub use opsa::{train_opsa, StepMetrics};
pub use run::RunControl;
pub use sft::{train_external_kd, train_offpolicy_sd, train_sft};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error("data: {0}")]
    Data(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Model(#[from] opsa_models::Error),
    #[error(transparent)]
    Generate(opsa_generate::GenerateError),
    #[error(transparent)]
    Eval(#[from] opsa_eval::suite::EvalError),
    #[error(transparent)]
    Judge(#[from] opsa_eval::judge::JudgeError),
    #[error("training stopped: {0}")]
    NonFinite(String),
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// Bad flags or inputs of a command (`opsa train --resume` of a folder without a run, ...).
    #[error("{0}")]
    Input(String),
}

/// Non-finite logits in a rollout stop a run like a non-finite loss does.
impl From<opsa_generate::GenerateError> for TrainError {
    fn from(e: opsa_generate::GenerateError) -> Self {
        match e {
            opsa_generate::GenerateError::NonFinite(_) => TrainError::NonFinite(e.to_string()),
            e => TrainError::Generate(e),
        }
    }
}

/// An I/O error naming its file.
pub(crate) fn io(path: &std::path::Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// Write a file atomically, creating its folder ([`opsa_eval::resume::write_atomic`]: under a
/// temporary name, then renamed into place, so an interruption leaves no half file).
pub(crate) fn write_atomic(path: &std::path::Path, text: impl AsRef<[u8]>) -> Result<(), TrainError> {
    opsa_eval::resume::write_atomic(path, text).map_err(|e| TrainError::Io(e.to_string()))
}
