//! Snapshots of the imported IR (review diffs; never accept them blindly),
//! and the text round trip on real model graphs.

use panguc::commands::{import, import_with, open_checkpoint};
use panguc::import::KvLayout;
use panguc_ir::text::{parse_module, print_module};
use std::path::PathBuf;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name)
}

#[test]
fn tiny_model_imported_ir() {
    let ckpt = open_checkpoint(&example("tiny-pangu"), false).unwrap();
    let text = print_module(&import(&ckpt).unwrap());
    assert_eq!(print_module(&parse_module(&text).unwrap()), text);
    insta::assert_snapshot!("tiny_import", text);
}

/// The ragged-batch import: step inputs, paged caches, `kv_cache_write` and
/// `paged_attention` in the layer; everything else as in `tiny_import`.
#[test]
fn tiny_model_batched_imported_ir() {
    let ckpt = open_checkpoint(&example("tiny-pangu"), false).unwrap();
    let module = import_with(&ckpt, KvLayout::Paged { block_size: 128 }).unwrap();
    let text = print_module(&module);
    assert_eq!(print_module(&parse_module(&text).unwrap()), text);
    insta::assert_snapshot!("tiny_import_batched", text);
}

#[test]
fn pangu_72b_config_only_imported_ir() {
    let ckpt = open_checkpoint(&example("pangu-pro-moe-72b"), false).unwrap();
    assert!(!ckpt.has_weights());
    let module = import(&ckpt).unwrap();
    let text = print_module(&module);
    assert_eq!(print_module(&parse_module(&text).unwrap()), text);
    // One layer function, called 48 times, each with its own weight prefix.
    let calls: Vec<_> = module.entry_fn().nodes.iter().filter(|n| matches!(n.op, panguc_ir::Op::Call { .. })).collect();
    assert_eq!(calls.len(), 48);
    assert_eq!(module.functions["decoder_layer"].weight_params().count(), 207);
    insta::assert_snapshot!("pangu_72b_import", text);
}
