//! The Llama family: `config.json` (both rope spellings, every rope type opsa implements, the
//! errors for the others) and the published DeepSeek-R1-Distill-Llama-8B shape with its recipe.
//! Logits, generations and save → load against transformers are in `parity` (llama-tiny is one
//! of the fixture families).

use std::path::{Path, PathBuf};

use opsa_models::rope::RopeScaling;
use opsa_models::ModelConfig;
use serde_json::{json, Value};

use crate::common::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn llama_raw() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("llama-tiny").join("config.json")).unwrap()).unwrap()
}

fn parse(raw: &Value) -> Result<opsa_models::DecoderConfig, String> {
    let path = Path::new("/models/x/config.json");
    ModelConfig::from_json_str(&raw.to_string(), path).and_then(|c| c.decoder(path)).map_err(|e| e.to_string())
}

#[test]
fn the_published_r1_distill_llama_8b_shape_parses() {
    let path = root().join("configs/shapes/r1-distill-llama-8b/config.json");
    let c = ModelConfig::from_file(&path).unwrap().decoder(&path).unwrap();
    assert_eq!(c.num_parameters(), 8_030_261_248, "Llama-3.1-8B's parameter count");
    assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.qk_norm);
    assert_eq!((c.head_dim, c.rope_theta), (128, 500_000.0));
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 }
    );
}

#[test]
fn the_r1_distill_llama_8b_recipe_plans_in_bf16_with_recompute() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_opsa"))
        .current_dir(root())
        .args(["train", "--config", "configs/opsa-r1-distill-llama-8b.toml", "--plan", "--set", "model.path=\"configs/shapes/r1-distill-llama-8b\""])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("peak") && text.contains("f32 master weights"), "{text}");
    let cfg = opsa_train::TrainConfig::load(&root().join("configs/opsa-r1-distill-llama-8b.toml"), &[]).unwrap();
    assert!(cfg.train.recompute);
    assert_eq!(cfg.model.dtype, "bf16");
}

/// Both spellings give the same decoder: the published one (`rope_theta`, `rope_scaling`) and
/// transformers 5's (`rope_parameters` holding `rope_theta`).
#[test]
fn rope_scaling_and_rope_parameters_read_alike() {
    let published = llama_raw();
    let mut v5 = published.clone();
    let o = v5.as_object_mut().unwrap();
    let mut rope = o.remove("rope_scaling").unwrap();
    rope["rope_theta"] = o.remove("rope_theta").unwrap();
    o.insert("rope_parameters".into(), rope);
    let (a, b) = (parse(&published).unwrap(), parse(&v5).unwrap());
    assert_eq!(a, b);
    assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { original_max_position_embeddings: 32, .. }));
}

#[test]
fn linear_scaling_divides_the_frequencies_in_every_family() {
    for name in FAMILIES {
        let mut raw: Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
        raw.as_object_mut().unwrap().remove("rope_parameters");
        raw["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
        let c = parse(&raw).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 }, "{name}");
        let plain = RopeScaling::Default.inv_freq(c.rope_theta, c.head_dim);
        let scaled = c.rope_scaling.inv_freq(c.rope_theta, c.head_dim);
        assert!(plain.iter().zip(&scaled).all(|(p, s)| *s == p / 4.0), "{name}");
    }
}

#[test]
fn unknown_rope_types_and_missing_fields_are_one_clear_error() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}), "rope_scaling.rope_type: rope type `yarn` is not supported"),
        (json!({"rope_type": "dynamic", "factor": 2.0}), "rope type `dynamic` is not supported"),
        (json!({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), "rope_scaling: rope type `llama3` needs the field `low_freq_factor`"),
        (json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}), "needs the field `original_max_position_embeddings`"),
        (json!({"type": "linear"}), "rope_scaling: rope type `linear` needs the field `factor`"),
        (json!({"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), "rope_scaling.factor: expected a number"),
        (json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 32}), "high_freq_factor (1) must be greater than low_freq_factor (4)"),
    ];
    for (scaling, needle) in cases {
        let mut raw = llama_raw();
        raw["rope_scaling"] = scaling.clone();
        let e = parse(&raw).unwrap_err();
        assert!(e.starts_with("/models/x/config.json: ") && e.contains(needle), "{scaling}: {e:?} should contain {needle:?}");
    }
    // The same through the binary, with the folder's file named.
    let dir = copy_fixture("llama-tiny");
    let mut raw = llama_raw();
    raw["rope_scaling"]["rope_type"] = json!("longrope");
    std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_opsa"))
        .args(["generate", "--model", dir.path().to_str().unwrap(), "--prompt", "hi"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"));
    assert!(err.contains(&format!("{}: rope_scaling.rope_type: rope type `longrope`", dir.path().join("config.json").display())), "{err}");
}
