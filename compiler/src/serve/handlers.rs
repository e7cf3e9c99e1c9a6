//! The HTTP routes: OpenAI's completions, chat completions and models,
//! plus `/health` and `/metrics`. A handler validates and tokenizes the
//! request, takes a place in the admission queue (429 when full), hands
//! it to the engine thread and turns the events it sends back into one
//! JSON response or a stream of server-sent events ending `data: [DONE]`.

use super::engine_loop::{Event, GenParams, Submission};
use super::error::ApiError;
use super::metrics::{AdmissionQueue, Metrics};
use super::validate::{self, GenerateRequest, PromptInput};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use panguc_runtime::{Sampling, Tokenizer};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// What every request needs to know about the model and the limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub model_name: String,
    /// Prompt plus generated tokens of one sequence.
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_queue: usize,
    pub eos: Option<i64>,
}

pub struct Shared {
    /// To the engine thread; a Mutex keeps the handle Sync on every toolchain.
    pub submit: Mutex<Option<mpsc::Sender<Submission>>>,
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Arc<Metrics>,
    pub queue: Arc<AdmissionQueue>,
    pub limits: Limits,
    pub started: u64,
    pub next_id: AtomicU64,
}

pub type AppState = Arc<Shared>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { ApiError::not_found("no such route", "not_found") })
        .with_state(state)
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render(st.queue.waiting())).into_response()
}

async fn models(State(st): State<AppState>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.limits.model_name,
            "object": "model",
            "created": st.started,
            "owned_by": "panguc",
            "max_model_len": st.limits.max_model_len,
        }]
    }))
    .into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(st): State<AppState>, body: Bytes) -> Response {
    generate(st, validate::completion_request(&body), Kind::Completion).await
}

async fn chat_completions(State(st): State<AppState>, body: Bytes) -> Response {
    generate(st, validate::chat_request(&body), Kind::Chat).await
}

async fn generate(st: AppState, req: Result<GenerateRequest, ApiError>, kind: Kind) -> Response {
    let received = Instant::now();
    let job = match req.and_then(|r| prepare(&st, r)) {
        Ok(job) => job,
        Err(e) => return e.into_response(),
    };
    if !st.queue.try_enter() {
        st.metrics.requests_rejected.fetch_add(1, Relaxed);
        return ApiError::overloaded(st.limits.max_queue).into_response();
    }
    let (tx, rx) = unbounded_channel();
    let submission = Submission { prompt: job.prompt.clone(), params: job.params.clone(), events: tx, received };
    let sent = match st.submit.lock() {
        Ok(guard) => guard.as_ref().is_some_and(|s| s.send(submission).is_ok()),
        Err(_) => false,
    };
    if !sent {
        st.queue.leave();
        return ApiError::unavailable("the server is shutting down").into_response();
    }
    let reply = Reply {
        id: format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, st.next_id.fetch_add(1, Relaxed)),
        created: unix_now(),
        model: st.limits.model_name.clone(),
        kind,
        n: job.params.n,
        prompt_tokens: job.prompt.len(),
    };
    if job.stream {
        stream_response(reply, rx, job.include_usage)
    } else {
        json_response(reply, rx).await
    }
}

/// A validated request turned into what the engine runs.
struct Job {
    prompt: Vec<i64>,
    params: GenParams,
    stream: bool,
    include_usage: bool,
}

/// Tokenize and check a request against the model and the cache: every
/// refusal is a 400 (404 for another model) before anything is queued.
fn prepare(st: &Shared, r: GenerateRequest) -> Result<Job, ApiError> {
    let l = &st.limits;
    if let Some(m) = &r.model {
        if *m != l.model_name {
            return Err(ApiError::not_found(
                format!("the model `{m}` does not exist: this server serves `{}`", l.model_name),
                "model_not_found",
            ));
        }
    }
    let (prompt, param) = match &r.prompt {
        PromptInput::Text(text) => (st.tokenizer.encode_prompt(text), "prompt"),
        PromptInput::Tokens(ids) => (Ok(ids.clone()), "prompt"),
        PromptInput::Chat(messages) => {
            (st.tokenizer.render_chat(messages).and_then(|t| st.tokenizer.encode_prompt(&t)), "messages")
        }
    };
    let prompt = prompt.map_err(|e| ApiError::invalid(Some(param), format!("cannot tokenize the {param}: {e:#}")))?;
    crate::run_batch::validate_prompt(&prompt, l.vocab_size)
        .map_err(|e| ApiError::invalid(Some(param), format!("{e:#}")))?;
    if let Some(bad) = r.stop_token_ids.iter().find(|t| **t < 0 || **t as u64 >= l.vocab_size as u64) {
        return Err(ApiError::invalid(
            Some("stop_token_ids"),
            format!("token {bad} is outside the vocabulary of {}", l.vocab_size),
        ));
    }
    let room = l.max_model_len.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "the prompt is {} tokens but the model's context is {} tokens: shorten it",
                prompt.len(),
                l.max_model_len
            ),
        )
        .with_code("context_length_exceeded"));
    }
    // OpenAI's completions default to 16 tokens; chat to whatever fits.
    let max_tokens = r.max_tokens.unwrap_or(match r.prompt {
        PromptInput::Chat(_) => room,
        _ => 16.min(room),
    });
    if max_tokens > room {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!(
                "max_tokens {max_tokens} with a {}-token prompt goes past the model's context of {} tokens: at most {room} fit",
                prompt.len(),
                l.max_model_len
            ),
        )
        .with_code("context_length_exceeded"));
    }
    // Every choice must fit the KV cache on its own, or it could never run.
    let blocks = (prompt.len() + max_tokens - 1).div_ceil(l.block_size);
    if blocks > l.num_blocks {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!("the request needs {blocks} KV-cache blocks but the server's cache holds {}", l.num_blocks),
        ));
    }
    let mut stop_token_ids = r.stop_token_ids.clone();
    if !r.ignore_eos {
        stop_token_ids.extend(l.eos);
    }
    let seed = r.seed.unwrap_or_else(|| random_seed(st));
    let sampling = Sampling { temperature: r.temperature, top_k: r.top_k, top_p: r.top_p, seed };
    let params = GenParams { max_tokens, sampling, n: r.n, stop: r.stop.clone(), stop_token_ids };
    Ok(Job { prompt, params, stream: r.stream, include_usage: r.include_usage })
}

/// A seed for a request that gave none: differs per request.
fn random_seed(st: &Shared) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ st.next_id.load(Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The fields every response of one request repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    n: usize,
    prompt_tokens: usize,
}

impl Reply {
    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({ "id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices })
    }

    /// One streamed choice: new text, or its end.
    fn chunk_choice(&self, index: usize, text: Option<&str>, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Completion => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

/// Collect every choice, then answer with one JSON object.
async fn json_response(reply: Reply, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut texts = vec![String::new(); reply.n];
    let mut finish: Vec<Option<&'static str>> = vec![None; reply.n];
    let mut completion_tokens = 0;
    while finish.iter().any(Option::is_none) {
        match rx.recv().await {
            Some(Event::Text { index, text }) => texts[index].push_str(&text),
            Some(Event::Done { index, finish_reason, completion_tokens: n }) => {
                finish[index] = Some(finish_reason);
                completion_tokens += n;
            }
            Some(Event::Failed { message }) => return ApiError::internal(message).into_response(),
            None => return ApiError::internal("the engine stopped before the request finished").into_response(),
        }
    }
    let choices = texts
        .into_iter()
        .zip(finish)
        .enumerate()
        .map(|(index, (text, finish))| match reply.kind {
            Kind::Completion => json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish}),
            Kind::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
        })
        .collect();
    let mut body = reply.envelope(false, choices);
    body["usage"] = reply.usage(completion_tokens);
    axum::Json(body).into_response()
}

/// Server-sent events: one `data: {chunk}` per piece of text, one per
/// finished choice, the usage chunk when asked for, then `data: [DONE]`.
/// Dropping the body (the client went away) drops `rx`, which the engine
/// thread notices and cancels the request.
fn stream_response(reply: Reply, rx: UnboundedReceiver<Event>, include_usage: bool) -> Response {
    struct State {
        reply: Reply,
        rx: UnboundedReceiver<Event>,
        pending: Vec<String>,
        finished: usize,
        completion_tokens: usize,
        include_usage: bool,
        ended: bool,
    }
    let mut pending = vec![];
    if reply.kind == Kind::Chat {
        // Chat streams open each choice with the assistant role.
        for index in 0..reply.n {
            let choice = json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            pending.push(sse(&reply.envelope(true, vec![choice])));
        }
    }
    pending.reverse();
    let state = State { reply, rx, pending, finished: 0, completion_tokens: 0, include_usage, ended: false };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(next) = s.pending.pop() {
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(next)), s));
            }
            if s.ended {
                return None;
            }
            let mut out = vec![];
            match s.rx.recv().await {
                Some(Event::Text { index, text }) => {
                    out.push(sse(&s.reply.envelope(true, vec![s.reply.chunk_choice(index, Some(&text), None)])));
                }
                Some(Event::Done { index, finish_reason, completion_tokens }) => {
                    out.push(sse(&s
                        .reply
                        .envelope(true, vec![s.reply.chunk_choice(index, None, Some(finish_reason))])));
                    s.finished += 1;
                    s.completion_tokens += completion_tokens;
                    if s.finished == s.reply.n {
                        if s.include_usage {
                            let mut usage = s.reply.envelope(true, vec![]);
                            usage["usage"] = s.reply.usage(s.completion_tokens);
                            out.push(sse(&usage));
                        }
                        out.push("data: [DONE]\n\n".to_string());
                        s.ended = true;
                    }
                }
                Some(Event::Failed { message }) => {
                    out.push(sse(&ApiError::internal(message).body()));
                    s.ended = true;
                }
                None => {
                    out.push(sse(&ApiError::internal("the engine stopped before the request finished").body()));
                    s.ended = true;
                }
            }
            out.reverse();
            s.pending = out;
        }
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(stream))
        .into_response()
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}
