//! The memory plan of a training config, before any work starts (`opsa train --plan`).
//!
//! An estimate from the model's `config.json` and the config's sizes, not a measurement: bytes
//! for the student's f32 master weights, their compute-dtype copies, the teacher, the AdamW
//! moments and the gradients, the activations autodiff keeps (attention scores included), the
//! rollout KV cache and the divergence chunk. A run has two phases that never overlap, rollouts
//! (no autodiff, the KV cache) and the training pass (activations, gradients); the peak is the
//! larger. The coefficients follow what Burn's autodiff keeps for our decoder (per layer: the
//! inputs of every product, the f32 norm temporaries, and for attention the scores, their f32
//! cast and the softmax's intermediates); they were checked against measured peak RSS on CPU
//! (README, "Memory plan").

use std::fmt::Write as _;

use opsa_distill::Contexts;
use opsa_models::{DecoderConfig, HfTokenizer, ModelConfig};

use crate::config::{Method, TrainConfig};
use crate::TrainError;

/// One line of the plan.
#[derive(Debug, Clone)]
pub struct Item {
    pub what: &'static str,
    pub bytes: u64,
    pub note: String,
}

/// The plan: items of each phase and the peak.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub model: String,
    pub parameters: u64,
    /// Parameters that train (the adapters under LoRA, else all).
    pub trainable: u64,
    /// Student and teacher sequence lengths of the training pass.
    pub student_len: usize,
    pub teacher_len: usize,
    pub rollout: Vec<Item>,
    pub train: Vec<Item>,
}

impl MemoryPlan {
    pub fn rollout_total(&self) -> u64 {
        self.rollout.iter().map(|i| i.bytes).sum()
    }
    pub fn train_total(&self) -> u64 {
        self.train.iter().map(|i| i.bytes).sum()
    }
    pub fn peak(&self) -> u64 {
        self.rollout_total().max(self.train_total())
    }

    /// A plain-text table.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "memory plan for {} ({:.1}M parameters)", self.model, self.parameters as f64 / 1e6);
        if self.trainable != self.parameters {
            let _ = writeln!(s, "LoRA: {:.1}M trainable adapter parameters; the base is frozen and is the teacher", self.trainable as f64 / 1e6);
        }
        let _ = writeln!(s, "sequence lengths: student {} tokens, teacher {} tokens", self.student_len, self.teacher_len);
        for (phase, items, total) in [("rollouts", &self.rollout, self.rollout_total()), ("training pass", &self.train, self.train_total())] {
            let _ = writeln!(s, "\n{phase}:");
            for i in items.iter() {
                let _ = writeln!(s, "  {:<34} {:>11}  {}", i.what, human(i.bytes), i.note);
            }
            let _ = writeln!(s, "  {:<34} {:>11}", "total", human(total));
        }
        let _ = writeln!(s, "\npeak: {}", human(self.peak()));
        s
    }
}

/// Bytes as GiB / MiB / KiB.
pub fn human(b: u64) -> String {
    let f = b as f64;
    if f >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", f / (1024.0 * 1024.0 * 1024.0))
    } else if f >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", f / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", f / 1024.0)
    }
}

/// Activation bytes autodiff keeps for one layer and one sequence of `t` tokens: the linear
/// part and the attention part; and the attention temporaries of one layer's backward pass.
fn layer_activations(c: &DecoderConfig, t: u64, cb: u64) -> (u64, u64, u64) {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (nq, nkv) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    // Per token: the norms' f32 temporaries (2 norms × 3 × h), the products' inputs and outputs
    // (q/k/v/o, gate/up/down, RoPE, the residuals) in the compute dtype.
    let linear = t * (4 * 6 * h + cb * (6 * h + 4 * nq + 4 * nkv + 5 * i));
    // Attention per head and query-key pair: kept, the softmax's f32 exponentials and the
    // probabilities in the compute dtype; while one layer is back-propagated, about three f32
    // gradients of the same shape.
    let pairs = c.num_attention_heads as u64 * t * t;
    (linear, pairs * (4 + cb), pairs * 3 * 4)
}

/// Build the plan for `cfg`. `prompt_tokens` is the longest prompt (rendered, without context).
pub fn memory_plan(cfg: &TrainConfig, prompt_tokens: usize) -> Result<MemoryPlan, TrainError> {
    let dir = &cfg.model.path;
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(TrainError::Config(format!(
            "{}: no config.json: model.path must be a Hugging Face model folder (the plan reads its shape)",
            dir.display()
        )));
    }
    let mc = ModelConfig::from_file(&config_path)?;
    let c = mc.decoder(&config_path)?;
    let p = c.num_parameters() as u64;
    let cb: u64 = if cfg.dtype() == opsa_models::WeightDType::BF16 { 2 } else { 4 };
    let mixed = cb < 4;
    let (l, v, h) = (c.num_hidden_layers as u64, c.vocab_size as u64, c.hidden_size as u64);
    let layer_params = (p - v * h * if c.tie_word_embeddings { 1 } else { 2 }) / l.max(1);

    // The context the teacher sees (OPSA, off-policy SD): counted with the model's tokenizer
    // when the folder has one, else about 4 characters a token.
    let context_text = if matches!(cfg.method, Method::Opsa | Method::OffpolicySd) {
        let Contexts { harmful, benign, .. } = cfg.contexts()?;
        if harmful.len() >= benign.len() { harmful } else { benign }
    } else {
        String::new()
    };
    let context_tokens = if context_text.is_empty() {
        0
    } else {
        match HfTokenizer::from_dir(dir) {
            Ok(tok) => tok.encode(&context_text, false).map(|v| v.len()).unwrap_or(context_text.len() / 4),
            Err(_) => context_text.len() / 4,
        }
    };
    let has_teacher = match cfg.method {
        Method::Opsa | Method::Copsd => true,
        Method::ExternalKd => cfg.kd.teacher.is_some(),
        Method::Sft | Method::OffpolicySd => false,
    };
    let generates = matches!(cfg.method, Method::Opsa | Method::Copsd | Method::OffpolicySd);
    let ts = if generates || cfg.data.pack_len == 0 { prompt_tokens + cfg.rollout.max_new_tokens } else { cfg.data.pack_len };
    let tt = if cfg.method == Method::Opsa { ts + context_tokens } else { ts };
    let m = cfg.train.micro_batch_size as u64;

    // LoRA: the base is held once, frozen, in the compute dtype (it is also the teacher, with the
    // adapters off); only the adapters have f32 masters, moments and gradients.
    let lora = cfg.lora.as_ref();
    let pa = lora.map_or(p, |l| l.num_parameters(&c) as u64);
    let masters = match lora {
        None => Item { what: "student f32 master weights", bytes: 4 * p, note: "trained in f32".into() },
        Some(l) => Item { what: "LoRA adapters, f32 masters", bytes: 4 * pa, note: format!("r = {}, {} modules × {} layers", l.r, l.target_modules.len(), c.num_hidden_layers) },
    };
    let moments = Item { what: "AdamW moments (f32)", bytes: 8 * pa, note: "two per trained parameter".into() };
    let teacher = match lora {
        Some(_) => None,
        None => has_teacher.then(|| Item { what: "teacher weights", bytes: cb * p, note: format!("{} bytes/param, frozen", cb) }),
    };
    let base = lora.map(|_| Item {
        what: "base weights (frozen)",
        bytes: cb * p,
        note: format!("{} bytes/param{}", cb, if has_teacher { "; also the teacher (adapters off)" } else { "" }),
    });

    let mut rollout = vec![masters.clone(), moments.clone()];
    let mut train = vec![masters, moments];
    if let Some(b) = base {
        rollout.push(b.clone());
        train.push(b);
    }
    if let Some(t) = &teacher {
        rollout.push(t.clone());
        train.push(t.clone());
    }
    if generates {
        if mixed && lora.is_none() {
            rollout.push(Item { what: "rollout weights (bf16 copy)", bytes: 2 * p, note: "cast once per step".into() });
        }
        let rb = cfg.rollout.batch_size as u64;
        let kv = rb * (prompt_tokens + cfg.rollout.max_new_tokens) as u64 * l * 2 * (c.num_key_value_heads * c.head_dim) as u64 * cb;
        rollout.push(Item {
            what: "rollout KV cache",
            bytes: kv,
            note: format!("{} rows × {} positions", rb, prompt_tokens + cfg.rollout.max_new_tokens),
        });
        rollout.push(Item { what: "rollout logits", bytes: rb * v * 4 * 4, note: "one position per row, f32".into() });
        if c.tie_word_embeddings
            && opsa_models::decoder::DECODE_HEAD_ROWS.contains(&cfg.rollout.batch_size)
            && cfg.rollout.max_new_tokens >= opsa_models::decoder::DECODE_HEAD_MIN_STEPS
        {
            rollout.push(Item {
                what: "tied head, contiguous copy",
                bytes: v * h * cb,
                note: "the embedding transposed once per generation (faster decoding)".into(),
            });
        }
    }

    let accumulating = cfg.train.micro_batch_size < cfg.train.batch_size * cfg.rollout.n.max(1);
    train.push(Item {
        what: "gradients (f32)",
        bytes: 4 * pa * if accumulating { 2 } else { 1 },
        note: if accumulating { "the step's sum and one micro-batch's".into() } else { "one micro-batch".into() },
    });
    if mixed && lora.is_none() {
        let (bytes, note) = if cfg.train.recompute { (2 * layer_params, "one layer at a time (recompute)") } else { (2 * p, "kept by autodiff for the backward pass") };
        train.push(Item { what: "bf16 compute weights", bytes, note: note.into() });
    }
    let (lin, att, att_backward) = layer_activations(&c, ts as u64, cb);
    // LoRA: each adapted product also keeps its `[t, r]` middle.
    let lin = lin + lora.map_or(0, |l| ts as u64 * cb * (l.r * l.target_modules.len()) as u64);
    let acts = if cfg.train.recompute { m * (l * ts as u64 * h * cb + lin + att + att_backward) } else { m * (l * (lin + att) + att_backward) };
    train.push(Item {
        what: "student activations",
        bytes: acts,
        note: format!(
            "{} × {} tokens{}; attention {} of it",
            m,
            ts,
            if cfg.train.recompute { ", layer inputs + one layer (recompute)" } else { ", every layer" },
            human(m * att_backward + if cfg.train.recompute { m * att } else { m * l * att })
        ),
    });
    if has_teacher {
        // The teacher runs first and without autodiff: what stays is its final hidden states; its
        // one-layer temporaries are gone before the student's activations exist.
        train.push(Item {
            what: "teacher hidden states",
            bytes: m * tt as u64 * h * cb,
            note: format!("{} × {} tokens (its forward holds one layer at a time)", m, tt),
        });
    }
    let chunk = cfg.divergence.chunk_size as u64;
    train.push(Item {
        what: "divergence chunk",
        bytes: chunk * v * 4 * 8 + m * ts as u64 * h * 4,
        note: format!("{} positions × {} vocab, f32, and ∂L/∂h", chunk, v),
    });
    Ok(MemoryPlan {
        model: dir.display().to_string(),
        parameters: p,
        trainable: pa,
        student_len: ts,
        teacher_len: tt,
        rollout,
        train,
    })
}
