//! Prompts as data files give them: plain text (`"prompt": "..."`) or an OpenAI-style
//! conversation (`"messages": [{"role": "system" | "user" | "assistant", "content": "..."}]`).
//!
//! [`read_prompts`] is the one reader of JSONL prompt lines: `opsa generate --prompts-file`,
//! eval suites' `jsonl` benchmarks, training prompts files, flip-rate and analyze-kl all go
//! through it (or through [`Prompt::from_object`] for a line they read themselves), so every
//! command accepts the same two forms and rejects the same bad input with one error naming the
//! file, the line and the field.
//!
//! A conversation is rendered with the chat template and the generation prompt after its last
//! message ([`Prompt::messages`]), so it must end with a user (or system) turn, never with an
//! assistant turn; earlier assistant turns are passed to the template as they are, and the
//! template renders them its own way (R1 templates drop their reasoning, Qwen3 keeps or drops it
//! by its own rules).

use std::io::BufRead;
use std::path::Path;

use serde_json::Value;

use crate::tokenizer::ChatMessage;
use crate::{Error, Result};

/// The roles a conversation may use.
pub const ROLES: &[&str] = &["system", "user", "assistant"];

/// One prompt: plain text (a single user turn under a chat template) or a whole conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Messages(Vec<ChatMessage>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

impl Prompt {
    /// Read `text_key` (a non-empty string; `"prompt"` in opsa's own files) or `messages` from one
    /// JSON object. The error names the field (`messages[2].role`, ...); the caller adds file and
    /// line.
    pub fn from_object(v: &Value, text_key: &str) -> std::result::Result<Prompt, String> {
        match (v.get(text_key), v.get("messages")) {
            (Some(_), Some(_)) => Err(format!("`{text_key}` and `messages`: give one of them, not both")),
            (Some(Value::String(s)), None) if !s.trim().is_empty() => Ok(Prompt::Text(s.clone())),
            (Some(Value::String(_)), None) => Err(format!("`{text_key}` is empty")),
            (Some(other), None) => Err(format!("`{text_key}`: expected a string, found {other}")),
            (None, Some(m)) => Self::parse_messages(m).map(Prompt::Messages),
            (None, None) => Err(format!("expected a string field `{text_key}` or a list `messages`")),
        }
    }

    fn parse_messages(m: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
        let list = m.as_array().ok_or_else(|| format!("`messages`: expected a list of {{\"role\", \"content\"}} objects, found {m}"))?;
        if list.is_empty() {
            return Err("`messages` is empty".into());
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, msg) in list.iter().enumerate() {
            let obj = msg.as_object().ok_or_else(|| format!("`messages[{i}]`: expected an object with `role` and `content`, found {msg}"))?;
            let role = match obj.get("role") {
                Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
                Some(Value::String(r)) => return Err(format!("`messages[{i}].role`: unknown role `{r}` (expected system, user or assistant)")),
                Some(other) => return Err(format!("`messages[{i}].role`: expected a string, found {other}")),
                None => return Err(format!("`messages[{i}].role` is missing")),
            };
            let content = match obj.get("content") {
                Some(Value::String(c)) if !c.trim().is_empty() => c.clone(),
                Some(Value::String(_)) => return Err(format!("`messages[{i}].content` is empty")),
                Some(other) => return Err(format!("`messages[{i}].content`: expected a string, found {other}")),
                None => return Err(format!("`messages[{i}].content` is missing")),
            };
            out.push(ChatMessage { role, content });
        }
        let last = out.len() - 1;
        if out[last].role == "assistant" {
            return Err(format!(
                "`messages[{last}].role`: the conversation ends with an assistant turn, but the generation prompt follows the last message; end it with a user turn"
            ));
        }
        if !out.iter().any(|m| m.role == "user") {
            return Err("`messages`: no user turn".into());
        }
        Ok(out)
    }

    /// The conversation the chat template renders: plain text is one user turn.
    pub fn messages(&self) -> Vec<ChatMessage> {
        match self {
            Prompt::Text(t) => vec![ChatMessage::user(t)],
            Prompt::Messages(m) => m.clone(),
        }
    }

    /// The last user turn: what judges see as the request, and what tables show.
    pub fn request(&self) -> &str {
        match self {
            Prompt::Text(t) => t,
            Prompt::Messages(m) => m.iter().rev().find(|m| m.role == "user").map(|m| m.content.as_str()).unwrap_or(""),
        }
    }

    /// Index of the last user turn in [`Self::messages`].
    pub fn last_user(messages: &[ChatMessage]) -> Option<usize> {
        messages.iter().rposition(|m| m.role == "user")
    }

    /// The conversation with a system message in front (`--system`); an error when it already
    /// has one.
    pub fn with_system(&self, system: &str) -> std::result::Result<Vec<ChatMessage>, String> {
        let mut m = self.messages();
        if m.iter().any(|m| m.role == "system") {
            return Err("the conversation has its own system message; drop --system or that message".into());
        }
        m.insert(0, ChatMessage::system(system));
        Ok(m)
    }

    /// The conversation as JSON (a string for plain text), for records and caches.
    pub fn to_json(&self) -> Value {
        match self {
            Prompt::Text(t) => Value::String(t.clone()),
            Prompt::Messages(m) => serde_json::to_value(m).expect("messages serialise"),
        }
    }
}

/// A string for plain text, the list of messages for a conversation.
impl serde::Serialize for Prompt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// The JSON objects of a JSONL file with their 1-based line numbers; blank lines are skipped,
/// a line that is not a JSON object is an error naming file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| Error::line(path, n, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(v @ Value::Object(_)) => out.push((n, v)),
            Ok(_) => return Err(Error::line(path, n, "not a JSON object")),
            Err(e) => return Err(Error::line(path, n, format!("not a JSON object: {e}"))),
        }
    }
    Ok(out)
}

/// One line of a prompts file: its prompt and the whole object (for `label`, `category`, ...).
#[derive(Debug, Clone)]
pub struct PromptLine {
    /// 1-based.
    pub line: usize,
    pub prompt: Prompt,
    pub object: Value,
}

/// Every prompt of a JSONL file (`prompt` or `messages` on each line); an empty file is an error.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptLine>> {
    let mut out = Vec::new();
    for (line, object) in read_jsonl(path)? {
        let prompt = Prompt::from_object(&object, "prompt").map_err(|m| Error::line(path, line, m))?;
        out.push(PromptLine { line, prompt, object });
    }
    if out.is_empty() {
        return Err(Error::invalid(path, "no prompts in the file"));
    }
    Ok(out)
}
