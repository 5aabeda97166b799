//! Every config: each file under `configs/` and the test-only configs under
//! `tests/fixtures/configs/` parses with the loader that reads it, and every path it names
//! (relative to the repository root, as the commands read them from there) exists. The paths a
//! user provides — datasets under `data/` and the published checkpoints under `models/` that the
//! README says to put there — are recognised by [`USER_PROVIDED`] and skipped by name; the test
//! configs may name none of them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use opsa_models::ModelConfig;
use opsa_train::compare::Recipe;
use opsa_train::data::Constitution;
use opsa_train::TrainConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What users bring: the datasets (`scripts/fetch_data.sh` or their own files) and the
/// published checkpoints the paper configs train. `.gitignore` keeps both out of the repository.
const USER_PROVIDED: &[&str] = &[
    "data/",
    "models/Qwen3-0.6B",
    "models/Qwen3-8B",
    "models/DeepSeek-R1-Distill-Qwen-1.5B",
    "models/DeepSeek-R1-Distill-Llama-8B",
];

/// Keys (dotted, without array indices) whose value is a path a command reads.
const PATH_KEYS: &[&str] = &[
    // Training configs.
    "model.path",
    "data.prompts",
    "data.examples",
    "context.harmful_file",
    "context.benign_file",
    "kd.teacher",
    "copsd.constitution",
    // Comparison recipes.
    "model",
    "suite",
    "judge_template",
    "flip_rate.contexts",
    "flip_rate.prompts",
    "flip_rate.benign_prompts",
    "arm.config",
    "arm.refine.data",
    "arm.refine.template",
    // Evaluation suites.
    "benchmark.path",
];

/// Judge specs: `refusal`, `model:DIR` (DIR is checked) or `http:URL`.
const JUDGE_KEYS: &[&str] = &["judge", "offpolicy.judge"];

/// Folders a command writes, not reads.
const OUTPUT_KEYS: &[&str] = &["out_dir", "train.out_dir"];

/// `KEY=VALUE` overrides of training configs, whose values are checked under their own key.
const OVERRIDE_KEYS: &[&str] = &["set", "arm.set"];

/// Every file below `dir`, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The paths a config names, checked against the repository, and the user-provided ones met.
struct Paths {
    user_provided_met: BTreeSet<&'static str>,
    checked: usize,
}

impl Paths {
    fn check(&mut self, file: &Path, key: &str, value: &str, user_data_allowed: bool) {
        if let Some(u) = USER_PROVIDED.iter().find(|u| value == **u || value.starts_with(&format!("{}/", u.trim_end_matches('/')))) {
            assert!(user_data_allowed, "{}: `{key}` = {value:?} is user data; a test config may only name committed files", file.display());
            self.user_provided_met.insert(u);
            return;
        }
        assert!(root().join(value).exists(), "{}: `{key}` = {value:?} does not exist (relative to the repository root)", file.display());
        self.checked += 1;
    }

    /// Every string of the TOML table: paths checked, judge specs' folders checked, outputs and
    /// overrides handled; any other string that looks like a path fails (a new path key must be
    /// added to the lists above).
    fn walk(&mut self, file: &Path, key: &str, v: &toml::Value, user_data_allowed: bool) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if key.is_empty() { k.clone() } else { format!("{key}.{k}") };
                    self.walk(file, &key, v, user_data_allowed);
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| self.walk(file, key, v, user_data_allowed)),
            toml::Value::String(s) if OUTPUT_KEYS.contains(&key) => {
                assert!(!s.is_empty(), "{}: `{key}` is empty", file.display());
            }
            toml::Value::String(s) if OVERRIDE_KEYS.contains(&key) => {
                let (k, value) = s.split_once('=').unwrap_or_else(|| panic!("{}: `{key}` entry {s:?}: not KEY=VALUE", file.display()));
                let value: toml::Table = toml::from_str(&format!("v = {value}")).unwrap_or_else(|e| panic!("{}: {s:?}: {e}", file.display()));
                self.walk(file, k, &value["v"], user_data_allowed);
            }
            toml::Value::String(s) if JUDGE_KEYS.contains(&key) => match s.split_once(':') {
                Some(("model", dir)) => self.check(file, key, dir, user_data_allowed),
                Some(("http" | "https", _)) => {}
                _ => assert_eq!(s, "refusal", "{}: `{key}`: unknown judge spec", file.display()),
            },
            toml::Value::String(s) if PATH_KEYS.contains(&key) => self.check(file, key, s, user_data_allowed),
            toml::Value::String(s) => {
                assert!(!s.contains('/'), "{}: `{key}` = {s:?} looks like a path: add `{key}` to PATH_KEYS (or OUTPUT_KEYS)", file.display())
            }
            _ => {}
        }
    }
}

fn fail<T>(p: &Path, e: impl std::fmt::Display) -> T {
    panic!("{}: {e}", p.display())
}

fn toml_table(p: &Path) -> toml::Value {
    toml::Value::Table(toml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

#[test]
fn every_config_parses_and_names_only_existing_or_user_provided_paths() {
    let mut paths = Paths { user_provided_met: BTreeSet::new(), checked: 0 };
    let (mut train, mut recipes, mut suites, mut shapes) = (0, 0, 0, 0);
    for (dir, user_data_allowed) in [("configs", true), ("tests/fixtures/configs", false)] {
        for p in files(&root().join(dir)) {
            let rel = p.strip_prefix(root().join(dir)).unwrap().to_str().unwrap().replace('\\', "/");
            let parts: Vec<&str> = rel.split('/').collect();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
            match (parts.as_slice(), ext) {
                // Training configs: the trainer's loader (every method's sections).
                ([_], "toml") => {
                    TrainConfig::load(&p, &[]).unwrap_or_else(|e| fail(&p, e));
                    paths.walk(&p, "", &toml_table(&p), user_data_allowed);
                    train += 1;
                }
                // Comparison recipes: loading also loads every arm's config and the suite.
                (["compare", _], "toml") => {
                    Recipe::load(&p, &[]).unwrap_or_else(|e| fail(&p, e));
                    paths.walk(&p, "", &toml_table(&p), user_data_allowed);
                    recipes += 1;
                }
                (["eval", _], "toml") => {
                    opsa_eval::suite::Suite::load(&p).unwrap_or_else(|e| fail(&p, e));
                    paths.walk(&p, "", &toml_table(&p), user_data_allowed);
                    suites += 1;
                }
                (["constitutions", _], "toml") => {
                    let c = Constitution::read(&p).unwrap_or_else(|e| fail(&p, e));
                    assert!(c.texts.contains_key("harmful") && c.texts.contains_key("benign"), "{}: needs `harmful` and `benign`", p.display());
                }
                // The published checkpoints' config.json, for `train --plan`.
                (["shapes", _, "config.json"], _) => {
                    let c = ModelConfig::from_file(&p).unwrap_or_else(|e| fail(&p, e));
                    c.decoder(&p).unwrap_or_else(|e| fail(&p, e));
                    shapes += 1;
                }
                (["shapes", "README.md"], _) => {}
                (["contexts", _], "jsonl") => {
                    let pool = opsa_eval::flip::read_candidates(&p).unwrap_or_else(|e| fail(&p, e));
                    assert!(pool.iter().filter(|c| c.kind == "harmful").count() >= 20, "{}", p.display());
                    assert!(pool.iter().any(|c| c.kind == "benign"), "{}", p.display());
                }
                (["contexts", _], "txt") => {
                    assert!(!std::fs::read_to_string(&p).unwrap().trim().is_empty(), "{}: empty context", p.display());
                }
                (["judges", _], "txt") => {
                    opsa_eval::judge::read_template(Some(&p)).unwrap_or_else(|e| fail(&p, e));
                }
                (["refine", _], "txt") => {
                    opsa_train::refine::load_template(Some(&p)).unwrap_or_else(|e| fail(&p, e));
                }
                _ => panic!("{}: a config file this test does not know: add how it is parsed", p.display()),
            }
        }
    }
    assert!(train >= 3 && recipes >= 2 && suites >= 3 && shapes >= 4, "{train} training configs, {recipes} recipes, {suites} suites, {shapes} shapes");
    eprintln!("{} paths checked; user-provided, skipped: {:?}", paths.checked, paths.user_provided_met);
    assert!(paths.checked >= 20, "only {} paths checked", paths.checked);
    // The list names only what some config uses.
    for u in USER_PROVIDED {
        assert!(paths.user_provided_met.contains(u), "USER_PROVIDED lists {u:?}, which no config names");
    }
}
