//! One memory-mapped `.safetensors` file.
//!
//! The header is parsed and validated by the `safetensors` crate
//! (`SafeTensors::read_metadata`); tensor data is never read here, only
//! located, so opening a 144 GB checkpoint touches a few MB of headers.
//! When the crate rejects a file we re-read the header ourselves to say
//! *which* tensor is broken, because its errors do not always name one.

use super::convert::dtype_name;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Bytes of the little-endian u64 header-length prefix.
const LEN_PREFIX: usize = 8;

/// A tensor located inside a shard: absolute byte range within the file.
#[derive(Debug, Clone)]
pub struct ShardTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

impl ShardTensor {
    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }
}

pub struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Ordered by data offset (file order).
    tensors: Vec<ShardTensor>,
    /// The free-form `__metadata__` map (`{"format": "pt"}` from transformers).
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("bytes", &self.mmap.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Shard {
    /// Maps `path` and parses its header. Every error names the file.
    pub fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).with_context(|| format!("cannot open safetensors file {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot stat safetensors file {}", path.display()))?.len();
        if len < LEN_PREFIX as u64 {
            bail!(
                "{}: file is {len} bytes, too short for a safetensors file (the 8-byte header length is missing; truncated header)",
                path.display()
            );
        }
        // SAFETY: the mapping is read-only and private to this process. As
        // with every mmap-based loader (candle, safetensors' own examples),
        // another process truncating or rewriting the file while we hold the
        // map would be undefined behaviour; checkpoints are treated as
        // immutable inputs for the duration of a compile.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        Self::from_mmap(path.to_path_buf(), mmap)
    }

    fn from_mmap(path: PathBuf, mmap: Mmap) -> Result<Shard> {
        let (tensors, metadata) = parse_header(&path, &mmap)?;
        Ok(Shard { path, mmap, tensors, metadata })
    }
}

/// Parses and validates the header of a safetensors file whose bytes are
/// `bytes` (`path` only names it in errors): the tensors in file order, with
/// absolute byte ranges that lie inside `bytes`, and the `__metadata__` map.
/// The untrusted-input entry point (fuzzed by `fuzz/`).
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<(Vec<ShardTensor>, HashMap<String, String>)> {
    let Some(prefix) = bytes.first_chunk::<LEN_PREFIX>() else {
        bail!(
                "{}: file is {} bytes, too short for a safetensors file (the 8-byte header length is missing; truncated header)",
                path.display(),
                bytes.len()
            );
    };
    let header_len = u64::from_le_bytes(*prefix);
    let available = (bytes.len() - LEN_PREFIX) as u64;
    // Checked before the crate does so the message can give both sizes.
    if header_len > available {
        bail!(
                "{}: header length {header_len} is larger than the file ({} bytes): truncated header or not a safetensors file",
                path.display(),
                bytes.len()
            );
    }
    let (n, meta) = match SafeTensors::read_metadata(bytes) {
        Ok(x) => x,
        Err(e) => bail!("{}: {}", path.display(), explain(bytes, header_len as usize, &e)),
    };
    let data_start = LEN_PREFIX + n;
    let infos = meta.tensors();
    let mut tensors = Vec::with_capacity(infos.len());
    for name in meta.offset_keys() {
        // offset_keys() and tensors() come from the same map.
        let Some(info) = infos.get(&name) else { continue };
        let (b, e) = info.data_offsets;
        tensors.push(ShardTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: data_start + b,
            end: data_start + e,
            name,
        });
    }
    let metadata = meta.metadata().clone().unwrap_or_default();
    Ok((tensors, metadata))
}

impl Shard {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &[ShardTensor] {
        &self.tensors
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }

    /// The bytes of `t` (which must come from this shard), borrowed from the map.
    pub fn bytes(&self, t: &ShardTensor) -> Result<&[u8]> {
        self.mmap.get(t.start..t.end).with_context(|| {
            format!(
                "{}: tensor `{}` bytes {}..{} lie outside the file ({} bytes)",
                self.path.display(),
                t.name,
                t.start,
                t.end,
                self.mmap.len()
            )
        })
    }
}

/// Turns a safetensors parse error into a message naming the broken tensor
/// when one can be identified.
fn explain(bytes: &[u8], header_len: usize, err: &SafeTensorError) -> String {
    let data_len = bytes.len() - LEN_PREFIX - header_len;
    if let Some(msg) = find_bad_tensor(&bytes[LEN_PREFIX..LEN_PREFIX + header_len], data_len) {
        return msg;
    }
    match err {
        SafeTensorError::InvalidHeader(e) => format!("safetensors header is not valid UTF-8 ({e})"),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format!("safetensors header is not valid JSON or has malformed tensor entries ({e})")
        }
        SafeTensorError::HeaderTooLarge => {
            format!("safetensors header length {header_len} exceeds the format's 100 MB limit")
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "tensor data does not match the file size: the file holds {data_len} bytes after the header, which the header's tensor offsets do not cover exactly (truncated or padded file)"
        ),
        other => format!("invalid safetensors file: {other}"),
    }
}

/// Re-reads the header JSON to find the first tensor whose offsets are out of
/// range or disagree with its dtype and shape. None when the header is not
/// readable enough to tell.
fn find_bad_tensor(header: &[u8], data_len: usize) -> Option<String> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(header) else {
        return None;
    };
    let mut entries: Vec<(&String, &Value)> = map.iter().filter(|(k, _)| *k != "__metadata__").collect();
    entries.sort_by_key(|(k, _)| k.as_str());
    for (name, v) in entries {
        let offsets = v.get("data_offsets").and_then(Value::as_array);
        let (Some(b), Some(e)) = (
            offsets.and_then(|o| o.first()).and_then(Value::as_u64),
            offsets.and_then(|o| o.get(1)).and_then(Value::as_u64),
        ) else {
            return Some(format!("tensor `{name}` has missing or malformed data_offsets"));
        };
        if e < b {
            return Some(format!("tensor `{name}` has data offsets [{b}, {e}) that end before they start"));
        }
        if e > data_len as u64 {
            return Some(format!(
                "tensor `{name}` data offsets [{b}, {e}) are out of range: the file holds only {data_len} bytes of tensor data (truncated file?)"
            ));
        }
        let dtype: Option<Dtype> = v.get("dtype").and_then(|d| serde_json::from_value(d.clone()).ok());
        let shape: Option<Vec<u64>> = v.get("shape").and_then(|s| serde_json::from_value(s.clone()).ok());
        if let (Some(dtype), Some(shape)) = (dtype, shape) {
            let bits = shape.iter().try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d));
            if bits.map(|b| b.div_ceil(8)) != Some(e - b) {
                return Some(format!(
                    "tensor `{name}` data offsets [{b}, {e}) span {} bytes, but dtype {} with shape {shape:?} needs {}",
                    e - b,
                    dtype_name(dtype),
                    bits.map_or("more than 2^64 bits".to_string(), |b| format!("{} bytes", b.div_ceil(8)))
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A valid file with two f32 tensors: a [2] and b [3].
    fn valid() -> Vec<u8> {
        let header = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[3],"data_offsets":[8,20]}}"#;
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header);
        v.extend([0u8; 20]);
        v
    }

    #[test]
    fn opens_valid_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = Shard::open(&write(dir.path(), "x.safetensors", &valid())).unwrap();
        let names: Vec<_> = s.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(s.tensors()[1].byte_len(), 12);
        assert_eq!(s.metadata().get("format").map(String::as_str), Some("pt"));
        assert_eq!(s.bytes(&s.tensors()[0]).unwrap().len(), 8);
    }

    #[test]
    fn errors_name_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty.safetensors", vec![], "too short"),
            ("short.safetensors", vec![1, 2, 3], "too short"),
            (
                "huge.safetensors",
                {
                    let mut v = valid();
                    v[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                    v
                },
                "larger than the file",
            ),
            ("trunc.safetensors", valid()[..40].to_vec(), "larger than the file"),
            (
                "data.safetensors",
                valid()[..valid().len() - 4].to_vec(),
                "tensor `b` data offsets [8, 20) are out of range",
            ),
            (
                "json.safetensors",
                {
                    let mut v = valid();
                    v[8] = b'[';
                    v
                },
                "not valid JSON",
            ),
        ];
        for (name, bytes, want) in cases {
            let p = write(dir.path(), name, &bytes);
            let msg = format!("{:#}", Shard::open(&p).unwrap_err());
            assert!(msg.contains(name), "{msg}");
            assert!(msg.contains(want), "{name}: {msg}");
        }
    }

    #[test]
    fn size_mismatch_names_tensor() {
        let header = br#"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#;
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header);
        v.extend([0u8; 8]);
        let dir = tempfile::tempdir().unwrap();
        let msg = format!("{:#}", Shard::open(&write(dir.path(), "m.safetensors", &v)).unwrap_err());
        assert!(msg.contains("tensor `a`") && msg.contains("needs 6 bytes"), "{msg}");
    }

    #[test]
    fn missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let msg = format!("{:#}", Shard::open(&dir.path().join("nope.safetensors")).unwrap_err());
        assert!(msg.contains("nope.safetensors"), "{msg}");
    }
}
