//! `panguc serve` through a real HTTP client: the tiny example compiled
//! once per test binary, one server (the binary, on an ephemeral loopback
//! port) per test.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn panguc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_panguc"))
}

fn tiny_example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu")
}

/// The tiny example compiled for the CPU, once per test binary.
fn package() -> &'static Path {
    static PKG: OnceLock<tempfile::TempDir> = OnceLock::new();
    PKG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tiny-pkg");
        let o = panguc()
            .args(["compile", tiny_example().to_str().unwrap(), "--target", "cpu", "-o", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        dir
    })
    .path()
    .join("tiny-pkg")
    .leak()
}

/// A running `panguc serve`, killed when dropped (unless it already exited).
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = panguc()
            .args(["serve", package().to_str().unwrap(), "--port", "0", "--threads", "1"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "first line: {line:?}");
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST a JSON body; (status, parsed body).
    fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let r = ureq::post(&self.url(path)).set("Content-Type", "application/json").send_string(body);
        let (status, resp) = match r {
            Ok(resp) => (resp.status(), resp),
            Err(ureq::Error::Status(code, resp)) => (code, resp),
            Err(e) => panic!("{path}: {e}"),
        };
        let text = resp.into_string().unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}")))
    }

    fn complete(&self, body: Value) -> Value {
        let (status, v) = self.post("/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Open a streaming request; the reader yields its raw SSE lines.
    fn stream(&self, path: &str, body: Value) -> BufReader<Box<dyn Read + Send + Sync>> {
        let resp = ureq::post(&self.url(path)).send_string(&body.to_string()).unwrap();
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        BufReader::new(resp.into_reader())
    }

    fn metric(&self, name: &str) -> f64 {
        let text = ureq::get(&self.url("/metrics")).call().unwrap().into_string().unwrap();
        let line =
            text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Poll `/metrics` until `name` satisfies `ok` (10 s at most).
    fn wait_metric(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let t = Instant::now();
        loop {
            let v = self.metric(name);
            if ok(v) {
                return v;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{name} stuck at {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `data:` payloads of a whole event stream, [DONE] included.
fn events(reader: impl BufRead) -> Vec<String> {
    reader.lines().map(Result::unwrap).filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
}

fn chunks(events: &[String]) -> Vec<Value> {
    events.iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect()
}

#[test]
fn completions_and_chat_answer_as_json_and_as_streams() {
    let s = Server::start(&[]);
    let health = ureq::get(&s.url("/health")).call().unwrap();
    assert_eq!(health.status(), 200);
    let models: Value =
        serde_json::from_str(&ureq::get(&s.url("/v1/models")).call().unwrap().into_string().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-pkg");

    // The server's greedy answer is `panguc run --prompt`'s.
    let prompt = "Hello world";
    let v = s.complete(json!({"model": "tiny-pkg", "prompt": prompt, "max_tokens": 12, "temperature": 0}));
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let o = panguc()
        .args(["run", package().to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", "12", "--threads", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(format!("{text}\n"), String::from_utf8(o.stdout).unwrap());
    assert_eq!(v["object"], "text_completion");
    let completion_tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion_tokens));
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish, if completion_tokens == 12 { "length" } else { "stop" });
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["total_tokens"].as_u64().unwrap(), prompt_tokens + completion_tokens);

    // Ignoring eos, the full length; streamed, the same text piece by piece.
    let body = json!({"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": true});
    let full = s.complete(body.clone());
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(full["usage"]["completion_tokens"], 20);
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let ev = events(s.stream("/v1/completions", streamed));
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let ch = chunks(&ev);
    let joined: String = ch.iter().filter_map(|c| c["choices"].get(0)?["text"].as_str()).collect();
    assert_eq!(joined, full_text);
    assert!(ch.len() > 5, "text arrives in pieces: {ev:?}");
    assert!(ch.iter().any(|c| c["choices"].get(0).is_some_and(|c| c["finish_reason"] == "length")));
    assert_eq!(ch.last().unwrap()["usage"]["completion_tokens"], 20, "the usage chunk comes last");

    // A stop string cuts the text before it, finish_reason "stop".
    let chars: Vec<char> = full_text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &full_text[..full_text.find(&stop).unwrap()];
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([stop]);
    let v = s.complete(with_stop.clone());
    assert_eq!(v["choices"][0]["text"], cut, "stop {stop:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 20);
    with_stop["stream"] = json!(true);
    let ch = chunks(&events(s.stream("/v1/completions", with_stop)));
    let joined: String = ch.iter().filter_map(|c| c["choices"].get(0)?["text"].as_str()).collect();
    assert_eq!(joined, cut, "streamed text also stops before the stop string");

    // n greedy choices are the same text; sampled ones follow their seed.
    let mut two = body.clone();
    two["n"] = json!(2);
    let v = s.complete(two);
    assert_eq!(v["choices"][0]["text"], full_text);
    assert_eq!(v["choices"][1]["text"], full_text);
    assert_eq!(v["usage"]["completion_tokens"], 40);
    let sampled = json!({"prompt": prompt, "max_tokens": 20, "temperature": 1.0, "seed": 7, "ignore_eos": true});
    let (a, b) = (s.complete(sampled.clone()), s.complete(sampled));
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"], "same seed, same text");

    // Chat: the JSON message and the streamed deltas agree.
    let chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}],
                      "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let (status, v) = s.post("/v1/chat/completions", &chat.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let mut chat_stream = chat.clone();
    chat_stream["stream"] = json!(true);
    let ev = events(s.stream("/v1/chat/completions", chat_stream));
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let ch = chunks(&ev);
    assert_eq!(ch[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(ch.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let joined: String = ch.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(joined, content);
    assert_eq!(ch.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[test]
fn sixteen_concurrent_requests_match_the_same_requests_run_alone() {
    let s = Server::start(&[]);
    let bodies: Vec<Value> = (0..16)
        .map(|i| {
            json!({"prompt": format!("request number {i}: the model writes"), "max_tokens": 6 + i % 7,
                   "temperature": 0, "ignore_eos": true})
        })
        .collect();
    let alone: Vec<Value> = bodies.iter().map(|b| s.complete(b.clone())["choices"][0]["text"].clone()).collect();
    let steps_before = s.metric("panguc_generated_tokens_total");
    let together: Vec<Value> = std::thread::scope(|sc| {
        let handles: Vec<_> =
            bodies.iter().map(|b| sc.spawn(|| s.complete(b.clone())["choices"][0]["text"].clone())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    // They really ran together: some engine step held several of them.
    assert!(s.metric("panguc_step_sequences_max") >= 4.0, "steps were shared");
    let want: f64 = bodies.iter().map(|b| b["max_tokens"].as_f64().unwrap()).sum();
    assert_eq!(s.metric("panguc_generated_tokens_total") - steps_before, want);
    assert_eq!(s.wait_metric("panguc_kv_blocks_in_use", |v| v == 0.0), 0.0);
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_blocks() {
    let s = Server::start(&[]);
    let body =
        json!({"prompt": "a long answer", "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut reader = s.stream("/v1/completions", body);
    let mut line = String::new();
    for _ in 0..6 {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    let held = s.metric("panguc_kv_blocks_in_use");
    assert!(held > 0.0, "the running sequence holds blocks");
    assert_eq!(s.metric("panguc_requests_running"), 1.0);
    drop(reader);
    s.wait_metric("panguc_kv_blocks_in_use", |v| v == 0.0);
    assert_eq!(s.metric("panguc_requests_cancelled_total"), 1.0);
    assert_eq!(s.metric("panguc_requests_running"), 0.0);
    assert!(s.metric("panguc_generated_tokens_total") < 4000.0, "cancelled long before its end");
    // The server goes on serving.
    let v = s.complete(json!({"prompt": "again", "max_tokens": 3}));
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
}

#[test]
fn bad_requests_get_400_with_an_openai_error_body() {
    let s = Server::start(&["--max-model-len", "64"]);
    let cases: [(&str, &str, u16, Option<&str>); 10] = [
        ("/v1/completions", "{\"prompt\": ", 400, None),
        ("/v1/completions", "[1, 2]", 400, None),
        ("/v1/completions", r#"{"prompt": "x", "max_tokens": "ten"}"#, 400, Some("max_tokens")),
        ("/v1/completions", r#"{"prompt": "x", "temperature": -1}"#, 400, Some("temperature")),
        ("/v1/completions", r#"{"prompt": "x", "max_tokens": 100}"#, 400, Some("max_tokens")),
        ("/v1/completions", r#"{"prompt": [1, 2, 99999]}"#, 400, Some("prompt")),
        ("/v1/completions", r#"{"prompt": "x", "model": "gpt-4"}"#, 404, None),
        ("/v1/chat/completions", r#"{"messages": "hi"}"#, 400, Some("messages")),
        ("/v1/chat/completions", r#"{"messages": [{"role": "user"}]}"#, 400, Some("messages[0].content")),
        ("/v1/completions", "\u{0}\u{ffff}", 400, None),
    ];
    for (path, body, status, param) in cases {
        let (got, v) = s.post(path, body);
        assert_eq!(got, status, "{body}: {v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{v}");
        assert_eq!(e["param"].as_str(), param, "{body}: {v}");
    }
    // A prompt longer than the context.
    let long: Vec<i64> = (0..80).map(|i| 300 + i % 100).collect();
    let (got, v) = s.post("/v1/completions", &json!({"prompt": long}).to_string());
    assert_eq!(got, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("80 tokens"), "{v}");
    // Nothing above hurt the server.
    assert_eq!(s.complete(json!({"prompt": "fine", "max_tokens": 2}))["object"], "text_completion");
}

#[test]
fn a_full_waiting_queue_answers_429() {
    let s = Server::start(&["--max-seqs", "1", "--max-queue", "1"]);
    // One request runs (the only running slot) ...
    let body = json!({"prompt": "busy", "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut running = s.stream("/v1/completions", body);
    let mut line = String::new();
    running.read_line(&mut line).unwrap();
    // ... one waits (the whole queue) ...
    std::thread::scope(|sc| {
        let waiting = sc.spawn(|| s.post("/v1/completions", r#"{"prompt": "queued", "max_tokens": 2}"#));
        s.wait_metric("panguc_requests_waiting", |v| v == 1.0);
        // ... and the next is refused.
        let (status, v) = s.post("/v1/completions", r#"{"prompt": "one too many", "max_tokens": 2}"#);
        assert_eq!(status, 429, "{v}");
        assert_eq!(v["error"]["code"], "queue_full");
        assert_eq!(s.metric("panguc_requests_rejected_total"), 1.0);
        // The running client leaves: the waiting request runs and finishes.
        drop(running);
        let (status, v) = waiting.join().unwrap();
        assert_eq!(status, 200, "{v}");
    });
    assert_eq!(s.metric("panguc_requests_waiting"), 0.0);
}

#[test]
fn sigterm_drains_the_requests_in_flight_and_exits_0() {
    let mut s = Server::start(&[]);
    let body = json!({"prompt": "drain me", "max_tokens": 300, "temperature": 0, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}});
    let mut reader = s.stream("/v1/completions", body);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let pid = s.child.id() as i32;
    // SAFETY: kill(2) on the server child this test spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let ev = events(reader);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "the stream in flight completes");
    assert_eq!(chunks(&ev).last().unwrap()["usage"]["completion_tokens"], 300);
    let t = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the server did not exit after draining");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(ureq::get(&s.url("/health")).call().is_err(), "nothing listens any more");
}
