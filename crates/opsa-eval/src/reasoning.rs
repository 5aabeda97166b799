//! Reasoning scoring: the final answer of a response, normalised, compared exactly.
//!
//! The thinking block is stripped first (the answer is what follows `</think>`); a response
//! whose thinking never closed has no answer and counts as wrong. The answer is, in order of
//! preference: the content of the last `\boxed{…}` (nested braces allowed), the text after the
//! last `#### `, or the last number in the text. Normalisation removes `$`, thousands commas,
//! spaces and a trailing period, turns `\frac{a}{b}`, `\dfrac{a}{b}` and `a/b` into a number, and
//! compares numbers by value (so `42.0`, `42` and `84/2` agree); other answers compare as text.

use crate::refusal::final_answer;

/// The extracted answer of a response, or `None` (truncated thinking, or nothing to extract).
pub fn extract_answer(response: &str) -> Option<String> {
    let text = final_answer(response)?;
    if let Some(b) = last_boxed(text) {
        return Some(b);
    }
    if let Some((_, after)) = text.rsplit_once("####") {
        let a = after.trim().lines().next().unwrap_or("").trim();
        if !a.is_empty() {
            return Some(a.to_string());
        }
    }
    last_number(text)
}

fn last_boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

fn last_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut end = chars.len();
    while end > 0 {
        if chars[end - 1].is_ascii_digit() {
            let mut start = end;
            while start > 0 && (chars[start - 1].is_ascii_digit() || matches!(chars[start - 1], '.' | ',' | '/')) {
                start -= 1;
            }
            if start > 0 && chars[start - 1] == '-' {
                start -= 1;
            }
            let s: String = chars[start..end].iter().collect();
            return Some(s.trim_matches(|c| c == '.' || c == ',' || c == '/').to_string());
        }
        end -= 1;
    }
    None
}

/// A canonical form: a number when the answer is numeric, else cleaned text.
#[derive(Debug, Clone, PartialEq)]
pub enum Normalised {
    Number(f64),
    Text(String),
}

pub fn normalise(answer: &str) -> Normalised {
    let mut s = answer.trim().trim_end_matches('.').replace(['$', ' '], "");
    for p in ["\\!", "\\,", "\\left", "\\right", "^\\circ", "\\%", "%"] {
        s = s.replace(p, "");
    }
    if let Some(inner) = s.strip_prefix("\\text{").and_then(|r| r.strip_suffix('}')) {
        s = inner.to_string();
    }
    let numeric = s.replace(',', "");
    if let Some(v) = parse_number(&numeric) {
        return Normalised::Number(v);
    }
    Normalised::Text(s.to_lowercase())
}

fn parse_number(s: &str) -> Option<f64> {
    if let Ok(v) = s.parse::<f64>() {
        return v.is_finite().then_some(v);
    }
    for p in ["\\frac{", "\\dfrac{", "\\tfrac{"] {
        if let Some(rest) = s.strip_prefix(p).or_else(|| s.strip_prefix(&format!("-{p}"))) {
            let neg = s.starts_with('-');
            let (a, b) = rest.strip_suffix('}')?.split_once("}{")?;
            let v = a.parse::<f64>().ok()? / b.parse::<f64>().ok()?;
            return v.is_finite().then_some(if neg { -v } else { v });
        }
    }
    let (a, b) = s.split_once('/')?;
    let v = a.parse::<f64>().ok()? / b.parse::<f64>().ok()?;
    v.is_finite().then_some(v)
}

/// Whether a response's final answer equals the reference.
pub fn is_correct(response: &str, reference: &str) -> bool {
    let Some(got) = extract_answer(response) else { return false };
    match (normalise(&got), normalise(reference)) {
        (Normalised::Number(a), Normalised::Number(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
        (a, b) => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_and_normalisation() {
        assert!(is_correct("<think>17*23 = 391</think>\nThe answer is \\boxed{391}.", "391"));
        assert!(is_correct("So she has 1,234 apples.\n#### 1,234", "1234"));
        assert!(is_correct("... which gives 42.0", "42"));
        assert!(is_correct("\\boxed{\\frac{1}{2}}", "0.5"));
        assert!(is_correct("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"));
        assert!(is_correct("the ratio is 6/8", "3/4"));
        assert!(is_correct("\\boxed{\\text{(B)}}", "(B)"));
        assert!(is_correct("x = -7", "-7"));
        assert!(!is_correct("<think>The answer is 391", "391"), "truncated thinking counts as wrong");
        assert!(!is_correct("<think>391</think>I don't know.", "391"));
        assert!(!is_correct("\\boxed{390}", "391"));
        assert_eq!(extract_answer("a \\boxed{x^{2}+1} b"), Some("x^{2}+1".into()));
        assert_eq!(extract_answer("no numbers here"), None);
    }
}
