//! Conversations to prompt text: a model's Jinja chat template (rendered by
//! minijinja, as transformers' `apply_chat_template` does with Jinja2), or
//! the prompt format Pangu is used with when a model ships no template.

use anyhow::{anyhow, bail, Result};
use minijinja::{context, Environment, Error, ErrorKind, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.to_string(), content: content.to_string() }
    }
}

/// Opens and closes every turn of the Pangu format.
pub const TURN_START: &str = "[unused9]";
pub const TURN_END: &str = "[unused10]";

/// `[unused9]系统：{system}[unused10][unused9]用户：{user}[unused10]...[unused9]助手：`
/// (a turn per message, then the open assistant turn the model completes).
pub fn pangu_prompt(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        let speaker = match m.role.as_str() {
            "system" => "系统",
            "assistant" => "助手",
            _ => "用户",
        };
        out.push_str(&format!("{TURN_START}{speaker}：{}{TURN_END}", m.content));
    }
    out.push_str(&format!("{TURN_START}助手："));
    out
}

/// Render a Hugging Face chat template with the variables transformers
/// passes: `messages`, `add_generation_prompt` (true: the model answers
/// next), `bos_token`, `eos_token`, and the `raise_exception` function.
pub fn render_template(template: &str, messages: &[ChatMessage], bos: &str, eos: &str) -> Result<String> {
    let mut env = Environment::new();
    // Jinja2 as transformers configures it: blocks eat their newline.
    let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
    env.set_syntax(syntax.map_err(|e| anyhow!("template syntax: {e}"))?);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    let turns: Vec<Value> = messages
        .iter()
        .map(|m| {
            let mut map = BTreeMap::new();
            map.insert("role", Value::from(m.role.as_str()));
            map.insert("content", Value::from(m.content.as_str()));
            Value::from(map)
        })
        .collect();
    let tmpl = env.template_from_str(template).map_err(|e| anyhow!("invalid template: {e}"))?;
    let text = tmpl
        .render(context! { messages => turns, add_generation_prompt => true, bos_token => bos, eos_token => eos })
        .map_err(|e| anyhow!("rendering failed: {e}"))?;
    if text.is_empty() {
        bail!("the template rendered nothing for {} messages", messages.len());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pangu_format_has_a_turn_per_message_and_opens_the_answer() {
        let m = [ChatMessage::new("system", "be brief"), ChatMessage::new("user", "hi")];
        assert_eq!(pangu_prompt(&m), "[unused9]系统：be brief[unused10][unused9]用户：hi[unused10][unused9]助手：");
        assert_eq!(pangu_prompt(&m[1..]), "[unused9]用户：hi[unused10][unused9]助手：");
    }

    #[test]
    fn template_errors_are_reported_not_panics() {
        let m = [ChatMessage::new("user", "hi")];
        assert!(render_template("{% for %}", &m, "<s>", "</s>").is_err());
        let raising = "{{ raise_exception('only user turns') }}";
        let err = render_template(raising, &m, "<s>", "</s>").unwrap_err().to_string();
        assert!(err.contains("only user turns"), "{err}");
    }
}
