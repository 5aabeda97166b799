//! `opsa-eval`: evaluation pieces. Today: the rule-based refusal detector that the trainer's
//! metrics and (next) the `refusal` judge share.

pub mod refusal;

pub use refusal::{classify, Verdict};
