//! The batched import (ragged steps over a paged KV cache) against today's
//! per-sequence interpreter session on the tiny model: two sequences of
//! different prompt lengths, a chunked prefill, decode steps interleaved in
//! changing order, blocks handed out in a scrambled order.

mod common;

use panguc_ir::batch::{SeqChunk, StepMetadata};
use panguc_ir::interp::Interpreter;
use panguc_ir::session::BatchInterpSession;

/// One sequence as the test's little scheduler sees it.
struct Seq {
    /// Prompt, then every greedy token chosen so far.
    tokens: Vec<i64>,
    /// Tokens already in the cache.
    cached: usize,
    blocks: Vec<u32>,
    /// Logits of every row this sequence contributed, in order.
    logits: Vec<Vec<f32>>,
}

fn argmax(row: &[f32]) -> i64 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as i64
}

#[test]
fn batched_steps_match_per_sequence_sessions() {
    let ckpt = common::checkpoint();
    let cfg = ckpt.config().clone();
    let block_size = 2;
    let module = panguc::commands::import_with(&ckpt, panguc::import::KvLayout::Paged { block_size }).unwrap();
    let kv = [cfg.num_key_value_heads, cfg.head_dim()];
    let mut batch =
        BatchInterpSession::new(Interpreter::new(&module, &ckpt), cfg.num_hidden_layers, 16, block_size, kv);

    let prompts: [&[i64]; 2] = [&[5, 17, 42, 99, 3], &[250, 7, 1]];
    let mut seqs: Vec<Seq> =
        prompts.iter().map(|p| Seq { tokens: p.to_vec(), cached: 0, blocks: vec![], logits: vec![] }).collect();
    // Free blocks, popped from the end: neither sequence gets contiguous blocks.
    let mut free: Vec<u32> = vec![8, 13, 1, 10, 6, 15, 3, 11, 0, 12, 4, 14, 2, 9, 5, 7];
    // (sequence, new tokens) per step: A's prompt in two chunks (the first
    // with B's whole prompt), then decodes in changing order and company.
    let schedule: [&[(usize, usize)]; 5] =
        [&[(0, 3), (1, 3)], &[(1, 1), (0, 2)], &[(0, 1), (1, 1)], &[(1, 1)], &[(0, 1)]];
    for step in schedule {
        let mut ids = vec![];
        for &(s, n) in step {
            let seq = &mut seqs[s];
            assert!(seq.cached + n <= seq.tokens.len(), "sequence {s} scheduled past its known tokens");
            while seq.blocks.len() * block_size < seq.cached + n {
                seq.blocks.push(free.pop().expect("enough blocks"));
            }
            ids.extend_from_slice(&seq.tokens[seq.cached..seq.cached + n]);
        }
        let chunks: Vec<SeqChunk> = step
            .iter()
            .map(|&(s, n)| SeqChunk { past: seqs[s].cached, new_tokens: n, blocks: &seqs[s].blocks })
            .collect();
        let meta = StepMetadata::build(block_size, &chunks).unwrap();
        let e = batch.step(&ids[1..], &meta).unwrap_err();
        assert!(e.to_string().contains("token ids for a step of"), "{e}");
        let logits = batch.step(&ids, &meta).unwrap();
        assert_eq!(logits.shape, vec![ids.len(), cfg.vocab_size]);
        for (i, &(s, n)) in step.iter().enumerate() {
            let rows = meta.rows(i);
            let seq = &mut seqs[s];
            seq.logits.extend(
                logits.as_f32()[rows.start * cfg.vocab_size..rows.end * cfg.vocab_size]
                    .chunks(cfg.vocab_size)
                    .map(<[f32]>::to_vec),
            );
            seq.cached += n;
            if seq.cached == seq.tokens.len() {
                let next = argmax(seq.logits.last().unwrap());
                seq.tokens.push(next);
            }
        }
    }

    for (s, seq) in seqs.iter().enumerate() {
        // Alone: the whole prompt in one call, then one call per fed token.
        let reference = common::module(&ckpt, common::Graph::Imported);
        let mut alone = common::session(&reference, &ckpt);
        let prompt = prompts[s].len();
        let mut want: Vec<Vec<f32>> = alone
            .forward(&seq.tokens[..prompt])
            .unwrap()
            .as_f32()
            .chunks(cfg.vocab_size)
            .map(<[f32]>::to_vec)
            .collect();
        for t in &seq.tokens[prompt..seq.cached] {
            want.push(alone.forward(&[*t]).unwrap().into_f32());
        }
        assert_eq!(seq.logits.len(), want.len(), "sequence {s}: rows");
        for (pos, (got, want)) in seq.logits.iter().zip(&want).enumerate() {
            let err =
                got.iter().zip(want).map(|(x, y)| (x - y).abs() / x.abs().max(y.abs()).max(1e-3)).fold(0.0, f32::max);
            assert!(err < 1e-5, "sequence {s} position {pos}: relative difference {err}");
            if pos + 1 >= prompt {
                assert_eq!(argmax(got), argmax(want), "sequence {s} position {pos}: greedy token");
            }
        }
        // Each sequence really generated tokens (the decodes were exercised).
        assert!(seq.tokens.len() > prompt + 1, "sequence {s} generated {:?}", &seq.tokens[prompt..]);
    }
}
