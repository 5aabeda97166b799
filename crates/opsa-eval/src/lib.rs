//! `opsa-eval`: measuring the safety tax.
//!
//! - [`refusal`]: the rule-based refusal detector (also the trainer's refusal metric);
//! - [`datasets`]: loaders for the benchmark formats, with file:line errors;
//! - [`reasoning`]: final-answer extraction and exact scoring;
//! - [`judge`]: safety judges behind one trait (`refusal`, `model:DIR`, `http:URL`);
//! - [`suite`]: `opsa eval` — generate, judge and score a suite, resumably;
//! - [`flip`]: `opsa flip-rate` — the teacher flip rate of candidate contexts;
//! - [`report`]: `opsa report` — tables and SVG plots comparing runs;
//! - [`kl`]: `opsa analyze-kl` — per-token teacher–student divergence by position and token;
//! - [`plot`]: the small SVG charts they draw;
//! - [`stats`]: Spearman's ρ, mean ± sd over seeds, a dataset's mean per-token NLL;
//! - [`resume`]: the manifest and the JSONL records every resumable command shares.

pub mod datasets;
pub mod flip;
pub mod judge;
pub mod kl;
pub mod plot;
pub mod reasoning;
pub mod refusal;
pub mod report;
pub mod resume;
pub mod stats;
pub mod suite;

pub use refusal::{classify, Verdict};
