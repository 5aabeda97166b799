//! Rotary position embedding parameters: `rope_theta` and `rope_scaling` from `config.json`, and
//! the inverse frequencies every family's decoder uses ([`RopeScaling::inv_freq`]).
//!
//! Both spellings of a Hugging Face config are read: the published one (`rope_theta` and a
//! `rope_scaling` block with `rope_type` or the older `type`) and the one transformers >= 5 writes
//! (a `rope_parameters` block holding `rope_theta` too). Implemented types: `default`, `linear`
//! and `llama3`; any other type, and a block missing a field its type needs, is an error naming
//! the file and the field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// How the inverse frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `1 / theta^(2i / d)`.
    Default,
    /// Positions divided by `factor` (the frequencies are divided instead).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling: high frequencies kept, low ones divided by
    /// `factor`, the band between them smoothly interpolated (transformers'
    /// `_compute_llama3_parameters`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// `rope_theta` and its scaling from a raw `config.json`; `default_theta` is the family's value
/// when the file names none.
pub fn from_raw(raw: &Value, default_theta: f64, path: &Path) -> Result<(f64, RopeScaling)> {
    let mut theta = match raw.get("rope_theta") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_f64().ok_or_else(|| Error::invalid(path, format!("rope_theta: expected a number, found {v}")))?),
    };
    let mut scaling = RopeScaling::Default;
    for key in ["rope_scaling", "rope_parameters"] {
        let m = match raw.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::Object(m)) => m,
            Some(other) => return Err(Error::invalid(path, format!("{key}: expected an object, found {other}"))),
        };
        if let Some(t) = m.get("rope_theta").filter(|v| !v.is_null()) {
            theta = Some(t.as_f64().ok_or_else(|| Error::invalid(path, format!("{key}.rope_theta: expected a number, found {t}")))?);
        }
        if let Some(p) = m.get("partial_rotary_factor").and_then(Value::as_f64) {
            if p != 1.0 {
                return Err(Error::invalid(path, format!("{key}.partial_rotary_factor = {p}: only 1.0 (the whole head rotated) is supported")));
            }
        }
        let s = parse_scaling(key, m, path)?;
        // A config may carry both blocks: a scaled type wins over a default one.
        if s != RopeScaling::Default {
            scaling = s;
        }
    }
    let theta = theta.unwrap_or(default_theta);
    if !(theta > 0.0) {
        return Err(Error::invalid(path, format!("rope_theta = {theta}: must be positive")));
    }
    Ok((theta, scaling))
}

impl RopeScaling {
    /// The inverse frequencies `[head_dim / 2]`, in f32 and in the order of operations of
    /// transformers' `ROPE_INIT_FUNCTIONS`, so that the tables match the reference bit for bit
    /// up to `pow`'s last ulp.
    pub fn inv_freq(&self, theta: f64, head_dim: usize) -> Vec<f32> {
        let base = theta as f32;
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let e = (2 * i) as f32 / head_dim as f32;
                1.0f32 / base.powf(e)
            })
            .collect();
        match *self {
            RopeScaling::Default => inv,
            RopeScaling::Linear { factor } => inv.into_iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f64;
                // Python floats, compared with / applied to f32 tensors: rounded to f32 first.
                let low_wavelen = (old / low_freq_factor) as f32;
                let high_wavelen = (old / high_freq_factor) as f32;
                let (factor, low, span) = (factor as f32, low_freq_factor as f32, (high_freq_factor - low_freq_factor) as f32);
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                inv.into_iter()
                    .map(|f| {
                        // `2 * math.pi / inv_freq` is `inv_freq.reciprocal() * (2 * math.pi)` in torch.
                        let wavelen = (1.0 / f) * two_pi;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if medium {
                            let smooth = ((1.0 / wavelen) * old as f32 - low) / span;
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_scaling(key: &str, m: &Map<String, Value>, path: &Path) -> Result<RopeScaling> {
    let kind = match m.get("rope_type").or_else(|| m.get("type")) {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(Error::invalid(path, format!("{key}.rope_type: expected a string, found {other}"))),
    };
    let num = |field: &str| -> Result<f64> {
        match m.get(field) {
            Some(v) => v.as_f64().ok_or_else(|| Error::invalid(path, format!("{key}.{field}: expected a number, found {v}"))),
            None => Err(Error::invalid(path, format!("{key}: rope type `{kind}` needs the field `{field}`, which is missing"))),
        }
    };
    let positive = |field: &str| -> Result<f64> {
        let v = num(field)?;
        if v > 0.0 {
            Ok(v)
        } else {
            Err(Error::invalid(path, format!("{key}.{field} = {v}: must be positive")))
        }
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: positive("factor")? }),
        "llama3" => {
            let factor = positive("factor")?;
            let low_freq_factor = positive("low_freq_factor")?;
            let high_freq_factor = positive("high_freq_factor")?;
            let original = positive("original_max_position_embeddings")?;
            if original.fract() != 0.0 {
                return Err(Error::invalid(path, format!("{key}.original_max_position_embeddings = {original}: expected an integer")));
            }
            if high_freq_factor <= low_freq_factor {
                return Err(Error::invalid(
                    path,
                    format!("{key}: high_freq_factor ({high_freq_factor}) must be greater than low_freq_factor ({low_freq_factor})"),
                ));
            }
            Ok(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: original as usize })
        }
        other => Err(Error::invalid(
            path,
            format!("{key}.rope_type: rope type `{other}` is not supported (opsa implements default, linear and llama3)"),
        )),
    }
}
