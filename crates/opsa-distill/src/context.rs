//! Teacher conditioning: where the privileged context goes, and the two prompt streams.
//!
//! The student sees the conversation as the data gives it (`[user: q]` for a plain prompt); the
//! teacher sees the same conversation with the context `c` placed as a system message, or
//! before or after the text of the *last* user turn, inside the same chat template. With
//! `system` placement and a conversation that has its own system message, the two are merged into
//! one: `c`, the separator, then the conversation's system text.
//! Harmful prompts get `c_h`, benign prompts `c_b`. Both prompts are rendered by one tokenizer
//! and template ([`Pair::new`] takes just one), and [`Pair::join`] appends one and the same
//! response id vector to both, so the teacher scores exactly the student's tokens.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use opsa_models::{ChatMessage, HfTokenizer, Prompt};

/// Where the privileged context is placed in the teacher's prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// As a system message before the conversation (merged into its own system message, after
    /// the context and the separator, when it has one).
    System,
    /// Inside the last user turn, before the request (the closest precedent's choice).
    #[default]
    Prepend,
    /// Inside the last user turn, after the request.
    Append,
}

/// The label of a training prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    Harmful,
    Benign,
}

/// The two contexts and how they are placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Contexts {
    pub harmful: String,
    pub benign: String,
    pub placement: Placement,
    /// Between context and request when placed inside the user turn.
    pub separator: String,
}

impl Contexts {
    pub fn for_label(&self, label: Label) -> &str {
        match label {
            Label::Harmful => &self.harmful,
            Label::Benign => &self.benign,
        }
    }

    /// The teacher's conversation for a prompt (see the module docs for where the context goes).
    pub fn teacher_messages(&self, prompt: &Prompt, label: Label) -> Vec<ChatMessage> {
        let (c, sep) = (self.for_label(label), &self.separator);
        let mut m = prompt.messages();
        match self.placement {
            Placement::System => match m.first_mut().filter(|f| f.role == "system") {
                Some(first) => first.content = format!("{c}{sep}{}", first.content),
                None => m.insert(0, ChatMessage::system(c)),
            },
            Placement::Prepend | Placement::Append => {
                // A prompt has a user turn (checked when it was read).
                let last = Prompt::last_user(&m).expect("a prompt has a user turn");
                let u = &mut m[last];
                u.content = match self.placement {
                    Placement::Prepend => format!("{c}{sep}{}", u.content),
                    _ => format!("{}{sep}{c}", u.content),
                };
            }
        }
        m
    }
}

/// A request rendered for both streams.
#[derive(Debug, Clone)]
pub struct Pair {
    pub student_prompt: Vec<u32>,
    pub teacher_prompt: Vec<u32>,
}

impl Pair {
    /// Render `prompt` for the student (no context) and the teacher (with the label's context),
    /// both with `tok`'s chat template and `vars`.
    pub fn new(tok: &HfTokenizer, vars: &serde_json::Map<String, Value>, contexts: &Contexts, prompt: &Prompt, label: Label) -> Result<Pair, String> {
        let student_prompt = tok.encode_chat(&prompt.messages(), vars).map_err(|e| e.to_string())?;
        let teacher_prompt = tok.encode_chat(&contexts.teacher_messages(prompt, label), vars).map_err(|e| e.to_string())?;
        Ok(Pair { student_prompt, teacher_prompt })
    }

    /// Both full sequences with the one response appended; returns `(student, teacher)`.
    pub fn join(&self, response: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let s: Vec<u32> = self.student_prompt.iter().chain(response).copied().collect();
        let t: Vec<u32> = self.teacher_prompt.iter().chain(response).copied().collect();
        assert_eq!(&s[self.student_prompt.len()..], &t[self.teacher_prompt.len()..], "response ids differ between streams");
        (s, t)
    }
}
