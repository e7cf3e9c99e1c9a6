//! Text <-> token ids for a model directory or a package.
//!
//! The vocabulary comes from `tokenizer.model` (SentencePiece: BPE or
//! Unigram, byte fallback, control and user-defined pieces) or, when a model
//! ships only that, `tokenizer.json`; both are read by the `kitoken` crate.
//! bos/eos ids come from config.json (the model's contract, not the
//! tokenizer's). This module adds what the crate lacks: prompt encoding with
//! bos, and streaming detokenization ([`TextStream`]) that never splits a
//! UTF-8 character spread over several byte-fallback tokens.

use crate::chat::{self, ChatMessage};
use anyhow::{anyhow, bail, Context, Result};
use kitoken::{Kitoken, SpecialTokenKind};
use panguc_ir::PanguConfig;
use sentencepiece_model::{SentencePieceModel, Type};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

pub const SENTENCEPIECE_FILE: &str = "tokenizer.model";
pub const TOKENIZERS_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";
/// Every file that makes up a model's tokenizer; a package carries those
/// its checkpoint had.
pub const TOKENIZER_FILES: [&str; 4] =
    [SENTENCEPIECE_FILE, TOKENIZERS_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE];

/// Control and user-defined pieces written in the text (`[unused9]`, `<s>`)
/// encode as their single id, as the chat format needs. Unknown stays out:
/// the literal `<unk>` text is ordinary characters.
const ENCODE_SPECIALS: &[SpecialTokenKind] = &[SpecialTokenKind::Control, SpecialTokenKind::Priority];
/// Decoded text leaves control pieces (bos, eos, [unusedN]) out, like
/// `skip_special_tokens`; user-defined pieces are text and stay.
const DECODE_SPECIALS: &[SpecialTokenKind] = &[SpecialTokenKind::Priority];

pub struct Tokenizer {
    inner: Kitoken,
    /// Byte-fallback pieces (`<0x41>`) whose byte is also an ordinary piece
    /// (`A`): kitoken keeps only the ordinary one, but a model may still
    /// generate the byte piece's id, so it decodes as its twin.
    byte_aliases: HashMap<u32, u32>,
    /// The lone `▁` piece and the control/user-defined piece ids. Text that
    /// opens with a special piece (`[unused9]...`) must not get the dummy
    /// `▁` SentencePiece puts before the text (transformers drops it too).
    dummy_prefix: Option<(u32, HashSet<u32>)>,
    /// The byte of each byte-fallback piece (`<0xC3>`): kitoken's Unigram
    /// encoder emits a character's fallback bytes last byte first, which
    /// [`utf8_order`] puts back.
    byte_pieces: HashMap<u32, u8>,
    /// The file the vocabulary was read from (for error messages).
    source: PathBuf,
    bos: Option<i64>,
    eos: Option<i64>,
    /// tokenizer_config.json's `chat_template`, when it has one.
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Load the tokenizer of a checkpoint directory, or of a package whose
    /// files were verified (a tokenizer file its manifest does not cover is
    /// refused, since nothing vouches for it).
    pub fn open(dir: &Path, cfg: &PanguConfig) -> Result<Tokenizer> {
        if crate::package::is_package(dir) {
            let manifest = crate::package::read_manifest(dir)?;
            for name in TOKENIZER_FILES {
                if dir.join(name).exists() && !manifest.files.contains_key(name) {
                    bail!("package {}: {name} is not covered by its manifest (recompile the package)", dir.display());
                }
            }
        }
        Tokenizer::from_dir(dir, cfg)
    }

    /// Load the tokenizer of a model directory or package: `tokenizer.model`
    /// if present, else `tokenizer.json`, plus the chat template of
    /// `tokenizer_config.json` if any. bos/eos from `cfg`.
    pub fn from_dir(dir: &Path, cfg: &PanguConfig) -> Result<Tokenizer> {
        let sp = dir.join(SENTENCEPIECE_FILE);
        let hf = dir.join(TOKENIZERS_FILE);
        let (inner, byte_aliases, dummy_prefix, byte_pieces, source) = if sp.is_file() {
            let bytes = std::fs::read(&sp).with_context(|| format!("cannot read {}", sp.display()))?;
            let model = SentencePieceModel::from_slice(&bytes)
                .map_err(|e| anyhow!("{} is not a SentencePiece model: {e}", sp.display()))?;
            let aliases = byte_aliases(&model);
            let prefix = dummy_prefix_before_special(&model);
            let bytes = byte_pieces(&model);
            let t = Kitoken::from_sentencepiece_model(model)
                .map_err(|e| anyhow!("{} is not a usable SentencePiece model: {e}", sp.display()))?;
            (t, aliases, prefix, bytes, sp)
        } else if hf.is_file() {
            let t = Kitoken::from_tokenizers_file(&hf)
                .map_err(|e| anyhow!("{} is not a usable tokenizer.json: {e}", hf.display()))?;
            (t, HashMap::new(), None, HashMap::new(), hf)
        } else {
            bail!(
                "{} has no tokenizer: text needs {SENTENCEPIECE_FILE} or {TOKENIZERS_FILE} in that directory \
                 (give token ids with --tokens instead)",
                dir.display()
            );
        };
        let chat_template = read_chat_template(&dir.join(TOKENIZER_CONFIG_FILE))?;
        Ok(Tokenizer {
            inner,
            byte_aliases,
            dummy_prefix,
            byte_pieces,
            source,
            bos: cfg.bos_token_id,
            eos: cfg.eos_token_id,
            chat_template,
        })
    }

    pub fn bos(&self) -> Option<i64> {
        self.bos
    }

    pub fn eos(&self) -> Option<i64> {
        self.eos
    }

    /// Token ids of `text`, without bos.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let mut ids = self
            .inner
            .encode(text, ENCODE_SPECIALS)
            .map_err(|e| anyhow!("cannot encode the text with {}: {e}", self.source.display()))?;
        if let (Some((space, specials)), [first, second, ..]) = (&self.dummy_prefix, ids.as_slice()) {
            if first == space && specials.contains(second) {
                ids.remove(0);
            }
        }
        utf8_order(&mut ids, &self.byte_pieces);
        Ok(ids.into_iter().map(i64::from).collect())
    }

    /// What the model is fed for `text`: bos (when the config names one and
    /// the text does not already start with it) then the text's ids.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<i64>> {
        let ids = self.encode(text)?;
        Ok(match self.bos {
            Some(bos) if ids.first() != Some(&bos) => std::iter::once(bos).chain(ids).collect(),
            _ => ids,
        })
    }

    /// The bytes `ids` decode to (control pieces left out). Bytes, not a
    /// string: a cut through a multi-byte character is not UTF-8.
    pub fn decode_bytes(&self, ids: &[i64]) -> Result<Vec<u8>> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&id| {
                let id = u32::try_from(id).map_err(|_| anyhow!("token id {id} is negative"))?;
                Ok(*self.byte_aliases.get(&id).unwrap_or(&id))
            })
            .collect::<Result<_>>()?;
        self.inner
            .decode(&ids, DECODE_SPECIALS)
            .map_err(|e| anyhow!("cannot decode with {}: {e}", self.source.display()))
    }

    /// The text of `ids`; bytes that are not UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// A streaming detokenizer for one generated sequence.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream { tokenizer: self, ids: vec![], prefix: 0, read: 0 }
    }

    /// The prompt text of a conversation: the model's chat template when
    /// tokenizer_config.json has one, else the documented Pangu format.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        match &self.chat_template {
            Some(t) => chat::render_template(t, messages, &self.piece_text(self.bos), &self.piece_text(self.eos))
                .with_context(|| format!("chat_template of {}", TOKENIZER_CONFIG_FILE)),
            None => Ok(chat::pangu_prompt(messages)),
        }
    }

    /// The text of a control piece such as bos (`<s>`), for templates.
    fn piece_text(&self, id: Option<i64>) -> String {
        let Some(id) = id.and_then(|id| u32::try_from(id).ok()) else { return String::new() };
        let all = [SpecialTokenKind::Control, SpecialTokenKind::Priority, SpecialTokenKind::Unknown];
        self.inner.decode([id], &all[..]).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }
}

/// Byte piece id -> id of the ordinary piece spelling the same byte.
/// The byte each byte-fallback piece stands for, by id.
fn byte_pieces(model: &SentencePieceModel) -> HashMap<u32, u8> {
    (model.pieces.iter().enumerate())
        .filter(|(_, p)| p.r#type() == Type::Byte)
        .filter_map(|(i, p)| {
            let hex = p.piece().strip_prefix("<0x")?.strip_suffix('>')?;
            Some((i as u32, u8::from_str_radix(hex, 16).ok()?))
        })
        .collect()
}

/// Put each run of byte-fallback ids in UTF-8 order. A run that already
/// decodes as UTF-8 is left alone; one whose characters came out last byte
/// first (continuation bytes, then the lead byte) has each character
/// reversed when that makes it valid UTF-8, and is otherwise left alone.
fn utf8_order(ids: &mut [u32], byte_pieces: &HashMap<u32, u8>) {
    let mut start = 0;
    while start < ids.len() {
        if !byte_pieces.contains_key(&ids[start]) {
            start += 1;
            continue;
        }
        let end = (start..ids.len()).find(|&i| !byte_pieces.contains_key(&ids[i])).unwrap_or(ids.len());
        let run = &mut ids[start..end];
        let bytes: Vec<u8> = run.iter().map(|id| byte_pieces[id]).collect();
        if std::str::from_utf8(&bytes).is_err() {
            let mut fixed = run.to_vec();
            let mut group = 0;
            for i in 0..fixed.len() {
                // A lead byte (not 10xxxxxx) closes a reversed character.
                if bytes[i] & 0xC0 != 0x80 {
                    fixed[group..=i].reverse();
                    group = i + 1;
                }
            }
            let reordered: Vec<u8> = fixed.iter().map(|id| byte_pieces[id]).collect();
            if std::str::from_utf8(&reordered).is_ok() {
                run.copy_from_slice(&fixed);
            }
        }
        start = end;
    }
}

fn byte_aliases(model: &SentencePieceModel) -> HashMap<u32, u32> {
    let ordinary: HashMap<&str, u32> = (model.pieces.iter().enumerate())
        .filter(|(_, p)| p.r#type() == Type::Normal)
        .map(|(i, p)| (p.piece(), i as u32))
        .collect();
    let mut aliases = HashMap::new();
    for (i, p) in model.pieces.iter().enumerate().filter(|(_, p)| p.r#type() == Type::Byte) {
        let byte = p.piece().strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
        let Some(byte) = byte.and_then(|h| u8::from_str_radix(h, 16).ok()) else { continue };
        if let Some(&twin) = std::str::from_utf8(&[byte]).ok().and_then(|c| ordinary.get(c)) {
            aliases.insert(i as u32, twin);
        }
    }
    aliases
}

/// The id of the lone `▁` piece and the ids of the pieces written as text
/// markers (control and user-defined), when the model adds a dummy prefix.
fn dummy_prefix_before_special(model: &SentencePieceModel) -> Option<(u32, HashSet<u32>)> {
    if !model.normalizer().is_none_or(|n| n.add_dummy_prefix()) {
        return None;
    }
    let space = model.pieces.iter().position(|p| p.r#type() == Type::Normal && p.piece() == "\u{2581}")?;
    let specials = (model.pieces.iter().enumerate())
        .filter(|(_, p)| matches!(p.r#type(), Type::Control | Type::UserDefined))
        .map(|(i, _)| i as u32)
        .collect();
    Some((space as u32, specials))
}

/// `chat_template` of a tokenizer_config.json (None when the file or key is
/// absent). A template given as a list of named templates uses `default`.
fn read_chat_template(path: &Path) -> Result<Option<String>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    match v.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string))
            .map(Some)
            .with_context(|| format!("{}: `chat_template` is a list without a `default` template", path.display())),
        Some(_) => bail!("{}: `chat_template` must be a string", path.display()),
    }
}

/// Incremental detokenization of one sequence.
///
/// Decoding a token alone is wrong twice over: a SentencePiece piece's
/// leading `▁` depends on its position, and a character outside the
/// vocabulary arrives as several byte tokens. So each push decodes a short
/// window (from the last emitted token on) with and without the new tokens
/// and emits the difference, holding it back while it ends in an
/// incomplete UTF-8 sequence.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<i64>,
    /// Start of the decode window: the first token of the last emitted text.
    prefix: usize,
    /// Tokens before this index have been emitted.
    read: usize,
}

impl TextStream<'_> {
    /// Add a generated token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: i64) -> Result<String> {
        self.ids.push(id);
        let before = self.tokenizer.decode_bytes(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode_bytes(&self.ids[self.prefix..])?;
        let new = after.get(before.len()..).unwrap_or_default();
        let text = match std::str::from_utf8(new) {
            Ok(s) => s.to_string(),
            // The last character is still arriving byte by byte: wait.
            Err(e) if e.error_len().is_none() => return Ok(String::new()),
            // Bytes that can never become UTF-8: say so with U+FFFD.
            Err(_) => String::from_utf8_lossy(new).into_owned(),
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(text)
    }

    /// The end of the sequence: whatever is still held back (an incomplete
    /// character, shown as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let before = self.tokenizer.decode_bytes(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode_bytes(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(String::from_utf8_lossy(after.get(before.len()..).unwrap_or_default()).into_owned())
    }
}
