//! Text in, text out: the synthesized SentencePiece tokenizer, streaming
//! detokenization, chat prompts, the tokenizer in packages, `run --prompt`.

use panguc::synth::{synth, Preset};
use panguc_ir::DType;
use panguc_runtime::chat::{pangu_prompt, ChatMessage};
use panguc_runtime::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn panguc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_panguc")).args(args).output().expect("panguc runs")
}

fn tiny_example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu")
}

fn tiny_tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&tiny_example(), &Preset::Tiny.config()).unwrap()
}

/// Ids of the `[unusedN]` control pieces and the byte pieces in the
/// synthesized vocabulary (see compiler/src/synth_tokenizer.rs).
const UNUSED9: i64 = 12;
const UNUSED10: i64 = 13;
const BYTE_PIECES: std::ops::Range<i64> = 23..279;

#[test]
fn encodes_like_sentencepiece() {
    // Recorded by hand from the SentencePiece library (Python
    // `sentencepiece` 0.2.x, `encode`) on examples/tiny-pangu/tokenizer.model.
    let recorded: [(&str, &[i64]); 11] = [
        ("Hello world", &[347, 407, 321, 358, 356, 313, 358, 357]),
        ("The model writes the next word.", &[304, 331, 335, 282, 307, 297, 313, 318]),
        ("你好，世界！", &[347, 315, 363, 415, 439, 400]),
        ("emoji 🚀 ok", &[347, 348, 359, 356, 129, 355, 347, 263, 182, 177, 151, 347, 356, 367]),
        ("a  b   c", &[281, 347, 329, 347, 347, 305]),
        (" lead", &[347, 347, 358, 348, 351, 357]),
        ("用户提出问题", &[347, 379, 388, 433, 383, 344]),
        ("鑫", &[347, 256, 168, 194]),
        (
            "The assistant answers: 你好，世界！🚀",
            &[
                304, 330, 350, 355, 328, 351, 302, 284, 350, 360, 291, 350, 81, 347, 315, 363, 415, 439, 400, 263, 182,
                177, 151,
            ],
        ),
        ("  two  spaces ", &[347, 347, 279, 360, 356, 347, 289, 411, 351, 366, 292, 347]),
        ("助手：", &[347, 339, 380]),
    ];
    let t = tiny_tokenizer();
    for (text, ids) in recorded {
        assert_eq!(t.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(t.decode(ids).unwrap(), text);
    }
}

#[test]
fn round_trips_ascii_chinese_emoji_spaces_and_unknown_characters() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), Preset::Tiny, 0, DType::BF16).unwrap();
    let t = Tokenizer::from_dir(dir.path(), &Preset::Tiny.config()).unwrap();
    for text in
        ["Hello world!", "今天天气很好", "mixed 中文 and English", "🚀🎉", "  two  spaces ", "tab\tand\nnewline"]
    {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text, "{text:?} -> {ids:?}");
    }
    // Learnt pieces carry the word's leading `▁`: one id for " the", and
    // fewer ids than characters for common English.
    let the = t.encode("the the the").unwrap();
    assert_eq!(the.len(), 3, "{the:?}");
    assert!(the.iter().all(|&id| id == the[0]));
    // 鑫 and 🚀 are not in the vocabulary: byte fallback spells them out
    // (3 and 4 UTF-8 bytes), never <unk>.
    let ids = t.encode("鑫").unwrap();
    assert_eq!(ids.iter().filter(|id| BYTE_PIECES.contains(id)).count(), 3, "{ids:?}");
    let ids = t.encode("🚀").unwrap();
    assert_eq!(ids.iter().filter(|id| BYTE_PIECES.contains(id)).count(), 4, "{ids:?}");
    assert!(!ids.contains(&0));
    // bos comes first, once.
    assert_eq!(t.encode_prompt("hi").unwrap()[0], 1);
    assert_eq!(t.encode_prompt("<s>hi").unwrap().iter().filter(|&&i| i == 1).count(), 1);
}

#[test]
fn small_preset_tokenizer_fills_its_vocabulary_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = Preset::Small.config().vocab_size;
    std::fs::write(dir.path().join("tokenizer.model"), panguc::synth_tokenizer::tokenizer_model(vocab).unwrap())
        .unwrap();
    let t = Tokenizer::from_dir(dir.path(), &Preset::Small.config()).unwrap();
    let text = "The assistant answers: 你好，世界！🚀";
    assert_eq!(t.decode(&t.encode(text).unwrap()).unwrap(), text);
    // Fillers `[unused20]..` run from after the learnt pieces to the end.
    let first_filler = t.encode("[unused20]").unwrap();
    assert_eq!(first_filler.len(), 1);
    assert!(first_filler[0] > 279 + 150, "learnt pieces come first: {first_filler:?}");
    let last = format!("[unused{}]", 20 + vocab as i64 - 1 - first_filler[0]);
    assert_eq!(t.encode(&last).unwrap(), [vocab as i64 - 1], "{last} is the last piece");
}

#[test]
fn chat_format_markers_are_single_control_ids() {
    let t = tiny_tokenizer();
    let turns = [ChatMessage::new("system", "be brief"), ChatMessage::new("user", "你好")];
    let prompt = t.render_chat(&turns).unwrap();
    assert_eq!(prompt, pangu_prompt(&turns), "no tokenizer_config.json: the documented Pangu format");
    let ids = t.encode_prompt(&prompt).unwrap();
    assert_eq!(ids[0], 1, "bos");
    assert_eq!(ids.iter().filter(|&&i| i == UNUSED9).count(), 3, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == UNUSED10).count(), 2, "{ids:?}");
    assert_eq!(ids[1], UNUSED9);
    // Control pieces are left out of decoded text.
    assert_eq!(t.decode(&ids).unwrap(), "系统：be brief用户：你好助手：");
}

#[test]
fn streaming_never_splits_a_character() {
    let t = tiny_tokenizer();
    let text = "鑫🚀 hello 你好 🎉鑫";
    let ids = t.encode(text).unwrap();
    let mut stream = t.stream();
    let mut chunks = vec![];
    for &id in &ids {
        chunks.push(stream.push(id).unwrap());
    }
    chunks.push(stream.finish().unwrap());
    let held_back = chunks.iter().filter(|c| c.is_empty()).count();
    assert!(held_back >= 6, "multi-byte characters arrive over several tokens: {chunks:?}");
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    assert_eq!(chunks.concat(), t.decode(&ids).unwrap());
    assert_eq!(chunks.concat(), text);
    // A byte that can never become UTF-8 is shown, not held forever.
    let mut stream = t.stream();
    let lone_continuation = BYTE_PIECES.start + 0x80;
    assert_eq!(stream.push(lone_continuation).unwrap(), "\u{FFFD}");
    // An unfinished character at the end comes out of finish().
    let mut stream = t.stream();
    let first_byte_of_3 = BYTE_PIECES.start + 0xE9;
    assert_eq!(stream.push(first_byte_of_3).unwrap(), "");
    assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
}

#[test]
fn chat_template_from_tokenizer_config_is_rendered() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_example().join("tokenizer.model"), dir.path().join("tokenizer.model")).unwrap();
    // Block tags end their lines: trim_blocks drops those newlines.
    let template = "{{ bos_token }}{% for m in messages %}\n{% if m.role == 'system' %}\n\
                    [unused9]系统：{{ m.content }}[unused10]{% else %}\n\
                    <{{ m.role }}>{{ m.content | upper }}</{{ m.role }}>{% endif %}\n{% endfor %}\n\
                    {% if add_generation_prompt %}[unused9]助手：{% endif %}";
    let config = serde_json::json!({ "chat_template": template, "eos_token": "</s>" });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let t = Tokenizer::from_dir(dir.path(), &Preset::Tiny.config()).unwrap();
    let turns = [ChatMessage::new("system", "short"), ChatMessage::new("user", "hi")];
    let text = t.render_chat(&turns).unwrap();
    assert_eq!(text, "<s>[unused9]系统：short[unused10]<user>HI</user>[unused9]助手：");
    let ids = t.encode_prompt(&text).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 1, "the template's <s> is the only bos: {ids:?}");
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "{% for %}"}"#).unwrap();
    let t = Tokenizer::from_dir(dir.path(), &Preset::Tiny.config()).unwrap();
    let err = format!("{:#}", t.render_chat(&turns).unwrap_err());
    assert!(err.contains("tokenizer_config.json"), "{err}");
}

#[test]
fn synth_writes_the_committed_tokenizer_deterministically() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth(a.path(), Preset::Tiny, 0, DType::BF16).unwrap();
    synth(b.path(), Preset::Tiny, 7, DType::F32).unwrap();
    let read = |d: &Path| std::fs::read(d.join("tokenizer.model")).unwrap();
    assert_eq!(read(a.path()), read(b.path()), "the tokenizer depends on the preset only");
    assert_eq!(read(a.path()), read(&tiny_example()), "examples/tiny-pangu carries what synth writes");
}

#[test]
fn package_carries_and_verifies_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pkg");
    let o = panguc(&[
        "compile",
        tiny_example().to_str().unwrap(),
        "--target",
        "ir",
        "--config-only",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest = panguc_runtime::package::read_manifest(&out).unwrap();
    let entry = &manifest.files["tokenizer.model"];
    let original = tiny_example().join("tokenizer.model");
    assert_eq!(entry.sha256, panguc_runtime::package::sha256_file(&original).unwrap());
    panguc_runtime::package::verify_package(&out).unwrap();
    let t = Tokenizer::open(&out, &manifest.model).unwrap();
    assert_eq!(t.encode("Hello world").unwrap(), tiny_tokenizer().encode("Hello world").unwrap());
    // One changed byte: refused, naming the file.
    let path = out.join("tokenizer.model");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = format!("{:#}", panguc_runtime::package::verify_package(&out).unwrap_err());
    assert!(err.contains("tokenizer.model"), "{err}");
}

#[test]
fn run_prompt_prints_the_text_of_the_generated_tokens() {
    let tiny = tiny_example();
    let tiny = tiny.to_str().unwrap();
    let t = tiny_tokenizer();
    let prompt = "Hello, 你好";
    let ids: Vec<String> = t.encode_prompt(prompt).unwrap().iter().map(i64::to_string).collect();
    let o = panguc(&["run", tiny, "--tokens", &ids.join(","), "--max-new-tokens", "6", "--stop-at-eos"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let generated: Vec<i64> =
        String::from_utf8(o.stdout).unwrap().trim().split(',').map(|s| s.parse().unwrap()).collect();
    let o = panguc(&["run", tiny, "--prompt", prompt, "--max-new-tokens", "6"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(text, format!("{}\n", t.decode(&generated).unwrap()));
    assert!(text.trim().chars().count() > 0);
    // A batch: each sequence labelled, the same text as run alone (greedy).
    let o = panguc(&["run", tiny, "--prompt", prompt, "--prompt", "the", "--max-new-tokens", "6"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.starts_with(&format!("[0] {text}[1] ")), "{out}");
    // No tokenizer: a clear error naming the directory.
    let bare = tempfile::tempdir().unwrap();
    std::fs::copy(Path::new(tiny).join("config.json"), bare.path().join("config.json")).unwrap();
    let o = panguc(&["run", bare.path().to_str().unwrap(), "--prompt", "hi"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.starts_with("error: ") && !err.contains("panicked"), "{err}");
    assert!(err.contains(bare.path().to_str().unwrap()) && err.contains("tokenizer.model"), "{err}");
}

/// A Unigram SentencePiece model (the other model type `tokenizer.model`
/// may hold): the most likely segmentation wins, characters outside the
/// vocabulary fall back to byte pieces, and decoding round-trips.
#[test]
fn unigram_sentencepiece_model_segments_by_score_with_byte_fallback() {
    use prost::Message;
    use sentencepiece_model::{ModelProto, ModelType, NormalizerSpec, SentencePiece, TrainerSpec, Type};
    let piece = |text: &str, score: f32, kind: Type| SentencePiece {
        piece: Some(text.to_string()),
        score: Some(score),
        r#type: Some(kind as i32),
    };
    let mut pieces =
        vec![piece("<unk>", 0.0, Type::Unknown), piece("<s>", 0.0, Type::Control), piece("</s>", 0.0, Type::Control)];
    pieces.extend((0..=255u8).map(|b| piece(&format!("<0x{b:02X}>"), 0.0, Type::Byte)));
    let normal: [(&str, f32); 12] = [
        ("▁hello", -1.0),
        ("▁world", -1.5),
        ("▁he", -2.0),
        ("llo", -2.5),
        ("▁", -3.0),
        ("h", -5.0),
        ("e", -5.0),
        ("l", -5.0),
        ("o", -5.0),
        ("w", -5.0),
        ("r", -5.0),
        ("d", -5.0),
    ];
    let first_normal = pieces.len() as i64;
    pieces.extend(normal.iter().map(|(p, s)| piece(p, *s, Type::Normal)));
    let id = |p: &str| first_normal + normal.iter().position(|(q, _)| *q == p).unwrap() as i64;
    let model = ModelProto {
        pieces,
        trainer_spec: Some(TrainerSpec {
            model_type: Some(ModelType::Unigram as i32),
            byte_fallback: Some(true),
            unk_id: Some(0),
            bos_id: Some(1),
            eos_id: Some(2),
            pad_id: Some(-1),
            ..Default::default()
        }),
        normalizer_spec: Some(NormalizerSpec {
            name: Some("identity".to_string()),
            precompiled_charsmap: Some(vec![]),
            add_dummy_prefix: Some(true),
            remove_extra_whitespaces: Some(false),
            escape_whitespaces: Some(true),
            normalization_rule_tsv: None,
        }),
        self_test_data: None,
        denormalizer_spec: None,
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.model"), model.encode_to_vec()).unwrap();
    let t = Tokenizer::from_dir(dir.path(), &Preset::Tiny.config()).unwrap();
    // "▁hello" (-1) beats "▁he" + "llo" (-4.5) and any character split.
    assert_eq!(t.encode("hello world").unwrap(), [id("▁hello"), id("▁world")]);
    assert_eq!(t.encode("hello hello").unwrap(), [id("▁hello"), id("▁hello")]);
    // "é" is not a piece: its two UTF-8 bytes come out as byte pieces (3 + byte).
    let ids = t.encode("hello é").unwrap();
    assert_eq!(ids, [id("▁hello"), id("▁"), 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(t.decode(&ids).unwrap(), "hello é");
    // Several fallback characters in a row, between pieces.
    for text in ["éè", "héllo", "🚀é wörld"] {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text, "{ids:?}");
    }
}

/// A Hugging Face `tokenizer.json` (what a model ships when it has no
/// `tokenizer.model`): byte-level BPE merges applied in rank order.
#[test]
fn tokenizer_json_bpe_model_applies_its_merges() {
    let json = r#"{
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [],
      "normalizer": null,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "post_processor": null,
      "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "model": {
        "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
        "vocab": {"h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "he": 5, "ll": 6, "hell": 7, "hello": 8, "Ġhello": 9, "Ġh": 10},
        "merges": ["h e", "l l", "he ll", "hell o", "Ġ h", "Ġh ello"]
      }
    }"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
    let t = Tokenizer::from_dir(dir.path(), &Preset::Tiny.config()).unwrap();
    assert_eq!(t.encode("hello").unwrap(), [8]);
    // "helo": h+e merge, then no "l o" merge.
    assert_eq!(t.encode("helo").unwrap(), [5, 2, 3]);
    assert_eq!(t.decode(&[8, 5, 2, 3]).unwrap(), "hellohelo");
}
