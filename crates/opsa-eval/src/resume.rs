//! What makes cached work safe to reuse, shared by every resumable command:
//!
//! - a **manifest** (`manifest.json` in the output folder) records what produced the folder:
//!   the model's identity (path and [`opsa_models::checkpoint::fingerprint`]), the contents of
//!   the suite, prompts, contexts and judge, the generation settings, seeds and method, and
//!   [`FORMAT`]. A rerun with the same inputs resumes; one with other inputs is refused with the
//!   first difference named, or, with `overwrite`, starts over ([`claim`]);
//! - **JSONL records** are appended whole, record and newline in one write ([`JsonlFile`]); a
//!   torn last line (a kill mid-write) is dropped and reported when the file is read back
//!   ([`read_jsonl`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Version of the layout of cached files; a change makes old folders stale.
pub const FORMAT: u64 = 1;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("{0}")]
    Io(String),
    /// The folder was made from other inputs.
    #[error("{}: made with {key} = {old}, now {new}; pass --overwrite to start over (or use another output folder)", dir.display())]
    Stale { dir: PathBuf, key: String, old: String, new: String },
    #[error("{}: holds results without a record of what produced them ({MANIFEST}); pass --overwrite to start over (or use another output folder)", dir.display())]
    Unrecorded { dir: PathBuf },
    #[error(transparent)]
    Model(#[from] opsa_models::Error),
}

fn io(p: &Path, e: impl std::fmt::Display) -> ResumeError {
    ResumeError::Io(format!("{}: {e}", p.display()))
}

/// SHA-256 of some bytes, hex.
pub fn hash(bytes: impl AsRef<[u8]>) -> String {
    Sha256::digest(bytes.as_ref()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The identity of a file's contents: its hash.
pub fn file_identity(path: &Path) -> Result<Value, ResumeError> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    Ok(json!(hash(bytes)))
}

/// The identity of a model folder: its path and its fingerprint.
pub fn model_identity(dir: &Path) -> Result<Value, ResumeError> {
    let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    Ok(json!({ "path": path, "fingerprint": opsa_models::checkpoint::fingerprint(dir)? }))
}

/// The first difference between two JSON values, as (dotted key, old, new).
pub fn first_difference(key: &str, old: &Value, new: &Value) -> Option<(String, Value, Value)> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let sub = if key.is_empty() { k.clone() } else { format!("{key}.{k}") };
                first_difference(&sub, a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null))
            })
        }
        _ if old != new => Some((key.to_string(), old.clone(), new.clone())),
        _ => None,
    }
}

/// Short text of a value for a message.
fn show(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// The inputs as the manifest holds them: with [`FORMAT`], and through the same JSON text and
/// parser as the file (numbers such as an f32 widened to f64 compare as they read back).
fn with_format(inputs: &Value) -> Value {
    let mut inputs = inputs.clone();
    inputs["format"] = json!(FORMAT);
    serde_json::from_str(&inputs.to_string()).expect("JSON reads back")
}

/// Whether `dir`'s manifest records exactly `inputs` (a finished stage can then be skipped).
pub fn recorded(dir: &Path, inputs: &Value) -> bool {
    matches!(compare(dir, inputs), Ok(true))
}

/// `Ok(true)`: `dir` records these inputs; `Ok(false)`: no folder, or an empty one; an error:
/// other inputs (the first difference named), or a non-empty folder without a manifest.
fn compare(dir: &Path, inputs: &Value) -> Result<bool, ResumeError> {
    let inputs = with_format(inputs);
    match std::fs::read_to_string(dir.join(MANIFEST)) {
        Ok(text) => {
            let old = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
            match first_difference("", &old, &inputs) {
                None => Ok(true),
                Some((key, o, n)) => Err(ResumeError::Stale {
                    dir: dir.to_path_buf(),
                    key: if key.is_empty() { "the manifest".into() } else { key },
                    old: show(&o),
                    new: show(&n),
                }),
            }
        }
        Err(_) if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) => Err(ResumeError::Unrecorded { dir: dir.to_path_buf() }),
        Err(_) => Ok(false),
    }
}

/// [`claim`]'s verdict without touching anything: what a command checks before its work.
pub fn check(dir: &Path, inputs: &Value, overwrite: bool) -> Result<(), ResumeError> {
    match compare(dir, inputs) {
        Err(e) if !overwrite => Err(e),
        _ => Ok(()),
    }
}

/// Take `dir` for work described by `inputs` (an object; [`FORMAT`] is added):
/// - no folder, or an empty one: a fresh start, the manifest is written;
/// - a manifest with the same inputs: resume (`Ok`);
/// - other inputs, or a non-empty folder without a manifest (someone's files, or results of an
///   older opsa): refused, naming the first difference; with `overwrite`, the `owned` files are
///   removed and the work starts over.
///
/// `owned` are the names (files or folders) the work writes in `dir`; nothing else is touched.
pub fn claim(dir: &Path, inputs: Value, owned: &[&str], overwrite: bool) -> Result<(), ResumeError> {
    match compare(dir, &inputs) {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) if !overwrite => return Err(e),
        Err(_) => {
            tracing::warn!("{}: starting over (--overwrite)", dir.display());
            for f in owned.iter().chain(&[MANIFEST]) {
                let p = dir.join(f);
                let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                if let Err(e) = removed {
                    if p.exists() {
                        return Err(io(&p, e));
                    }
                }
            }
        }
    }
    write_atomic(&dir.join(MANIFEST), &(serde_json::to_string_pretty(&with_format(&inputs)).expect("JSON serialises") + "\n"))
}

/// Write a file under a temporary name, then rename it into place.
pub fn write_atomic(path: &Path, text: impl AsRef<[u8]>) -> Result<(), ResumeError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let name = path.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Read back a JSONL file written by [`JsonlFile`]: its lines, numbered from 1, blank ones
/// skipped. A last line without its newline was torn by a kill mid-write: it is cut from the
/// file and reported (its work is redone).
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, String)>, ResumeError> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    if whole < text.len() {
        tracing::warn!("{}: dropping a torn last line (line {}, written when a run was killed)", path.display(), text[..whole].lines().count() + 1);
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| io(path, e))?;
        f.set_len(whole as u64).map_err(|e| io(path, e))?;
    }
    Ok(text[..whole].lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l.to_string())).collect())
}

/// [`read_jsonl`]'s lines as records of type `T`, with their line numbers: a line that is not a
/// `T` (a field missing or of another type) is an error naming file and line, never a default.
pub fn read_jsonl_as<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>, ResumeError> {
    read_jsonl(path)?
        .into_iter()
        .map(|(n, l)| serde_json::from_str(&l).map(|r| (n, r)).map_err(|e| ResumeError::Io(format!("{}:{n}: {e}", path.display()))))
        .collect()
}

/// A JSONL file open for appending whole records.
pub struct JsonlFile {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonlFile {
    pub fn append_to(path: &Path) -> Result<JsonlFile, ResumeError> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| io(path, e))?;
        Ok(JsonlFile { path: path.to_path_buf(), file })
    }

    /// One record and its newline in one write, then flushed.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<(), ResumeError> {
        let line = serde_json::to_string(record).expect("record serialises") + "\n";
        self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()).map_err(|e| io(&self.path, e))
    }
}
