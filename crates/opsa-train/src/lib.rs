//! `opsa-train`: training loops, one straight-line function per method ([`opsa::train_opsa`]),
//! over small reusable pieces: [`config`], [`data`], [`optim`] (AdamW, global gradient
//! clipping), [`schedule`], [`checkpoint`].

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod opsa;
pub mod optim;
pub mod schedule;

pub use config::TrainConfig;
pub use opsa::{train_opsa, RunControl, StepMetrics};

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
    Generate(#[from] opsa_generate::GenerateError),
    #[error("training stopped: {0}")]
    NonFinite(String),
    #[error("interrupted: {0}")]
    Interrupted(String),
}
