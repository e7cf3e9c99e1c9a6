//! `model.safetensors.index.json`: the standard HF shard index,
//! `{"metadata": {"total_size": N, ...}, "weight_map": {"<tensor>": "<shard file>"}}`.

use anyhow::{bail, Context, Result};
use indexmap::IndexMap;
use serde_json::Value;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ShardIndex {
    pub path: PathBuf,
    /// `metadata.total_size`: bytes of tensor data over all shards, if given.
    pub total_size: Option<u64>,
    /// Tensor name → shard file name (relative to the checkpoint directory).
    pub weight_map: IndexMap<String, String>,
}

impl ShardIndex {
    pub fn read(path: &Path) -> Result<ShardIndex> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ShardIndex> {
        let p = path.display();
        let root: Value = serde_json::from_str(text).with_context(|| format!("{p}: not valid JSON"))?;
        let Some(root) = root.as_object() else {
            bail!("{p}: top level must be a JSON object");
        };
        let total_size = match root.get("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => match m.get("total_size") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().with_context(|| {
                    format!("{p}: key `metadata.total_size` must be a non-negative integer, found {v}")
                })?),
            },
            Some(_) => bail!("{p}: key `metadata` must be an object"),
        };
        let Some(map) = root.get("weight_map") else {
            bail!("{p}: missing required key `weight_map`");
        };
        let Some(map) = map.as_object() else {
            bail!("{p}: key `weight_map` must be an object mapping tensor names to shard files");
        };
        let mut weight_map = IndexMap::with_capacity(map.len());
        for (tensor, file) in map {
            let Some(file) = file.as_str() else {
                bail!("{p}: weight_map entry for `{tensor}` must be a shard file name, found {file}");
            };
            // A shard must live inside the checkpoint directory: refuse
            // absolute paths and `..` so an index cannot point elsewhere.
            let inside = Path::new(file).components().all(|c| matches!(c, Component::Normal(_)));
            if file.is_empty() || !inside {
                bail!("{p}: weight_map entry for `{tensor}` names shard `{file}`, which is not a file inside the checkpoint directory");
            }
            weight_map.insert(tensor.clone(), file.to_string());
        }
        Ok(ShardIndex { path: path.to_path_buf(), total_size, weight_map })
    }

    /// Distinct shard files, sorted (deterministic open order).
    pub fn shard_files(&self) -> Vec<String> {
        let mut files: Vec<String> = self.weight_map.values().cloned().collect();
        files.sort_unstable();
        files.dedup();
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ShardIndex> {
        ShardIndex::parse(text, Path::new("ck/model.safetensors.index.json"))
    }

    #[test]
    fn parses_standard_index() {
        let ix = parse(
            r#"{"metadata": {"total_size": 48, "total_parameters": 24},
            "weight_map": {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors",
                           "c": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(ix.total_size, Some(48));
        assert_eq!(ix.weight_map.len(), 3);
        assert_eq!(ix.shard_files(), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
    }

    #[test]
    fn metadata_is_optional() {
        assert_eq!(parse(r#"{"weight_map": {}}"#).unwrap().total_size, None);
    }

    #[test]
    fn errors_name_file_and_key() {
        for (text, want) in [
            ("{", "not valid JSON"),
            ("[]", "top level must be a JSON object"),
            (r#"{"metadata": {}}"#, "missing required key `weight_map`"),
            (r#"{"weight_map": []}"#, "key `weight_map` must be an object"),
            (r#"{"weight_map": {"a": 3}}"#, "entry for `a` must be a shard file name"),
            (r#"{"weight_map": {"a": "../x.safetensors"}}"#, "not a file inside"),
            (r#"{"weight_map": {"a": "/etc/x"}}"#, "not a file inside"),
            (r#"{"metadata": {"total_size": "9"}, "weight_map": {}}"#, "metadata.total_size"),
        ] {
            let msg = format!("{:#}", parse(text).unwrap_err());
            assert!(msg.contains("ck/model.safetensors.index.json"), "{msg}");
            assert!(msg.contains(want), "{text}: {msg}");
        }
    }
}
