//! `opsa-distill`: the distillation module.
//!
//! - [`divergence`]: per-token divergences between teacher and student next-token
//!   distributions (forward/reverse KL, generalised JSD, mixed, top-k, sampled-token; temperature,
//!   pointwise clip) and the step-level token-mean reduction;
//! - [`analysis`]: per-token divergence of given responses (no autodiff);
//! - [`context`]: teacher conditioning (context placement, the two prompt streams);
//! - [`chunked`]: the loss and its gradients from final hidden states with memory bounded by a
//!   chunk of positions.

pub mod analysis;
pub mod chunked;
pub mod context;
pub mod divergence;

pub use chunked::{backward_chunked, backward_objective, loss_unchunked, token_logprobs, DistillGrads, Objective, Targets};
pub use divergence::{cross_entropy, ppo_clip, token_mean, top_k_indices, Divergence, DivergenceKind, PerToken};
pub use context::{Contexts, Label, Pair, Placement};
pub use analysis::response_divergence;
