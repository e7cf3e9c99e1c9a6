//! Bad checkpoints must fail with one message naming the file and the
//! key/tensor at fault. Each fixture is a synthesized tiny checkpoint,
//! corrupted in one specific way.

use panguc::frontend::{Checkpoint, INDEX_FILE};
use panguc::synth::{synth, Preset};
use panguc_ir::DType;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};

/// A valid tiny checkpoint in `<tmp>/ck` (f32: four shards).
fn fixture() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    synth(&dir, Preset::Tiny, 11, DType::F32).unwrap();
    (tmp, dir)
}

/// The full error chain of opening `dir`, which must fail.
fn open_err(dir: &Path) -> String {
    let err = Checkpoint::open(dir).expect_err("opening a corrupt checkpoint must fail");
    format!("{err:#}")
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message should mention `{p}`:\n{msg}");
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// Rewrites config.json through `edit`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v = read_json(&path);
    edit(v.as_object_mut().unwrap());
    fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The shard file (name) the index assigns to `tensor`.
fn shard_of(dir: &Path, tensor: &str) -> String {
    read_json(&dir.join(INDEX_FILE))["weight_map"][tensor].as_str().unwrap().to_string()
}

/// Rewrites the shard holding `tensor`, replacing it by `edit`'s result
/// (dtype, shape, bytes) or dropping it when `edit` returns None.
fn rewrite_tensor(
    dir: &Path,
    tensor: &str,
    edit: impl FnOnce(Dtype, &[usize], &[u8]) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) -> String {
    let file = shard_of(dir, tensor);
    let path = dir.join(&file);
    let buf = fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let (target, mut views): (Vec<_>, Vec<_>) = st.tensors().into_iter().partition(|(name, _)| name == tensor);
    let (_, old) = target.first().expect("tensor should be in the shard the index names");
    let replacement = edit(old.dtype(), old.shape(), old.data());
    if let Some((dtype, shape, bytes)) = &replacement {
        views.push((tensor.to_string(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()));
    }
    safetensors::serialize_to_file(views, None, &path).unwrap();
    file
}

#[test]
fn fixture_itself_is_valid() {
    // Guards every test below: each must fail for its own corruption only.
    let (_t, dir) = fixture();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.shard_paths().len(), 4);
}

#[test]
fn missing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("no-such-checkpoint");
    let msg = open_err(&dir);
    assert_mentions(&msg, &["no-such-checkpoint", "does not exist"]);
}

#[test]
fn path_is_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("config.json");
    fs::write(&file, "{}").unwrap();
    assert_mentions(&open_err(&file), &["config.json", "not a directory"]);
}

#[test]
fn missing_config() {
    let (_t, dir) = fixture();
    fs::remove_file(dir.join("config.json")).unwrap();
    let msg = open_err(&dir);
    assert_mentions(&msg, &[&dir.join("config.json").display().to_string(), "not found"]);
}

#[test]
fn config_not_json() {
    let (_t, dir) = fixture();
    fs::write(dir.join("config.json"), "{\n  \"hidden_size\": 64,\n  this is not json\n}\n").unwrap();
    let msg = open_err(&dir);
    assert_mentions(&msg, &["config.json", "not valid JSON", "line 3"]);
}

#[test]
fn config_missing_required_key() {
    let (_t, dir) = fixture();
    edit_config(&dir, |c| {
        c.remove("num_key_value_heads");
    });
    let msg = open_err(&dir);
    assert_mentions(&msg, &["config.json", "missing required key `num_key_value_heads`"]);
}

#[test]
fn config_wrong_type() {
    let (_t, dir) = fixture();
    edit_config(&dir, |c| {
        c.insert("hidden_size".into(), "64".into());
    });
    let msg = open_err(&dir);
    assert_mentions(&msg, &["config.json: key `hidden_size` must be a non-negative integer, found string"]);
}

#[test]
fn config_hidden_not_divisible_by_heads() {
    let (_t, dir) = fixture();
    edit_config(&dir, |c| {
        c.insert("hidden_size".into(), 66.into());
    });
    let msg = open_err(&dir);
    assert_mentions(&msg, &["config.json", "`hidden_size` (66)", "`num_attention_heads` (4)"]);
}

#[test]
fn config_experts_not_divisible_by_groups() {
    let (_t, dir) = fixture();
    edit_config(&dir, |c| {
        c.insert("num_experts_per_tok".into(), 6.into());
    });
    let msg = open_err(&dir);
    assert_mentions(&msg, &["config.json", "`num_experts` (64)", "`num_experts_per_tok` (6)"]);
}

#[test]
fn config_v2_architecture() {
    let (_t, dir) = fixture();
    edit_config(&dir, |c| {
        c.insert("architectures".into(), serde_json::json!(["PanguProMoEV2ForCausalLM"]));
    });
    let msg = open_err(&dir);
    assert_mentions(&msg, &["config.json", "PanguProMoEV2ForCausalLM", "openPangu V2", "not supported"]);
}

#[test]
fn config_v2_only_key() {
    let (_t, dir) = fixture();
    edit_config(&dir, |c| {
        c.insert("sandwich_norm".into(), true.into());
    });
    assert_mentions(&open_err(&dir), &["config.json", "`sandwich_norm`", "openPangu V2"]);
}

#[test]
fn index_names_missing_shard() {
    let (_t, dir) = fixture();
    let file = shard_of(&dir, "lm_head.weight");
    fs::remove_file(dir.join(&file)).unwrap();
    let msg = open_err(&dir);
    assert_mentions(&msg, &[INDEX_FILE, &file, "does not exist"]);
}

#[test]
fn index_not_json() {
    let (_t, dir) = fixture();
    fs::write(dir.join(INDEX_FILE), "{\"weight_map\": ").unwrap();
    assert_mentions(&open_err(&dir), &[INDEX_FILE, "not valid JSON"]);
}

#[test]
fn shard_shorter_than_length_prefix() {
    let (_t, dir) = fixture();
    let file = shard_of(&dir, "model.norm.weight");
    fs::write(dir.join(&file), [1u8, 2, 3]).unwrap();
    assert_mentions(&open_err(&dir), &[&file, "too short", "truncated header"]);
}

#[test]
fn shard_with_truncated_header() {
    let (_t, dir) = fixture();
    let file = shard_of(&dir, "model.norm.weight");
    let path = dir.join(&file);
    let bytes = fs::read(&path).unwrap();
    // Keep the length prefix and half the header.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    fs::write(&path, &bytes[..8 + header_len / 2]).unwrap();
    assert_mentions(&open_err(&dir), &[&file, "truncated header", &format!("header length {header_len}")]);
}

#[test]
fn header_length_larger_than_file() {
    let (_t, dir) = fixture();
    let file = shard_of(&dir, "model.embed_tokens.weight");
    let path = dir.join(&file);
    let mut bytes = fs::read(&path).unwrap();
    let bogus = 10 * bytes.len() as u64;
    bytes[..8].copy_from_slice(&bogus.to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    assert_mentions(&open_err(&dir), &[&file, &format!("header length {bogus} is larger than the file")]);
}

#[test]
fn tensor_data_out_of_range() {
    let (_t, dir) = fixture();
    let file = shard_of(&dir, "lm_head.weight");
    let path = dir.join(&file);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 16]).unwrap();
    // The last tensor in file order is the one cut short.
    let msg = open_err(&dir);
    assert_mentions(&msg, &[&file, "data offsets", "out of range"]);
    assert!(msg.contains("tensor `"), "should name the tensor: {msg}");
}

#[test]
fn tensor_listed_in_index_but_not_in_shard() {
    let (_t, dir) = fixture();
    let name = "model.layers.1.mlp.experts.17.up_proj.weight";
    let file = rewrite_tensor(&dir, name, |_, _, _| None);
    let msg = open_err(&dir);
    assert_mentions(&msg, &[INDEX_FILE, name, &file, "does not contain it"]);
}

#[test]
fn tensor_missing_everywhere() {
    let (_t, dir) = fixture();
    let name = "model.layers.0.self_attn.v_proj.bias";
    rewrite_tensor(&dir, name, |_, _, _| None);
    let index_path = dir.join(INDEX_FILE);
    let mut index = read_json(&index_path);
    index["weight_map"].as_object_mut().unwrap().remove(name);
    fs::write(&index_path, index.to_string()).unwrap();
    let msg = open_err(&dir);
    assert_mentions(
        &msg,
        &[&format!("tensor `{name}` is missing: it should be in one of the shards listed in"), INDEX_FILE],
    );
}

#[test]
fn config_has_more_layers_than_the_weights() {
    let (_t, dir) = fixture();
    edit_config(&dir, |c| {
        c.insert("num_hidden_layers".into(), 3.into());
    });
    let msg = open_err(&dir);
    assert_mentions(
        &msg,
        &[
            "tensor `model.layers.2.input_layernorm.weight` is missing",
            INDEX_FILE,
            "207 of 624 expected tensors missing",
            "and 202 more",
        ],
    );
}

#[test]
fn tensor_with_wrong_shape() {
    let (_t, dir) = fixture();
    let name = "model.layers.0.self_attn.q_proj.weight";
    // Same bytes, transposed-looking shape: only the shape check can catch it.
    let file = rewrite_tensor(&dir, name, |dt, shape, bytes| {
        assert_eq!(shape, [64, 64]);
        Some((dt, vec![32, 128], bytes.to_vec()))
    });
    let msg = open_err(&dir);
    assert_mentions(&msg, &[name, &file, "has shape [32, 128], expected [64, 64]"]);
}

#[test]
fn tensor_with_unsupported_dtype() {
    let (_t, dir) = fixture();
    let name = "model.layers.0.mlp.gate.weight";
    let file = rewrite_tensor(&dir, name, |dt, shape, bytes| {
        assert_eq!(dt, Dtype::F32);
        Some((Dtype::I32, shape.to_vec(), bytes.to_vec()))
    });
    let msg = open_err(&dir);
    assert_mentions(&msg, &[&format!("{name} in "), &file, "has unsupported dtype I32"]);
}

#[test]
fn tensor_stored_in_two_shards() {
    let (_t, dir) = fixture();
    let name = "model.norm.weight";
    let other = shard_of(&dir, "model.embed_tokens.weight");
    assert_ne!(other, shard_of(&dir, name));
    // Copy model.norm.weight into the first shard as well.
    let ck_bytes = {
        let ck = Checkpoint::open(&dir).unwrap();
        ck.tensor_bytes(name).unwrap().to_vec()
    };
    let path = dir.join(&other);
    let buf = fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let mut views = st.tensors();
    views.push((name.to_string(), TensorView::new(Dtype::F32, vec![64], &ck_bytes).unwrap()));
    safetensors::serialize_to_file(views, None, &path).unwrap();
    assert_mentions(&open_err(&dir), &[name, "stored twice", &other]);
}
