//! `opsa`: the command-line interface. Thin: argument parsing, backend choice, file I/O and
//! output formatting; the work is done in the library crates.

mod allocator;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::{Args, Parser, Subcommand, ValueEnum};
use opsa_generate::{generate, score, SamplingParams};
use opsa_models::open::{gather_prompts, prompt_or_messages};
use opsa_models::{open_model, parse_template_vars, PromptedModel, WeightDType};
use opsa_train::cli_support::{self as cli, with_adapter};
use serde_json::json;

#[derive(Parser)]
#[command(name = "opsa", version, about = "On-policy self-distillation for safety alignment of reasoning LLMs (Burn)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate responses from a Hugging Face model folder (Qwen2 / R1-Distill-Qwen, Qwen3).
    Generate(GenerateArgs),
    /// Log-probabilities of a given response after a prompt (teacher forcing).
    Score(ScoreArgs),
    /// Train a model (method and settings from a TOML config; see configs/).
    Train(TrainArgs),
    /// Evaluate a model on a suite of safety and reasoning benchmarks (see configs/eval/):
    /// OUT/items.jsonl and summary.json.
    Eval(EvalArgs),
    /// Teacher flip rate of candidate privileged contexts: OUT/responses.jsonl (resumable),
    /// results.json, table.md, and the best harmful context in best-context.txt.
    FlipRate(FlipArgs),
    /// Compare runs: a Markdown table and SVG plots from eval (summary.json) and training
    /// (metrics.jsonl) folders.
    Report(ReportArgs),
    /// Per-token teacher–student divergence on the student's own responses, by position and by
    /// token: OUT/kl.json, kl.md, kl_by_position.{svg,png}.
    AnalyzeKl(KlArgs),
    /// Run a comparison recipe (configs/compare/): base evaluation, optional flip-rate search,
    /// every arm trained and evaluated on the same prompts, judge and suite, then the report.
    Compare(CompareArgs),
    /// The whole method on the embedded toy world in minutes on a CPU: base evaluation, flip-rate
    /// search, OPSA with the best context, the SFT and off-policy baselines, evaluation, report.
    Demo(DemoArgs),
    /// The embedded toy world: `opsa toy pretrain` builds the shipped demo model from scratch.
    #[command(subcommand)]
    Toy(ToyCommand),
    /// DGR data refinement: the target model rewrites each external example in its own words
    /// (format and judge checks, fallback to the original); then train with method = "sft".
    Refine(RefineArgs),
    /// Load a Hugging Face folder and write it back as a new one (e.g. to change the dtype),
    /// with the same writer training checkpoints use.
    Convert(ConvertArgs),
}

#[derive(Args, Clone)]
struct JudgeArgs {
    /// Safety judge: `refusal` (rule-based), `model:DIR` (a classifier LM, Llama-Guard style) or
    /// `http:URL` (OpenAI-compatible server; API key from OPSA_JUDGE_API_KEY, model name from
    /// OPSA_JUDGE_MODEL).
    #[arg(long, default_value = "refusal")]
    judge: String,
    /// Prompt template for model:/http: judges, with {prompt} and {response}
    /// (default: configs/judges/llama-guard.txt, built in).
    #[arg(long, value_name = "FILE")]
    judge_template: Option<PathBuf>,
}

impl JudgeArgs {
    fn open<B: Backend>(&self, device: &B::Device) -> Result<Box<dyn opsa_eval::judge::Judge>> {
        Ok(opsa_eval::judge::from_spec::<B>(&self.judge, self.judge_template.as_deref(), device)?)
    }
}

/// The output folder of the commands that cache their results there (eval, flip-rate,
/// analyze-kl), and the backend they run on.
#[derive(Args)]
struct CacheArgs {
    /// Output folder (its files: see above). A rerun with the same inputs resumes, skipping what
    /// is already written (manifest.json records the inputs).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Start over when --out holds results made from other inputs.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
}

#[derive(Args)]
struct EvalArgs {
    /// Hugging Face model folder to evaluate.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors), run
    /// on top of --model without merging (also adapters trained with PEFT).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Suite TOML (benchmarks, samples, sampling, chat-template options).
    #[arg(long, value_name = "FILE")]
    suite: PathBuf,
    #[command(flatten)]
    judge: JudgeArgs,
    #[command(flatten)]
    cache: CacheArgs,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DType,
}

#[derive(Args)]
struct FlipArgs {
    /// Hugging Face folder of the frozen model (the teacher).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors), run
    /// on top of --model without merging (also adapters trained with PEFT).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Candidate contexts, JSONL: {"id", "context", "kind": "harmful" | "benign"} (e.g. configs/contexts/pool.jsonl).
    #[arg(long, value_name = "FILE")]
    contexts: PathBuf,
    /// Harmful prompts (JSONL with `prompt` or `messages`, or any dataset via --prompts-format).
    #[arg(long, value_name = "FILE")]
    prompts: PathBuf,
    /// Format of --prompts (its benign items are left out).
    #[arg(long, value_enum, default_value = "jsonl")]
    prompts_format: DatasetFormat,
    /// Benign prompts, JSONL with `prompt` or `messages` (for the benign contexts' over-refusal).
    #[arg(long, value_name = "FILE")]
    benign_prompts: Option<PathBuf>,
    #[command(flatten)]
    judge: JudgeArgs,
    /// Where the context goes (as in the trainer).
    #[arg(long, value_enum, default_value = "prepend")]
    placement: PlacementArg,
    /// Greedy response length.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Chat-template variable KEY=VALUE (repeatable), e.g. enable_thinking=false.
    #[arg(long = "template-var", value_name = "KEY=VALUE")]
    template_vars: Vec<String>,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Args)]
struct DemoArgs {
    /// Output folder (the world's data, configs, runs, evaluations, report). Rerunning with the
    /// same folder resumes.
    #[arg(long, value_name = "DIR", default_value = "demo-run")]
    out: PathBuf,
    /// The toy model (shipped in the repository; run from its root or pass the path).
    #[arg(long, value_name = "DIR", default_value = "models/toy-qwen3")]
    model: PathBuf,
    /// The external-KD arm's teacher: a second toy model with the student's tokenizer.
    #[arg(long, value_name = "DIR", default_value = "models/toy-qwen3-teacher")]
    teacher: PathBuf,
    /// Optimiser steps per arm.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Items per evaluation set.
    #[arg(long, default_value_t = 40)]
    eval_items: usize,
    /// The (first) seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run the whole demo for this many seeds (SEED, SEED + 1, …; each in OUT/seed-K) and
    /// report mean ± sd with error bars.
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Redo the stages whose inputs changed (other options, model, data) instead of refusing.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PersonaArg {
    Student,
    Teacher,
}

#[derive(Subcommand)]
enum ToyCommand {
    /// Generate the world's corpus, train a tokenizer, initialise a small Qwen3 model and train it
    /// on the corpus (how models/toy-qwen3 was made). Rerun to resume an interrupted run.
    Pretrain(ToyPretrainArgs),
}

#[derive(Args)]
struct ToyPretrainArgs {
    /// Hugging Face folder to write.
    #[arg(long, value_name = "DIR", default_value = "models/toy-qwen3")]
    out: PathBuf,
    /// Work folder: corpus, tokenizer, initial weights, the resumable training run.
    #[arg(long, value_name = "DIR", default_value = "runs/toy-pretrain")]
    work: PathBuf,
    /// Optimiser steps.
    #[arg(long, default_value_t = 1200)]
    steps: usize,
    /// Examples generated for the corpus.
    #[arg(long, default_value_t = 40_000)]
    corpus_size: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seed of the world and the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Whose corpus: the demo's student (latent safety, rewrite skill) or the external,
    /// safety-aligned teacher of the demo's external-KD arm.
    #[arg(long, value_enum, default_value_t = PersonaArg::Student)]
    persona: PersonaArg,
    /// Reuse this model folder's tokenizer instead of training one (the teacher shares the
    /// student's vocabulary).
    #[arg(long, value_name = "DIR")]
    tokenizer_from: Option<PathBuf>,
    /// Replace an existing --out folder, and start the work folder over when it was made with
    /// other settings.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
}

#[derive(Args)]
struct CompareArgs {
    /// Recipe TOML (see configs/compare/).
    #[arg(long, value_name = "FILE")]
    recipe: PathBuf,
    /// Override a key of every arm's training config, e.g. `--set train.steps=50` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Output folder (default: the recipe's out_dir).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Redo the stages whose inputs changed (suite, judge, model, settings) instead of refusing.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
}

#[derive(Args)]
struct RefineArgs {
    /// Hugging Face folder of the target model (the model that will be fine-tuned).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// External examples, JSONL with `prompt` and `response` (optionally `label`, `system`).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Refined JSONL to write (a summary goes to OUT with extension .summary.json).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Rewrite prompt with {prompt}, {response}, {reasoning}, {answer}
    /// (default: configs/refine/dgr-rewrite.txt, built in).
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
    #[command(flatten)]
    judge: JudgeArgs,
    /// Longest rewrite.
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: usize,
    /// Sampling temperature of the rewrites (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Chat-template variable KEY=VALUE (repeatable), e.g. enable_thinking=false.
    #[arg(long = "template-var", value_name = "KEY=VALUE")]
    template_vars: Vec<String>,
    /// Replace an existing --out file.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
}

#[derive(Args)]
struct ReportArgs {
    /// Folders of `opsa eval` (summary.json) and/or `opsa train` (metrics.jsonl) runs.
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// Output folder: report.md, tradeoff.{svg,png}, training_*.{svg,png}.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace an existing report.md.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct KlArgs {
    /// The student (e.g. a trained model, or the base model itself).
    #[arg(long, value_name = "DIR", visible_alias = "model")]
    student: PathBuf,
    /// A LoRA adapter (PEFT format) on the student; the default teacher is then the student's
    /// base with the adapter off, as in LoRA training.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// The teacher's weights (default: the student's).
    #[arg(long, value_name = "DIR")]
    teacher: Option<PathBuf>,
    /// The teacher's privileged context for harmful prompts (text).
    #[arg(long, value_name = "TEXT", required_unless_present = "teacher_context_file")]
    teacher_context: Option<String>,
    /// ... or read from a file (e.g. flip-rate's best-context.txt).
    #[arg(long, value_name = "FILE", conflicts_with = "teacher_context")]
    teacher_context_file: Option<PathBuf>,
    /// The context for prompts labelled benign (default: the harmful one).
    #[arg(long, value_name = "TEXT")]
    benign_context: Option<String>,
    /// Where the contexts go (as in the trainer).
    #[arg(long, value_enum, default_value = "prepend")]
    placement: PlacementArg,
    /// JSONL with `prompt` (or a `messages` conversation) and optional `label` (harmful, the
    /// default, or benign).
    #[arg(long, value_name = "FILE")]
    prompts: PathBuf,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature of the student's responses (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// forward, reverse or mixed (α = 0.5); on the teacher's top-64 unless --full-vocab.
    #[arg(long, value_enum, default_value = "mixed")]
    divergence: DivergenceArg,
    #[arg(long)]
    full_vocab: bool,
    /// Tokens listed in the table.
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Chat-template variable KEY=VALUE (repeatable), e.g. enable_thinking=false.
    #[arg(long = "template-var", value_name = "KEY=VALUE")]
    template_vars: Vec<String>,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config (see configs/). With --resume it defaults to RUN_DIR/config.toml.
    #[arg(long, value_name = "FILE", required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Override a config key: `--set optim.lr=2e-5 --set train.steps=300` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in RUN_DIR from its newest checkpoint (settings must be the run's).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Start over when train.out_dir holds a run made with other settings, or other files.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Print the memory plan of this config (weights, masters, moments, gradients, activations,
    /// KV cache, divergence chunk; needs only the model's config.json) and exit.
    #[arg(long)]
    plan: bool,
    /// With --plan: the longest prompt in tokens (rendered, without the context).
    #[arg(long, value_name = "N", default_value_t = 256, requires = "plan")]
    plan_prompt_tokens: usize,
    /// Compute backend (training runs on it with autodiff).
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
}

#[derive(Args)]
struct ConvertArgs {
    /// Hugging Face model folder to read.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A LoRA adapter (PEFT format) to merge into --model: the written folder is the merged model.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Folder to write (config.json, safetensors, tokenizer files). Must not exist unless --overwrite.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Dtype of the written weights (default: the dtype config.json declares, else f32).
    #[arg(long, value_enum)]
    dtype: Option<DType>,
    /// Replace an existing --out folder (only after the new one is completely written).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// Pure-Rust CPU reference (deterministic; the test backend).
    Ndarray,
    /// Faster pure-Rust CPU backend.
    Flex,
    /// GPU through wgpu (Vulkan/Metal/DX12; lavapipe on CPU).
    Wgpu,
    /// NVIDIA GPUs through CUDA.
    Cuda,
}

/// `--dtype`.
#[derive(Clone, Copy, ValueEnum)]
enum DType {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<DType> for WeightDType {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => WeightDType::F32,
            DType::Bf16 => WeightDType::BF16,
        }
    }
}

/// `--placement`: where the privileged context goes.
#[derive(Clone, Copy, ValueEnum)]
enum PlacementArg {
    System,
    Prepend,
    Append,
}

impl From<PlacementArg> for opsa_distill::Placement {
    fn from(p: PlacementArg) -> Self {
        match p {
            PlacementArg::System => opsa_distill::Placement::System,
            PlacementArg::Prepend => opsa_distill::Placement::Prepend,
            PlacementArg::Append => opsa_distill::Placement::Append,
        }
    }
}

/// `analyze-kl --divergence`.
#[derive(Clone, Copy, ValueEnum)]
enum DivergenceArg {
    Forward,
    Reverse,
    Mixed,
}

/// `flip-rate --prompts-format`: the names of `opsa_eval::datasets::FORMATS`.
#[derive(Clone, Copy, ValueEnum)]
enum DatasetFormat {
    Jsonl,
    Strongreject,
    Harmbench,
    Xstest,
    #[value(name = "gsm8k")]
    Gsm8k,
    #[value(name = "math500")]
    Math500,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json, ...).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors), run
    /// on top of --model without merging (also adapters trained with PEFT).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Compute backend; only backends compiled in (cargo features) are available.
    /// Default: the first compiled in of ndarray, flex, wgpu, cuda.
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// Weight dtype during the run: f32 (CPU default) or bf16 (GPU). Norms, softmax and
    /// log-probs are computed in f32 either way.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DType,
    /// Render the prompt with the model's chat template (one user message, or the line's
    /// `messages` conversation, plus the generation prompt), as
    /// `apply_chat_template(add_generation_prompt=True, tokenize=True)`: no special tokens are
    /// added to the rendered text (the template writes its own BOS). Without --chat a prompt is
    /// plain text, encoded as `tokenizer(text)` (with the tokenizer's own special tokens, e.g.
    /// Llama-3's BOS).
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message placed before the user message.
    #[arg(long, value_name = "TEXT", requires = "chat")]
    system: Option<String>,
    /// With --chat: an extra template variable, KEY=VALUE, VALUE parsed as JSON when it parses
    /// (e.g. `--template-var enable_thinking=false` for Qwen3). Repeatable.
    #[arg(long = "template-var", value_name = "KEY=VALUE", requires = "chat")]
    template_vars: Vec<String>,
    /// Print JSON instead of text for people.
    #[arg(long)]
    json: bool,
}

impl ModelArgs {
    fn open<B: Backend>(&self, device: &B::Device) -> Result<PromptedModel<B>> {
        let (chat, system) = (self.chat, self.system.as_deref());
        Ok(PromptedModel::open(&self.model, self.adapter.as_deref(), self.dtype.into(), chat, system, &self.template_vars, device)?)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// A prompt (repeatable). Give --prompt or --prompts-file.
    #[arg(long, value_name = "TEXT")]
    prompt: Vec<String>,
    /// JSONL file, one object per line with a string field `prompt` or (with --chat) an
    /// OpenAI-style `messages` list of {"role": "system"|"user"|"assistant", "content"} ending
    /// with a user turn (other fields are ignored).
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    prompts_file: Option<PathBuf>,
    /// Prompts run together in one batch.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Maximum number of generated tokens per prompt.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed; a prompt's sample depends on the seed and its index, not on the batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the response contains this text (repeatable; excluded from `text`).
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// The prompt (plain text encoded as `tokenizer(text)`; with --chat, rendered as a user message).
    #[arg(long, required_unless_present = "messages")]
    prompt: Option<String>,
    /// Instead of --prompt, with --chat: a conversation as a JSON list of
    /// {"role": "system"|"user"|"assistant", "content"} ending with a user turn; the response
    /// is appended to it, rendered with the generation prompt.
    #[arg(long, value_name = "JSON", conflicts_with = "prompt", requires = "chat")]
    messages: Option<String>,
    /// The response whose tokens are scored; tokenised on its own and appended to the prompt.
    #[arg(long)]
    response: String,
}

fn main() -> ExitCode {
    allocator::configure();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(a) => dispatch(a.m.backend, |r| r.generate(a)),
        Command::Score(a) => dispatch(a.m.backend, |r| r.score(a)),
        Command::Convert(a) => dispatch(None, |r| r.convert(a)),
        Command::Train(a) => dispatch(a.backend, |r| r.train(a)),
        Command::Eval(a) => dispatch(a.cache.backend, |r| r.eval(a)),
        Command::FlipRate(a) => dispatch(a.cache.backend, |r| r.flip_rate(a)),
        Command::Report(a) => report(a),
        Command::AnalyzeKl(a) => dispatch(a.cache.backend, |r| r.analyze_kl(a)),
        Command::Refine(a) => dispatch(a.backend, |r| r.refine(a)),
        Command::Compare(a) => dispatch(a.backend, |r| r.compare(a)),
        Command::Demo(a) => dispatch(a.backend, |r| r.demo(a)),
        Command::Toy(ToyCommand::Pretrain(a)) => dispatch(a.backend, |r| r.toy_pretrain(a)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command on one backend; implemented once, generically, in [`Runner`].
struct Runner<B: Backend> {
    device: B::Device,
}

fn default_backend() -> Result<BackendKind> {
    let compiled = [
        (cfg!(feature = "ndarray"), BackendKind::Ndarray),
        (cfg!(feature = "flex"), BackendKind::Flex),
        (cfg!(feature = "wgpu"), BackendKind::Wgpu),
        (cfg!(feature = "cuda"), BackendKind::Cuda),
    ];
    compiled.iter().find(|(on, _)| *on).map(|(_, k)| *k).context("this binary was built without any backend feature")
}

fn dispatch(kind: Option<BackendKind>, f: impl FnOnce(&dyn Commands) -> Result<()>) -> Result<()> {
    let kind = match kind {
        Some(k) => k,
        None => default_backend()?,
    };
    match kind {
        #[cfg(feature = "ndarray")]
        BackendKind::Ndarray => f(&Runner::<burn::backend::NdArray> { device: Default::default() }),
        #[cfg(feature = "flex")]
        BackendKind::Flex => f(&Runner::<burn::backend::Flex> { device: Default::default() }),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => f(&Runner::<burn::backend::Wgpu> { device: Default::default() }),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => f(&Runner::<burn::backend::Cuda> { device: Default::default() }),
        #[allow(unreachable_patterns)]
        other => bail!(
            "backend `{}` is not compiled into this binary; rebuild with `--features {}`",
            format!("{other:?}").to_lowercase(),
            format!("{other:?}").to_lowercase()
        ),
    }
}

/// The commands, implemented once generically over the backend by [`Runner`].
trait Commands {
    fn generate(&self, a: &GenerateArgs) -> Result<()>;
    fn score(&self, a: &ScoreArgs) -> Result<()>;
    fn convert(&self, a: &ConvertArgs) -> Result<()>;
    fn train(&self, a: &TrainArgs) -> Result<()>;
    fn eval(&self, a: &EvalArgs) -> Result<()>;
    fn flip_rate(&self, a: &FlipArgs) -> Result<()>;
    fn analyze_kl(&self, a: &KlArgs) -> Result<()>;
    fn refine(&self, a: &RefineArgs) -> Result<()>;
    fn compare(&self, a: &CompareArgs) -> Result<()>;
    fn toy_pretrain(&self, a: &ToyPretrainArgs) -> Result<()>;
    fn demo(&self, a: &DemoArgs) -> Result<()>;
}

fn report(a: &ReportArgs) -> Result<()> {
    let md = opsa_eval::report::report(&a.runs, &a.out, a.overwrite)?;
    print!("{md}");
    eprintln!("report written to {}", a.out.display());
    Ok(())
}

/// Set by Ctrl-C: the trainer saves a checkpoint at the end of the step and stops.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Long work that Ctrl-C stops cleanly: the current step finishes, a checkpoint is saved, and
/// `how_to_continue` (said on Ctrl-C) continues from it.
fn interruptible(how_to_continue: String) -> opsa_train::RunControl<'static> {
    let _ = ctrlc::set_handler(move || {
        eprintln!("\ninterrupt: finishing this step, saving a checkpoint, then stopping ({how_to_continue} to continue)");
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    opsa_train::RunControl { interrupt: Some(&INTERRUPTED), stop_after: None, progress: true }
}

impl<B: Backend> Commands for Runner<B> {
    fn generate(&self, a: &GenerateArgs) -> Result<()> {
        // (where the prompt comes from, for errors; the prompt)
        let prompts = gather_prompts(a.prompts_file.as_deref(), &a.prompt)?;
        let params = SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            max_new_tokens: a.max_new_tokens,
            seed: a.seed,
            stop_strings: a.stop.clone(),
        };
        params.validate()?;
        let l = a.m.open::<B>(&self.device)?;
        let encoded: Vec<Vec<u32>> = prompts.iter().map(|(where_, p)| l.encode_prompt(p).with_context(|| where_.clone())).collect::<Result<_>>()?;
        let bar = indicatif::ProgressBar::new(prompts.len() as u64).with_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} prompts [{elapsed_precise} < {eta_precise}]")
                .expect("valid template"),
        );
        if prompts.len() == 1 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let bs = a.batch_size as usize;
        for start in (0..prompts.len()).step_by(bs) {
            let end = (start + bs).min(prompts.len());
            let idx: Vec<u64> = (start as u64..end as u64).collect();
            let gens = generate(&l.model, &encoded[start..end], &idx, &params, l.tok.eos_ids(), Some(&l.tok))
                .with_context(|| format!("model {}", a.m.model.display()))?;
            for (i, g) in (start..end).zip(gens) {
                if a.m.json {
                    let obj = json!({
                        "index": i,
                        "prompt": prompts[i].1.to_json(),
                        "prompt_ids": g.prompt_ids,
                        "token_ids": g.token_ids,
                        "text": g.text,
                        "logprobs": g.logprobs,
                        "finish_reason": g.finish_reason.as_str(),
                    });
                    writeln!(out, "{obj}")?;
                } else {
                    if prompts.len() > 1 {
                        writeln!(out, "=== prompt {i}: {}", prompts[i].1.request())?;
                    }
                    writeln!(out, "{}", g.text)?;
                    writeln!(
                        out,
                        "[{} tokens, finish: {}, mean log-prob {:.3}]",
                        g.token_ids.len(),
                        g.finish_reason.as_str(),
                        g.logprobs.iter().sum::<f32>() / g.logprobs.len().max(1) as f32
                    )?;
                }
            }
            out.flush()?;
            bar.inc((end - start) as u64);
        }
        bar.finish_and_clear();
        Ok(())
    }

    fn eval(&self, a: &EvalArgs) -> Result<()> {
        let suite = opsa_eval::suite::Suite::load(&a.suite)?;
        let mut judge = a.judge.open::<B>(&self.device)?;
        let (model, tok) = open_model::<B>(&a.model, a.adapter.as_deref(), a.dtype.into(), &self.device)?;
        let inputs = with_adapter(opsa_eval::suite::eval_inputs(&a.model, a.dtype.into(), &suite, judge.as_ref())?, a.adapter.as_deref())?;
        let summary = opsa_eval::suite::run_suite(&model, &tok, &suite, judge.as_mut(), inputs, &a.cache.out, a.cache.overwrite, true)
            .with_context(|| format!("evaluating {}", a.model.display()))?;
        println!("{}", serde_json::to_string_pretty(&summary)?);
        Ok(())
    }

    fn flip_rate(&self, a: &FlipArgs) -> Result<()> {
        if a.max_new_tokens == 0 || a.batch_size == 0 {
            bail!("--max-new-tokens and --batch-size must be at least 1");
        }
        let candidates = opsa_eval::flip::read_candidates(&a.contexts)?;
        let format = a.prompts_format.to_possible_value().expect("not skipped");
        let (harmful, benign) = cli::flip_prompts(format.get_name(), &a.prompts, a.benign_prompts.as_deref(), &candidates)?;
        let mut judge = a.judge.open::<B>(&self.device)?;
        let (model, tok) = open_model::<B>(&a.model, a.adapter.as_deref(), WeightDType::F32, &self.device)?;
        let settings = opsa_eval::flip::FlipSettings {
            placement: a.placement.into(),
            separator: "\n\n".into(),
            max_new_tokens: a.max_new_tokens,
            batch_size: a.batch_size,
            vars: parse_template_vars(&a.template_vars)?,
        };
        let (out, overwrite) = (&a.cache.out, a.cache.overwrite);
        let inputs = with_adapter(opsa_eval::flip::flip_inputs(&a.model, &harmful, &benign, &settings)?, a.adapter.as_deref())?;
        opsa_eval::flip::flip_rate(&model, &tok, &candidates, &harmful, &benign, judge.as_mut(), &settings, inputs, out, overwrite, true)
            .with_context(|| format!("model {}", a.model.display()))?;
        print!("{}", std::fs::read_to_string(out.join("table.md"))?);
        eprintln!("best harmful context written to {}", out.join("best-context.txt").display());
        Ok(())
    }

    fn analyze_kl(&self, a: &KlArgs) -> Result<()> {
        use opsa_distill::{Divergence, DivergenceKind};
        let contexts = cli::kl_contexts(a.teacher_context.as_deref(), a.teacher_context_file.as_deref(), a.benign_context.as_deref(), a.placement.into())?;
        let kind = match a.divergence {
            DivergenceArg::Forward => DivergenceKind::Forward,
            DivergenceArg::Reverse => DivergenceKind::Reverse,
            DivergenceArg::Mixed => DivergenceKind::Mixed { alpha: 0.5 },
        };
        let div = Divergence { kind, top_k: if a.full_vocab { None } else { Some(64) }, temperature: 1.0, clip: None };
        let prompts = cli::read_labelled_prompts(&a.prompts)?;
        let (student, tok) = open_model::<B>(&a.student, a.adapter.as_deref(), WeightDType::F32, &self.device)?;
        let teacher = cli::kl_teacher(&student, &a.student, a.adapter.is_some(), a.teacher.as_deref(), &self.device)?;
        let params = SamplingParams { temperature: a.temperature, max_new_tokens: a.max_new_tokens, seed: a.seed, ..Default::default() };
        let vars = parse_template_vars(&a.template_vars)?;
        let teacher_dir = a.teacher.as_ref().unwrap_or(&a.student);
        let inputs = with_adapter(opsa_eval::kl::kl_inputs(&a.student, teacher_dir, &contexts, &prompts, &vars, &div, &params)?, a.adapter.as_deref())?;
        opsa_eval::kl::analyze_kl(&student, &teacher, &tok, &contexts, &prompts, &vars, &div, &params, inputs, &a.cache.out, a.cache.overwrite, a.top)
            .with_context(|| format!("student {}, teacher {}", a.student.display(), teacher_dir.display()))?;
        print!("{}", std::fs::read_to_string(a.cache.out.join("kl.md"))?);
        Ok(())
    }

    fn train(&self, a: &TrainArgs) -> Result<()> {
        let cfg = cli::train_config(a.config.as_deref(), a.resume.as_deref(), &a.set)?;
        if a.plan {
            let plan = opsa_train::plan::memory_plan(&cfg, a.plan_prompt_tokens)?;
            print!("{}", plan.render());
            return Ok(());
        }
        cli::claim_train_run(&cfg, a.resume.as_deref(), a.overwrite)?;
        let control = interruptible(format!("continue with `opsa train --resume {}`", cfg.train.out_dir.display()));
        let out = opsa_train::train::<burn::backend::Autodiff<B>>(&cfg, a.resume.is_some(), &control, &self.device)?;
        eprintln!("done: final model in {}", out.display());
        Ok(())
    }

    fn demo(&self, a: &DemoArgs) -> Result<()> {
        let o = opsa_train::toy::demo::DemoOptions {
            out: a.out.clone(),
            model: a.model.clone(),
            teacher: a.teacher.clone(),
            steps: a.steps,
            eval_items: a.eval_items,
            seed: a.seed,
            seeds: a.seeds,
            progress: true,
        };
        let control = interruptible("run the same command again".into());
        let start = std::time::Instant::now();
        let text = opsa_train::toy::demo::run_demo::<burn::backend::Autodiff<B>>(&o, &control, a.overwrite, &self.device)?;
        println!("{text}");
        eprintln!("demo finished in {:.0} s", start.elapsed().as_secs_f64());
        Ok(())
    }

    fn toy_pretrain(&self, a: &ToyPretrainArgs) -> Result<()> {
        let o = opsa_train::toy::PretrainOptions {
            out: a.out.clone(),
            work: a.work.clone(),
            seed: a.seed,
            steps: a.steps,
            corpus_size: a.corpus_size,
            batch_size: a.batch_size,
            lr: a.lr,
            persona: match a.persona {
                PersonaArg::Student => opsa_train::toy::world::Persona::Student,
                PersonaArg::Teacher => opsa_train::toy::world::Persona::Teacher,
            },
            tokenizer_from: a.tokenizer_from.clone(),
            overwrite: a.overwrite,
        };
        let control = interruptible("run the same command again".into());
        let out = opsa_train::toy::pretrain::<burn::backend::Autodiff<B>>(&o, &control, &self.device)?;
        eprintln!("done: {} (work files in {})", out.display(), a.work.display());
        Ok(())
    }

    fn compare(&self, a: &CompareArgs) -> Result<()> {
        let mut recipe = opsa_train::compare::Recipe::load(&a.recipe, &a.set)?;
        if let Some(o) = &a.out {
            recipe.out_dir = o.clone();
        }
        let control = interruptible("run the same command again".into());
        let md = opsa_train::compare::run_recipe::<burn::backend::Autodiff<B>>(&recipe, &control, a.overwrite, &self.device)?;
        print!("{md}");
        eprintln!("report written to {}", recipe.out_dir.join("report").display());
        Ok(())
    }

    fn refine(&self, a: &RefineArgs) -> Result<()> {
        let summary_path = cli::refine_outputs(&a.out, a.overwrite)?;
        let template = opsa_train::refine::load_template(a.template.as_deref())?;
        if a.batch_size == 0 || a.max_new_tokens == 0 {
            bail!("--batch-size and --max-new-tokens must be positive");
        }
        let input = opsa_train::refine::RefineInput::read(&a.data)?;
        let (model, tok) = open_model::<B>(&a.model, None, WeightDType::F32, &self.device)?;
        let mut judge = a.judge.open::<B>(&self.device)?;
        let opts = opsa_train::refine::RefineOptions {
            template: &template,
            params: SamplingParams { temperature: a.temperature, max_new_tokens: a.max_new_tokens, seed: a.seed, ..Default::default() },
            batch_size: a.batch_size,
            vars: parse_template_vars(&a.template_vars)?,
            progress: true,
        };
        let summary = opsa_train::refine::refine_file(&model, &tok, &input, &a.out, judge.as_mut(), &opts)?;
        println!(
            "refined {} of {} examples (fallback rate {:.1}%); mean per-token NLL under the target model {:.4} -> {:.4}",
            summary.refined,
            summary.examples,
            100.0 * summary.fallback_rate,
            summary.nll_before,
            summary.nll_after
        );
        for (why, n) in &summary.fallback_reasons {
            println!("  fallback: {why}: {n}");
        }
        eprintln!("wrote {} and {}", a.out.display(), summary_path.display());
        Ok(())
    }

    fn convert(&self, a: &ConvertArgs) -> Result<()> {
        let dtype = opsa_models::open::convert::<B>(&a.model, a.adapter.as_deref(), &a.out, a.dtype.map(Into::into), a.overwrite, &self.device)?;
        eprintln!("wrote {} ({})", a.out.display(), dtype.hf_name());
        Ok(())
    }

    fn score(&self, a: &ScoreArgs) -> Result<()> {
        let l = a.m.open::<B>(&self.device)?;
        let prompt = prompt_or_messages(a.prompt.as_deref(), a.messages.as_deref())?;
        let prompt_ids = l.encode_prompt(&prompt)?;
        let response_ids = l.tok.encode(&a.response, false)?;
        let logprobs = score(&l.model, &prompt_ids, &response_ids).with_context(|| format!("model {}", a.m.model.display()))?;
        if a.m.json {
            println!("{}", json!({ "prompt_ids": prompt_ids, "response_ids": response_ids, "logprobs": logprobs }));
        } else {
            for (id, lp) in response_ids.iter().zip(&logprobs) {
                println!("{:>8} {:>10.4}  {:?}", id, lp, l.tok.decode(&[*id], false)?);
            }
            println!("total log-prob {:.4} over {} tokens", logprobs.iter().sum::<f32>(), logprobs.len());
        }
        Ok(())
    }
}
