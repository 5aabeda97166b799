//! The embedded toy world and its model: [`world`] generates the corpus and the evaluation
//! sets; [`pretrain`] builds a byte-level BPE tokenizer and a chat template for it, initialises
//! a small Qwen3-architecture model from scratch and trains it on the corpus with the project's
//! own SFT loop (`train_sft`), then writes a Hugging Face folder (`opsa toy pretrain`).

pub mod demo;
pub mod findings;
pub mod world;

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use opsa_models::checkpoint::random_model;
use opsa_models::{load_model, save_model, LoadOptions, ModelConfig, WeightDType};
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer, TokenizerBuilder};

use crate::config::TrainConfig;
use crate::run::RunControl;
use crate::{io, TrainError};

/// The chat template (Qwen-style turns; the context, if any, is inside the user message).
pub const CHAT_TEMPLATE: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// Qwen2/Qwen3's pre-tokenizer: digits one by one, words with their leading space.
const SPLIT_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (special) and `<think>`, `</think>` (kept in
/// decoded text, as in Qwen3).
const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const THINK: [&str; 2] = ["<think>", "</think>"];

/// The model's size: ~1.0M parameters (f32: ~4 MB).
pub fn model_config_json(vocab_rows: usize, eos: u32, pad: u32) -> serde_json::Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": null,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "head_dim": 32,
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 384,
        "max_position_embeddings": 320,
        "max_window_layers": 4,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "sliding_window": null,
        "use_sliding_window": false,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": vocab_rows
    })
}

fn tok_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Config(format!("toy tokenizer: {e}"))
}

/// Train a byte-level BPE of `vocab_size` on the corpus texts and add the special tokens.
pub fn train_tokenizer(corpus: &[(String, String)], vocab_size: usize) -> Result<Tokenizer, TrainError> {
    let split = Split::new(SplitPattern::Regex(SPLIT_PATTERN.into()), SplitDelimiterBehavior::Isolated, false).map_err(tok_err)?;
    let pre = Sequence::new(vec![PreTokenizerWrapper::Split(split), PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false))]);
    let mut builder = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)))
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .with_decoder(Some(tokenizers::DecoderWrapper::ByteLevel(ByteLevel::new(false, false, false))))
        .build()
        .map_err(tok_err)?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    // The texts as the template lays them out, without the special strings.
    let texts = corpus.iter().map(|(u, a)| {
        let a = THINK.iter().fold(a.clone(), |s, t| s.replace(t, ""));
        format!("user\n{u}\nassistant\n{a}\n")
    });
    builder.train(&mut trainer, texts).map_err(tok_err)?;
    let mut tok: Tokenizer = builder.into();
    tok.add_special_tokens(&SPECIAL.iter().map(|s| AddedToken::from(*s, true)).collect::<Vec<_>>());
    tok.add_tokens(&THINK.iter().map(|s| AddedToken::from(*s, false)).collect::<Vec<_>>());
    Ok(tok)
}

/// Write everything of a model folder except the weights: tokenizer.json, tokenizer_config.json,
/// chat_template.jinja, generation_config.json and config.json. Returns the embedding rows.
pub fn write_model_files(tok: &Tokenizer, dir: &Path) -> Result<usize, TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let id = |s: &str| tok.token_to_id(s).ok_or_else(|| tok_err(format!("no id for {s}")));
    let (eot, end) = (id(SPECIAL[0])?, id(SPECIAL[2])?);
    let n = tok.get_vocab_size(true);
    let rows = n.div_ceil(64) * 64;
    tok.save(dir.join("tokenizer.json"), false).map_err(tok_err)?;
    let mut added = serde_json::Map::new();
    for (s, special) in SPECIAL.iter().map(|s| (*s, true)).chain(THINK.iter().map(|s| (*s, false))) {
        added.insert(
            id(s)?.to_string(),
            json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": special}),
        );
    }
    let files = [
        (
            "tokenizer_config.json",
            json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "added_tokens_decoder": added,
                "bos_token": null,
                "eos_token": SPECIAL[2],
                "pad_token": SPECIAL[0],
                "clean_up_tokenization_spaces": false,
                "model_max_length": 320,
                "split_special_tokens": false
            }),
        ),
        (
            "generation_config.json",
            json!({"eos_token_id": [end, eot], "pad_token_id": eot, "do_sample": false}),
        ),
        ("config.json", model_config_json(rows, end, eot)),
    ];
    for (name, v) in files {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(&v).expect("json") + "\n").map_err(|e| io(&p, e))?;
    }
    let p = dir.join("chat_template.jinja");
    std::fs::write(&p, CHAT_TEMPLATE).map_err(|e| io(&p, e))?;
    Ok(rows)
}

/// Settings of `opsa toy pretrain`.
#[derive(Debug, Clone)]
pub struct PretrainOptions {
    /// The Hugging Face folder to write.
    pub out: PathBuf,
    /// Work folder: corpus, initial model, the training run (resumable).
    pub work: PathBuf,
    pub seed: u64,
    pub steps: usize,
    pub corpus_size: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Whose corpus: the demo's student, or the external safety-aligned teacher.
    pub persona: world::Persona,
    /// Reuse this model folder's tokenizer instead of training one (a teacher that shares the
    /// student's vocabulary, as logit distillation needs).
    pub tokenizer_from: Option<PathBuf>,
    pub overwrite: bool,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        PretrainOptions {
            out: "models/toy-qwen3".into(),
            work: "runs/toy-pretrain".into(),
            seed: 0,
            steps: 1200,
            corpus_size: 40_000,
            batch_size: 32,
            lr: 3e-3,
            persona: world::Persona::Student,
            tokenizer_from: None,
            overwrite: false,
        }
    }
}

/// The training config the pretraining uses (also written to WORK/pretrain.toml).
pub fn pretrain_config(o: &PretrainOptions) -> Result<TrainConfig, TrainError> {
    let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let text = format!(
        r#"# Pretraining of the toy model from scratch: prompt-masked cross-entropy on the world's corpus.
method = "sft"

[model]
path = {init}

[data]
examples = {corpus}
packing = true
pack_len = 320

[divergence]
chunk_size = 1024

[optim]
lr = {lr}
weight_decay = 0.01
grad_clip = 1.0

[schedule]
warmup_ratio = 0.03
min_lr_ratio = 0.05

[train]
out_dir = {run}
batch_size = {batch}
micro_batch_size = {batch}
steps = {steps}
save_every = 100
keep_checkpoints = 1
seed = {seed}
"#,
        init = q(&o.work.join("init")),
        corpus = q(&o.work.join("corpus.jsonl")),
        run = q(&o.work.join("run")),
        lr = o.lr,
        batch = o.batch_size,
        steps = o.steps,
        seed = o.seed,
    );
    let table: toml::Table = toml::from_str(&text).map_err(|e| TrainError::Config(e.to_string()))?;
    TrainConfig::from_table(table, "toy pretrain")
}

/// Build the toy model from nothing: corpus → tokenizer → random init → SFT → `o.out`.
/// Rerunning it resumes an interrupted training run in the work folder.
pub fn pretrain<B: AutodiffBackend>(o: &PretrainOptions, control: &RunControl, device: &B::Device) -> Result<PathBuf, TrainError> {
    if !(o.lr > 0.0 && o.lr.is_finite()) {
        return Err(TrainError::Config(format!("--lr must be a positive finite number, got {}", o.lr)));
    }
    if o.steps == 0 || o.corpus_size == 0 || o.batch_size == 0 {
        return Err(TrainError::Config("--steps, --corpus-size and --batch-size must be positive".into()));
    }
    if o.out.exists() && !o.overwrite {
        return Err(TrainError::Io(format!("{}: already exists (pass --overwrite to replace it)", o.out.display())));
    }
    // The work folder resumes only the same pretraining; other settings are refused (or, with
    // --overwrite, start over).
    let tokenizer_file = o.tokenizer_from.as_ref().map(|d| d.join("tokenizer.json"));
    let tokenizer_identity = match &tokenizer_file {
        Some(f) => opsa_eval::resume::file_identity(f).map_err(opsa_eval::suite::EvalError::from)?,
        None => serde_json::Value::Null,
    };
    let inputs = json!({
        "seed": o.seed, "steps": o.steps, "corpus_size": o.corpus_size, "batch_size": o.batch_size, "lr": o.lr,
        "persona": o.persona.name(), "tokenizer": tokenizer_identity,
    });
    let owned = ["corpus.jsonl", "files", "init", "run", "pretrain.toml"];
    opsa_eval::resume::claim(&o.work, inputs, &owned, o.overwrite).map_err(opsa_eval::suite::EvalError::from)?;
    let init = o.work.join("init");
    let run = o.work.join("run");
    let resume = !crate::checkpoint::list_checkpoints(&run).is_empty();
    if !resume {
        // 1. The corpus (as SFT examples) and 2. the tokenizer and model files.
        let corpus = world::corpus(o.seed, o.corpus_size, o.persona);
        let path = o.work.join("corpus.jsonl");
        let text: String = corpus.iter().map(|(u, a)| serde_json::to_string(&json!({"prompt": u, "response": a})).expect("json") + "\n").collect();
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        let tok = match &tokenizer_file {
            Some(f) => Tokenizer::from_file(f).map_err(|e| tok_err(format!("{}: {e}", f.display())))?,
            None => train_tokenizer(&corpus, 768)?,
        };
        let files = o.work.join("files");
        write_model_files(&tok, &files)?;
        // 3. Random initial weights.
        let cfg_path = files.join("config.json");
        let model_config = ModelConfig::from_file(&cfg_path)?;
        let decoder = model_config.decoder(&cfg_path)?;
        let model = random_model::<B::InnerBackend>(&decoder, o.seed, WeightDType::F32, device)?;
        save_model(&model, &model_config, Some(&files), &init, WeightDType::F32, true)?;
        if run.exists() {
            std::fs::remove_dir_all(&run).map_err(|e| io(&run, e))?;
        }
    }
    // 4. Train with the project's SFT loop.
    let cfg = pretrain_config(o)?;
    std::fs::write(o.work.join("pretrain.toml"), cfg.to_toml()).map_err(|e| io(&o.work, e))?;
    let done = crate::train_sft::<B>(&cfg, resume, control, device)?;
    if done != run.join("final") {
        return Err(TrainError::Interrupted(format!("stopped early; rerun to continue from {}", run.display())));
    }
    // 5. The final folder, written atomically to `out`.
    let (model, model_config) = load_model::<B::InnerBackend>(&done, &LoadOptions::default(), device)?;
    save_model(&model, &model_config, Some(&done), &o.out, WeightDType::F32, o.overwrite)?;
    Ok(o.out.clone())
}
