//! The one integration-test binary. Everything runs on the CPU; the `wgpu` module runs when the
//! `wgpu` feature is on (through Mesa's lavapipe on machines without a GPU).

mod common;
mod configs;
mod conversation;
mod cli;
mod baselines;
mod distill;
mod eval;
mod llama;
mod parity;
mod precision;
mod tokenizer;
mod toy;
mod train;
mod lora;
