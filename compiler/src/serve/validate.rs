//! Request bodies of `/v1/completions` and `/v1/chat/completions`: parsed
//! field by field from JSON so that a wrong type or an out-of-range value
//! is a 400 naming the field (`param`), never a panic. Unknown fields are
//! ignored, as OpenAI clients send many optional ones.

use super::error::ApiError;
use panguc_runtime::chat::ChatMessage;
use serde_json::{Map, Value};

/// Most choices (`n`) one request may ask for.
pub const MAX_N: u64 = 16;
/// Most stop strings (as OpenAI).
pub const MAX_STOPS: usize = 4;

/// The prompt of a request, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<i64>),
    Chat(Vec<ChatMessage>),
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub model: Option<String>,
    pub prompt: PromptInput,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub n: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<i64>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
}

type Fields = Map<String, Value>;

/// Parse a `/v1/completions` body.
pub fn completion_request(body: &[u8]) -> Result<GenerateRequest, ApiError> {
    let obj = object(body)?;
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => return Err(ApiError::invalid(Some("prompt"), "`prompt` is required")),
        Some(Value::String(s)) => PromptInput::Text(s.clone()),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            PromptInput::Text(items[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_i64) => {
            PromptInput::Tokens(items.iter().filter_map(Value::as_i64).collect())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "`prompt` must be a string, a list of one string, or a non-empty list of token ids",
            ))
        }
    };
    common(&obj, prompt, "max_tokens")
}

/// Parse a `/v1/chat/completions` body.
pub fn chat_request(body: &[u8]) -> Result<GenerateRequest, ApiError> {
    let obj = object(body)?;
    let Some(Value::Array(items)) = obj.get("messages") else {
        return Err(ApiError::invalid(
            Some("messages"),
            "`messages` must be a list of {\"role\", \"content\"} objects",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "`messages` is empty: give at least one message"));
    }
    let mut messages = vec![];
    for (i, m) in items.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Some(m) = m.as_object() else {
            return Err(ApiError::invalid(Some(&param), format!("{param} must be an object")));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if ["system", "user", "assistant"].contains(&r.as_str()) => r.clone(),
            _ => {
                return Err(ApiError::invalid(
                    Some(&format!("{param}.role")),
                    format!("{param}.role must be \"system\", \"user\" or \"assistant\""),
                ))
            }
        };
        let content = message_content(m.get("content")).ok_or_else(|| {
            ApiError::invalid(
                Some(&format!("{param}.content")),
                format!("{param}.content must be a string or a list of text parts"),
            )
        })?;
        messages.push(ChatMessage { role, content });
    }
    // `max_completion_tokens` is the newer name of `max_tokens`.
    let max_name = if obj.contains_key("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" };
    common(&obj, PromptInput::Chat(messages), max_name)
}

/// A message's text: a string, or a list of `{"type": "text", "text"}` parts.
fn message_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Some(t),
                _ => None,
            })
            .collect::<Option<Vec<&str>>>()
            .map(|t| t.concat()),
        _ => None,
    }
}

fn object(body: &[u8]) -> Result<Fields, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid(None, "the request body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))),
    }
}

/// The sampling and output fields both endpoints share.
fn common(obj: &Fields, prompt: PromptInput, max_name: &str) -> Result<GenerateRequest, ApiError> {
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid(Some("model"), "`model` must be a string")),
    };
    let max_tokens = int(obj, max_name, 1, u32::MAX as i64)?.map(|v| v as usize);
    let temperature = number(obj, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
    let top_p = number(obj, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
    if top_p <= 0.0 {
        return Err(ApiError::invalid(Some("top_p"), "`top_p` must be greater than 0 and at most 1"));
    }
    // -1 (vLLM) and 0 both mean no top-k limit.
    let top_k = int(obj, "top_k", -1, u32::MAX as i64)?.unwrap_or(0).max(0) as usize;
    let seed = int(obj, "seed", 0, i64::MAX)?.map(|s| s as u64);
    let n = int(obj, "n", 1, MAX_N as i64)?.unwrap_or(1) as usize;
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= MAX_STOPS && items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).map(str::to_string).collect()
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stop"),
                format!("`stop` must be a string or a list of at most {MAX_STOPS} strings"),
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(Some("stop"), "`stop` strings must not be empty"));
    }
    let stop_token_ids = match obj.get("stop_token_ids") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(items)) if items.iter().all(Value::is_i64) => {
            items.iter().filter_map(Value::as_i64).collect()
        }
        Some(_) => {
            return Err(ApiError::invalid(Some("stop_token_ids"), "`stop_token_ids` must be a list of token ids"))
        }
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")?.unwrap_or(false),
        Some(_) => return Err(ApiError::invalid(Some("stream_options"), "`stream_options` must be an object")),
    };
    Ok(GenerateRequest {
        model,
        prompt,
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        n,
        stop,
        stop_token_ids,
        ignore_eos: boolean(obj, "ignore_eos")?.unwrap_or(false),
        stream: boolean(obj, "stream")?.unwrap_or(false),
        include_usage,
    })
}

fn int(obj: &Fields, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(i) if (min..=max).contains(&i) => Ok(Some(i)),
            Some(i) => Err(ApiError::invalid(Some(name), format!("`{name}` must be between {min} and {max}, got {i}"))),
            None => Err(ApiError::invalid(Some(name), format!("`{name}` must be an integer, got {v}"))),
        },
    }
}

fn number(obj: &Fields, name: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            Some(x) => Err(ApiError::invalid(Some(name), format!("`{name}` must be between {min} and {max}, got {x}"))),
            None => Err(ApiError::invalid(Some(name), format!("`{name}` must be a number, got {v}"))),
        },
    }
}

fn boolean(obj: &Fields, name: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::invalid(Some(name), format!("`{name}` must be true or false, got {v}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<GenerateRequest, ApiError>) -> ApiError {
        r.expect_err("must be refused")
    }

    #[test]
    fn fields_are_read_with_their_defaults() {
        let r =
            completion_request(br#"{"prompt": "hi", "max_tokens": 5, "stop": "x", "seed": 3, "extra": 1}"#).unwrap();
        assert_eq!(r.prompt, PromptInput::Text("hi".into()));
        assert_eq!((r.max_tokens, r.n, r.seed, r.temperature, r.top_p, r.top_k), (Some(5), 1, Some(3), 1.0, 1.0, 0));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert!(!r.stream);
        let r = completion_request(
            br#"{"prompt": [1, 2, 3], "top_k": -1, "stream": true, "stream_options": {"include_usage": true}}"#,
        )
        .unwrap();
        assert_eq!((r.prompt, r.top_k, r.stream, r.include_usage), (PromptInput::Tokens(vec![1, 2, 3]), 0, true, true));
        let r = chat_request(
            br#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 7}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(
            r.prompt,
            PromptInput::Chat(vec![ChatMessage::new("system", "be brief"), ChatMessage::new("user", "ab")])
        );
    }

    #[test]
    fn wrong_types_and_ranges_name_their_field() {
        let cases: [(&[u8], Option<&str>); 14] = [
            (b"{not json", None),
            (b"[1]", None),
            (br#"{}"#, Some("prompt")),
            (br#"{"prompt": 5}"#, Some("prompt")),
            (br#"{"prompt": "a", "max_tokens": "10"}"#, Some("max_tokens")),
            (br#"{"prompt": "a", "max_tokens": 0}"#, Some("max_tokens")),
            (br#"{"prompt": "a", "max_tokens": 1.5}"#, Some("max_tokens")),
            (br#"{"prompt": "a", "temperature": 3}"#, Some("temperature")),
            (br#"{"prompt": "a", "top_p": 0}"#, Some("top_p")),
            (br#"{"prompt": "a", "n": 17}"#, Some("n")),
            (br#"{"prompt": "a", "seed": -1}"#, Some("seed")),
            (br#"{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}"#, Some("stop")),
            (br#"{"prompt": "a", "stream": "yes"}"#, Some("stream")),
            (br#"{"prompt": "a", "model": 1}"#, Some("model")),
        ];
        for (body, param) in cases {
            let e = err(completion_request(body));
            assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(body));
            assert_eq!(e.param.as_deref(), param, "{}: {}", String::from_utf8_lossy(body), e.message);
        }
        let e = err(chat_request(br#"{"messages": [{"role": "robot", "content": "x"}]}"#));
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = err(chat_request(br#"{"messages": [{"role": "user", "content": 3}]}"#));
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = err(chat_request(br#"{"messages": []}"#));
        assert_eq!(e.param.as_deref(), Some("messages"));
    }
}
