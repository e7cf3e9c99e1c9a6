//! A small real SentencePiece `tokenizer.model` for synthetic checkpoints,
//! so the bundled examples speak text.
//!
//! The vocabulary is a byte-pair encoding learnt, deterministically, from a
//! short English and Chinese text embedded below, laid out the way
//! SentencePiece's BPE trainer writes it: `<unk>`, `<s>`, `</s>`, the
//! `[unusedN]` control pieces Pangu's chat format uses, the 256 byte-fallback
//! pieces, the learnt merges (best first), then the single characters; any
//! room left is filled with more `[unusedN]` pieces so the model has exactly
//! `vocab_size` pieces. The file is the SentencePiece protobuf, encoded by
//! the `sentencepiece-model` crate's types.

use anyhow::{bail, Result};
use prost::Message;
use sentencepiece_model::{ModelProto, ModelType, NormalizerSpec, SentencePiece, TrainerSpec, Type};
use std::collections::BTreeMap;

/// What the vocabulary is learnt from: everyday English and Chinese,
/// including the words of the chat format (系统：, 用户：, 助手：).
const CORPUS: &str = "\
The tiny model reads a short text and writes the next word. It is small, so the words it writes \
are not always right, but the tokens are real and the text they make can be read. A user asks a \
question, the system sets the rules, and the assistant answers. The compiler turns the model into \
kernels for the device and the runtime runs them, one token at a time. Hello world! What is the \
time? There are 3 cats and 12 dogs in the garden, and the weather is nice today.
你好，世界！我是一个小模型，我会写中文和英文。用户提出问题，系统给出规则，助手回答问题。\
今天天气很好，我们一起去公园看花。编译器把模型变成设备上的程序，运行时一次生成一个词。\
这是一个测试，请用中文回答。谢谢你的帮助。系统：请简短。用户：你好。助手：你好！";

/// Control pieces `[unused0]..` right after `</s>` (Pangu's turn markers
/// `[unused9]`/`[unused10]` and reasoning markers `[unused16]`/`[unused17]`
/// are among them).
const UNUSED_PIECES: usize = 20;
/// SentencePiece's default `max_sentencepiece_length`.
const MAX_PIECE_CHARS: usize = 16;
/// SentencePiece's whitespace mark.
const SPACE: char = '▁';

/// The serialized `tokenizer.model` with exactly `vocab_size` pieces.
pub fn tokenizer_model(vocab_size: usize) -> Result<Vec<u8>> {
    let fixed = 3 + UNUSED_PIECES + 256;
    if vocab_size < fixed {
        bail!("vocab_size {vocab_size} is too small for a tokenizer: it needs at least {fixed} pieces");
    }
    let mut pieces =
        vec![piece("<unk>", 0.0, Type::Unknown), piece("<s>", 0.0, Type::Control), piece("</s>", 0.0, Type::Control)];
    pieces.extend((0..UNUSED_PIECES).map(|i| piece(&format!("[unused{i}]"), 0.0, Type::Control)));
    pieces.extend((0..=255u8).map(|b| piece(&format!("<0x{b:02X}>"), 0.0, Type::Byte)));
    let (merges, chars) = learn_bpe(CORPUS, vocab_size - fixed);
    let learnt = merges.iter().chain(&chars);
    pieces.extend(learnt.enumerate().map(|(i, p)| piece(p, -(i as f32), Type::Normal)));
    let mut next_unused = UNUSED_PIECES;
    while pieces.len() < vocab_size {
        pieces.push(piece(&format!("[unused{next_unused}]"), 0.0, Type::Control));
        next_unused += 1;
    }
    let model = ModelProto {
        pieces,
        trainer_spec: Some(TrainerSpec {
            model_type: Some(ModelType::Bpe as i32),
            vocab_size: Some(vocab_size as i32),
            character_coverage: Some(1.0),
            byte_fallback: Some(true),
            split_digits: Some(true),
            max_sentencepiece_length: Some(MAX_PIECE_CHARS as i32),
            control_symbols: (0..next_unused).map(|i| format!("[unused{i}]")).collect(),
            unk_id: Some(0),
            bos_id: Some(1),
            eos_id: Some(2),
            pad_id: Some(-1),
            ..Default::default()
        }),
        // As Llama's tokenizer: no Unicode normalization, a dummy `▁` before
        // the text, spaces kept as they are (so text round-trips).
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
    Ok(model.encode_to_vec())
}

fn piece(text: &str, score: f32, kind: Type) -> SentencePiece {
    SentencePiece { piece: Some(text.to_string()), score: Some(score), r#type: Some(kind as i32) }
}

/// Learn up to `budget` pieces from `corpus`: returns the merged pieces in
/// the order they were learnt and the single characters (most frequent
/// first) that make them up. Words are whitespace-separated, each starting
/// with `▁` as SentencePiece sees them; digits stay single (split_digits).
/// Every choice breaks ties by string order, so the result is deterministic.
fn learn_bpe(corpus: &str, budget: usize) -> (Vec<String>, Vec<String>) {
    let mut char_counts: BTreeMap<char, u64> = BTreeMap::new();
    let mut words: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for word in corpus.split_whitespace() {
        let symbols: Vec<String> = std::iter::once(SPACE).chain(word.chars()).map(String::from).collect();
        for c in std::iter::once(SPACE).chain(word.chars()) {
            *char_counts.entry(c).or_default() += 1;
        }
        *words.entry(symbols).or_default() += 1;
    }
    let mut chars: Vec<(char, u64)> = char_counts.into_iter().collect();
    chars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    chars.truncate(budget);
    let chars: Vec<String> = chars.into_iter().map(|(c, _)| c.to_string()).collect();

    let mut vocab: std::collections::BTreeSet<String> = chars.iter().cloned().collect();
    let mut words: Vec<(Vec<String>, u64)> = words.into_iter().collect();
    let mut merges = vec![];
    while chars.len() + merges.len() < budget {
        let mut pairs: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (symbols, count) in &words {
            for w in symbols.windows(2) {
                let mergeable = vocab.contains(&w[0])
                    && vocab.contains(&w[1])
                    && !w[1].starts_with(SPACE)
                    && !w.iter().any(|s| s.chars().all(|c| c.is_ascii_digit()))
                    && w[0].chars().count() + w[1].chars().count() <= MAX_PIECE_CHARS;
                if mergeable {
                    *pairs.entry((&w[0], &w[1])).or_default() += count;
                }
            }
        }
        // Most frequent pair; among equals the first in string order.
        let Some(((left, right), count)) =
            pairs.into_iter().fold(None, |best: Option<((&str, &str), u64)>, (pair, n)| match best {
                Some((_, m)) if m >= n => best,
                _ => Some((pair, n)),
            })
        else {
            break;
        };
        if count < 2 {
            break;
        }
        let (left, right) = (left.to_string(), right.to_string());
        let merged = format!("{left}{right}");
        for (symbols, _) in &mut words {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == left && symbols[i + 1] == right {
                    symbols[i] = merged.clone();
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        if vocab.insert(merged.clone()) {
            merges.push(merged);
        }
    }
    (merges, chars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentencepiece_model::SentencePieceModel;

    #[test]
    fn has_exactly_vocab_size_pieces_in_sentencepiece_order() {
        for vocab in [512, 32000] {
            let model = SentencePieceModel::from_slice(tokenizer_model(vocab).unwrap()).unwrap();
            assert_eq!(model.pieces.len(), vocab);
            let text = |i: usize| model.pieces[i].piece().to_string();
            assert_eq!((text(0), text(1), text(2)), ("<unk>".into(), "<s>".into(), "</s>".into()));
            assert_eq!(text(12), "[unused9]");
            assert_eq!(model.pieces[12].r#type(), Type::Control);
            assert_eq!(text(3 + UNUSED_PIECES), "<0x00>");
            assert_eq!(text(3 + UNUSED_PIECES + 255), "<0xFF>");
            let distinct: std::collections::BTreeSet<String> = (0..vocab).map(text).collect();
            assert_eq!(distinct.len(), vocab, "piece texts are unique");
            let normal = model.pieces.iter().filter(|p| p.r#type() == Type::Normal).count();
            assert!(normal > 150, "learnt pieces: {normal}");
            assert!(model.trainer().unwrap().byte_fallback());
        }
        assert!(tokenizer_model(100).is_err());
    }

    #[test]
    fn learns_frequent_pieces_first() {
        let (merges, chars) = learn_bpe("the the the then a", 100);
        assert_eq!(chars[0], "▁", "the most frequent character first");
        assert_eq!(merges[0], "he", "▁t, th and he tie as most frequent: string order picks he");
        assert!(merges.contains(&"▁the".to_string()), "{merges:?}");
        assert!(!merges.contains(&"▁a".to_string()), "a pair seen once is not merged: {merges:?}");
    }
}
