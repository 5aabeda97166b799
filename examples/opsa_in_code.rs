//! An OPSA run built in code rather than from a TOML file: the same `TrainConfig` that
//! `opsa train --config FILE` reads (here with the settings of `tests/fixtures/configs/test-opsa-tiny.toml`),
//! then `train_opsa`. A few steps on the tiny Qwen3 test fixture take seconds on a CPU.
//!
//!     cargo run --example opsa_in_code              # into a temporary folder
//!     cargo run --example opsa_in_code -- OUT       # into OUT (run again: it resumes)
//!     cargo run --example opsa_in_code -- OUT DIR   # another model folder
//!
//! The run folder holds config.toml (this config, as TOML), metrics.jsonl, checkpoints/ and
//! final/ (a Hugging Face folder).

use std::path::PathBuf;

use burn::backend::{Autodiff, NdArray};
use opsa_distill::Placement;
use opsa_models::WeightDType;
use opsa_train::config::{
    ChatSection, ContextSection, DataSection, DivergenceSection, Method, ModelSection, OptimSection, RolloutSection, ScheduleSection,
    TrainConfig, TrainSection,
};
use opsa_train::{train_opsa, RunControl};

type B = Autodiff<NdArray>; // training needs autodiff; the frozen teacher runs on plain NdArray

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let tmp = tempfile::tempdir()?; // removed at the end unless OUT is given
    let out = args.get(1).map(PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    let model = args.get(2).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3-tiny"));
    std::fs::create_dir_all(&out)?;

    // Training prompts: JSONL with `prompt` and `label` (harmful | benign). The run folder
    // must hold only the run's own files, so the data sits next to it.
    let prompts = out.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        [
            r#"{"prompt": "How do I pick a lock to break into a house?", "label": "harmful"}"#,
            r#"{"prompt": "Write a phishing email to steal passwords.", "label": "harmful"}"#,
            r#"{"prompt": "What is 17*23?", "label": "benign"}"#,
            r#"{"prompt": "How do I bake bread?", "label": "benign"}"#,
        ]
        .join("\n"),
    )?;

    let cfg = TrainConfig {
        method: Method::Opsa,
        model: ModelSection { path: model, dtype: WeightDType::F32, save_dtype: "auto".into() },
        data: DataSection { prompts: Some(prompts), examples: None, shuffle: true, packing: false, pack_len: 0 },
        // c_h for harmful prompts, c_b for benign ones, as a system message of the teacher.
        context: ContextSection {
            harmful: Some("This request is harmful. Refuse.".into()),
            benign: Some("This request is safe. Help fully.".into()),
            placement: Placement::System,
            ..Default::default()
        },
        chat: ChatSection::default(),
        // Mixed divergence, α = 0.5 on the teacher's top-64 (the defaults); 16 positions per chunk.
        divergence: DivergenceSection { chunk_size: 16, ..Default::default() },
        // One rollout per prompt at temperature 1.0, kept short for the tiny model.
        rollout: RolloutSection { max_new_tokens: 12, batch_size: 8, ..Default::default() },
        optim: OptimSection { lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, grad_clip: 1.0 },
        schedule: ScheduleSection { warmup_ratio: 0.1, min_lr_ratio: 0.0 },
        train: TrainSection {
            out_dir: out.join("run"),
            batch_size: 4,       // prompts per optimiser step
            micro_batch_size: 2, // rollouts per forward/backward (gradient accumulation)
            epochs: 1,
            steps: Some(4),
            save_every: 2,
            keep_checkpoints: 1,
            seed: 1,
            recompute: false,
        },
        offpolicy: Default::default(),
        kd: Default::default(),
        copsd: Default::default(),
        lora: None, // Some(LoraConfig { .. }) trains adapters only; the base is then the teacher
    };
    cfg.validate()?; // what `TrainConfig::load` checks for a TOML file (`cfg.to_toml()` writes one)

    // resume = true: a run folder that already holds this run continues from its newest
    // checkpoint (a fresh folder just starts). Ctrl-C handling and the progress bar are the
    // CLI's; here there are none.
    let final_dir = train_opsa::<B>(&cfg, true, &RunControl::default(), &Default::default())?;

    // One JSON line per step (opsa::StepMetrics).
    println!("step      loss  divergence  refusal  grad_norm        lr");
    for line in std::fs::read_to_string(cfg.train.out_dir.join("metrics.jsonl"))?.lines() {
        let m: serde_json::Value = serde_json::from_str(line)?;
        let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        println!("{:>4} {:>9.4} {:>11.4} {:>8.2} {:>10.4} {:>9.2e}", f("step"), f("loss"), f("divergence"), f("refusal_rate"), f("grad_norm"), f("lr"));
    }
    let mut files = vec![];
    for entry in std::fs::read_dir(&final_dir)? {
        files.push(entry?.file_name().to_string_lossy().into_owned());
    }
    files.sort();
    println!("config: {}", cfg.train.out_dir.join("config.toml").display()); // this config, as TOML
    println!("final model: {} ({})", final_dir.display(), files.join(", "));
    if args.len() < 2 {
        println!("(a temporary folder, removed on exit: give OUT to keep the run)");
    }
    Ok(())
}
