//! The verification stamp: hash every weight byte once, not on every open.
//!
//! A full verification reads every file the manifest lists and checks its
//! size and sha256. For a 144 GB model that takes minutes, so after a
//! successful check the runtime records a stamp, `verified.json` in the
//! package directory, binding each verified file to what the file system
//! says about it: size, inode (and device), modification time and status
//! change time, in nanoseconds. The stamp also records the sha256 of the
//! manifest it was made against.
//!
//! On open ([`Verify::Stamp`]):
//! - the manifest is re-read and its hash must equal the stamp's (a new
//!   manifest invalidates the whole stamp);
//! - small files (everything but weight data, `*.bin`: the kernel library,
//!   the kernel program, IR dumps, ...) are always hashed;
//! - a weight file whose size, inode, mtime and ctime all equal the
//!   stamp's is trusted; any other file is hashed again, refused if it no
//!   longer matches the manifest, and re-stamped if it does.
//!
//! Writing a file always moves its ctime to "now", and ctime cannot be set
//! back by `utimes`, so an in-place edit, a replacement (new inode) or a
//! restored mtime are all noticed. File times are coarse (a kernel tick),
//! so a file changed within one tick of its verification could keep its
//! times: as in git's "racily clean" rule, a file whose mtime or ctime is
//! within [`RACY_MARGIN`] of the stamp's creation is not stamped (it is
//! hashed again next time). [`Verify::Full`] ignores the stamp.
//!
//! The stamp is local state, like a cache: it is not in the manifest's
//! file list, copying the package invalidates it (new inodes), and failing
//! to write it (read-only package) only costs the next open a full check.

use crate::package::{sha256_file, FileEntry, Manifest, MANIFEST_FILE};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// File name of the stamp inside the package directory.
pub const STAMP_FILE: &str = "verified.json";

/// Files this close to the stamp's creation time are not stamped.
pub const RACY_MARGIN: Duration = Duration::from_millis(100);

/// How much of a package to re-read on open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Hash small files; trust weight files the stamp vouches for.
    #[default]
    Stamp,
    /// Hash every file (`--verify full`, `panguc verify`).
    Full,
}

impl std::str::FromStr for Verify {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Verify> {
        match s {
            "stamp" => Ok(Verify::Stamp),
            "full" => Ok(Verify::Full),
            other => bail!("unknown --verify `{other}` (available: stamp, full)"),
        }
    }
}

/// What the file system says about a file, to tell whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub bytes: u64,
    pub dev: u64,
    pub inode: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    #[cfg(unix)]
    fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        FileIdentity {
            bytes: meta.len(),
            dev: meta.dev(),
            inode: meta.ino(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Without inodes and ctimes nothing can be trusted: every file is
    /// hashed (the stamp never matches).
    #[cfg(not(unix))]
    fn of(meta: &std::fs::Metadata) -> FileIdentity {
        FileIdentity { bytes: meta.len(), dev: 0, inode: 0, mtime_ns: -1, ctime_ns: -1 }
    }

    fn is_racy(&self, stamped_at_ns: i128) -> bool {
        let margin = RACY_MARGIN.as_nanos() as i128;
        self.mtime_ns < 0 || self.mtime_ns + margin >= stamped_at_ns || self.ctime_ns + margin >= stamped_at_ns
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stamp {
    /// sha256 of the manifest the files were verified against.
    manifest_sha256: String,
    /// Relative path -> identity of the file when it matched the manifest.
    files: BTreeMap<String, FileIdentity>,
}

/// What a verification did (for `panguc verify` and the benchmark).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub files: usize,
    /// Files whose contents were hashed.
    pub hashed_files: usize,
    pub hashed_bytes: u64,
    /// Files trusted from the stamp.
    pub trusted_files: usize,
    pub trusted_bytes: u64,
    pub stamp_written: bool,
}

/// Weight data is the bulk of a package; only it is trusted from the stamp.
fn stamp_may_vouch(rel: &str) -> bool {
    rel.ends_with(".bin")
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

fn read_stamp(dir: &Path, manifest_sha: &str) -> Option<Stamp> {
    let text = std::fs::read_to_string(dir.join(STAMP_FILE)).ok()?;
    let stamp: Stamp = serde_json::from_str(&text).ok()?;
    (stamp.manifest_sha256 == manifest_sha).then_some(stamp)
}

/// Write the stamp atomically (temporary file, then rename), so concurrent
/// opens never read half a stamp. Errors are returned for the caller to
/// ignore or report.
fn write_stamp(dir: &Path, stamp: &Stamp) -> Result<()> {
    let tmp = dir.join(format!(".{STAMP_FILE}.{}.{:?}.tmp", std::process::id(), std::thread::current().id()));
    std::fs::write(&tmp, serde_json::to_string(stamp)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(STAMP_FILE)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}

/// Check every file `manifest` lists (present, recorded size, recorded
/// sha256), trusting the stamp for unchanged weight files under
/// [`Verify::Stamp`], and record a new stamp when anything was hashed.
pub fn verify_files_with(dir: &Path, manifest: &Manifest, mode: Verify) -> Result<VerifyReport> {
    let manifest_sha = sha256_file(&dir.join(MANIFEST_FILE))?;
    let old = match mode {
        Verify::Stamp => read_stamp(dir, &manifest_sha),
        Verify::Full => None,
    };
    let started = now_ns();
    let mut report = VerifyReport::default();
    let mut stamp = Stamp { manifest_sha256: manifest_sha, files: BTreeMap::new() };
    for (rel, entry) in &manifest.files {
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("package manifest lists an invalid path `{rel}`");
        }
        let path = dir.join(rel);
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("package {} is incomplete: {rel} is missing", dir.display()))?;
        check_size(dir, rel, entry, meta.len())?;
        let identity = FileIdentity::of(&meta);
        let vouched = stamp_may_vouch(rel) && old.as_ref().and_then(|s| s.files.get(rel)) == Some(&identity);
        if vouched {
            report.trusted_files += 1;
            report.trusted_bytes += entry.bytes;
        } else {
            if sha256_file(&path)? != entry.sha256 {
                bail!(
                    "package {} is corrupt: {rel} does not match its sha256 in the manifest (the file was modified)",
                    dir.display()
                );
            }
            report.hashed_files += 1;
            report.hashed_bytes += entry.bytes;
        }
        // Stat again after hashing: a file changed while it was read must
        // not be stamped with its new identity.
        let after = std::fs::metadata(&path).map(|m| FileIdentity::of(&m)).ok();
        if stamp_may_vouch(rel) && after == Some(identity) && !identity.is_racy(started) {
            stamp.files.insert(rel.clone(), identity);
        }
        report.files += 1;
    }
    let unchanged = old.as_ref().map_or(stamp.files.is_empty(), |s| s.files == stamp.files);
    let changed = !unchanged;
    if changed {
        match write_stamp(dir, &stamp) {
            Ok(()) => report.stamp_written = true,
            Err(e) => tracing::debug!("not recording a verification stamp in {}: {e:#}", dir.display()),
        }
    }
    Ok(report)
}

/// `panguc verify` and the end of `panguc compile`: verify the package at
/// `dir` (and, when partitioned, each rank's own CPU package) with `mode`, and
/// record the stamps. The reports are summed.
pub fn verify_package_tree(dir: &Path, mode: Verify) -> Result<VerifyReport> {
    let manifest = crate::package::read_manifest(dir)?;
    let mut total = verify_files_with(dir, &manifest, mode)?;
    for rel in manifest.ranks.iter().flat_map(|r| &r.dirs) {
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("package manifest lists an invalid rank directory `{rel}`");
        }
        let rank_dir = dir.join(rel);
        // Ascend-only ranks are project directories without a manifest of
        // their own (the top-level manifest covers their files).
        if !crate::package::is_package(&rank_dir) {
            continue;
        }
        let rank = crate::package::read_manifest(&rank_dir)?;
        let r = verify_files_with(&rank_dir, &rank, mode).with_context(|| format!("rank package {rel}"))?;
        total.files += r.files;
        total.hashed_files += r.hashed_files;
        total.hashed_bytes += r.hashed_bytes;
        total.trusted_files += r.trusted_files;
        total.trusted_bytes += r.trusted_bytes;
        total.stamp_written |= r.stamp_written;
    }
    Ok(total)
}

fn check_size(dir: &Path, rel: &str, entry: &FileEntry, bytes: u64) -> Result<()> {
    if bytes != entry.bytes {
        bail!(
            "package {} is corrupt: {rel} has {bytes} bytes, the manifest says {} (truncated or modified)",
            dir.display(),
            entry.bytes
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::hash_tree;

    /// A two-file "package" whose files are old enough not to be racy.
    fn package() -> (tempfile::TempDir, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("weights")).unwrap();
        std::fs::write(dir.path().join("weights/a.bin"), vec![7u8; 4096]).unwrap();
        std::fs::write(dir.path().join("kernel_program.json"), b"{}").unwrap();
        let manifest = Manifest {
            format_version: crate::PACKAGE_FORMAT_VERSION,
            panguc_version: "test".into(),
            model: panguc_ir::PanguConfig::from_json_str(include_str!("../../examples/tiny-pangu/config.json"), "tiny")
                .unwrap(),
            targets: vec![],
            cpu: None,
            kernels: vec![],
            buffers: vec![],
            weights: None,
            files: hash_tree(dir.path()).unwrap(),
            ranks: None,
        };
        std::fs::write(dir.path().join(MANIFEST_FILE), serde_json::to_string(&manifest).unwrap()).unwrap();
        std::thread::sleep(RACY_MARGIN * 2);
        (dir, manifest)
    }

    #[test]
    fn second_open_trusts_the_stamp_and_an_edit_is_caught() {
        let (dir, m) = package();
        let first = verify_files_with(dir.path(), &m, Verify::Stamp).unwrap();
        assert_eq!((first.hashed_files, first.trusted_files, first.stamp_written), (2, 0, true));
        let second = verify_files_with(dir.path(), &m, Verify::Stamp).unwrap();
        assert_eq!((second.hashed_files, second.trusted_files), (1, 1), "only the small file is hashed");
        assert_eq!(second.trusted_bytes, 4096);
        let full = verify_files_with(dir.path(), &m, Verify::Full).unwrap();
        assert_eq!(full.hashed_files, 2, "--verify full hashes everything");

        // Same size, same bytes but one: the ctime moves, so it is hashed.
        let mut bytes = vec![7u8; 4096];
        bytes[100] = 8;
        std::fs::write(dir.path().join("weights/a.bin"), &bytes).unwrap();
        let e = format!("{:#}", verify_files_with(dir.path(), &m, Verify::Stamp).unwrap_err());
        assert!(e.contains("weights/a.bin") && e.contains("sha256"), "{e}");
    }

    #[test]
    fn a_rewritten_identical_file_is_rehashed_and_restamped() {
        let (dir, m) = package();
        verify_files_with(dir.path(), &m, Verify::Stamp).unwrap();
        std::fs::write(dir.path().join("weights/a.bin"), vec![7u8; 4096]).unwrap();
        std::thread::sleep(RACY_MARGIN * 2);
        let r = verify_files_with(dir.path(), &m, Verify::Stamp).unwrap();
        assert_eq!((r.hashed_files, r.stamp_written), (2, true), "changed identity: hashed again, stamped again");
        let r = verify_files_with(dir.path(), &m, Verify::Stamp).unwrap();
        assert_eq!(r.trusted_files, 1);
    }

    #[test]
    fn a_new_manifest_or_a_recent_file_is_not_trusted() {
        let (dir, m) = package();
        verify_files_with(dir.path(), &m, Verify::Stamp).unwrap();
        let mut text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
        text.push('\n');
        std::fs::write(dir.path().join(MANIFEST_FILE), text).unwrap();
        let r = verify_files_with(dir.path(), &m, Verify::Stamp).unwrap();
        assert_eq!(r.trusted_files, 0, "the stamp belongs to another manifest");

        // A file written just now is racy: verified but not stamped.
        std::fs::write(dir.path().join("weights/a.bin"), vec![7u8; 4096]).unwrap();
        verify_files_with(dir.path(), &m, Verify::Stamp).unwrap();
        let r = verify_files_with(dir.path(), &m, Verify::Stamp).unwrap();
        assert_eq!(r.trusted_files, 0);
    }
}
