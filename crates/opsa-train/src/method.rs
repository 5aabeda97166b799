//! The one dispatch from a config's `method` to its training loop, for `opsa train` and the
//! comparison recipe alike.

use std::path::PathBuf;

use burn::tensor::backend::AutodiffBackend;

use crate::config::{Method, TrainConfig};
use crate::RunControl;
use crate::TrainError;

/// Train `cfg` with its method's loop (fresh, or from the newest checkpoint with `resume`);
/// returns the folder the loop ended with (`train.out_dir/final` when it ran to the end).
pub fn train<B: AutodiffBackend>(cfg: &TrainConfig, resume: bool, control: &RunControl, device: &B::Device) -> Result<PathBuf, TrainError> {
    match cfg.method {
        Method::Opsa => crate::train_opsa::<B>(cfg, resume, control, device),
        Method::Sft => crate::train_sft::<B>(cfg, resume, control, device),
        Method::OffpolicySd => crate::train_offpolicy_sd::<B>(cfg, resume, control, device),
        Method::ExternalKd => crate::train_external_kd::<B>(cfg, resume, control, device),
        Method::Copsd => crate::train_copsd::<B>(cfg, resume, control, device),
    }
}
