//! Crash-safe package output: a package is written into a staging
//! directory beside OUT and installed by one rename, and the leftovers of a
//! killed compile are removed by the next compile into the same place.
//!
//! Ownership: each staging directory `.panguc-staging-<id>` has a lock file
//! `.panguc-staging-<id>.lock` beside it (outside the package, so it is
//! never hashed into the manifest). The owning compile holds an exclusive
//! `flock` on it for its whole life; the kernel drops the lock when the
//! process dies, however it dies (SIGKILL included), so "lock not held"
//! means "owner dead" without trusting pids, which the system reuses. The
//! lock file is created under a name the leftover scan ignores, locked, and
//! only then renamed to its final name, so a scan never sees an unlocked
//! lock file of a live compile.
//!
//! Installing over an existing OUT (`--force`) swaps the two directories
//! with one `renameat2(RENAME_EXCHANGE)`: at every instant OUT is either the
//! old complete package or the new one. Where the filesystem cannot
//! exchange, OUT is first renamed aside to `.panguc-staging-<id>.old` (its
//! name recorded in the lock file); if the compile dies between that rename
//! and the next, the following compile renames the old package back.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Prefix of every entry a compile creates beside OUT.
pub const STAGING_PREFIX: &str = ".panguc-staging-";
const LOCK_SUFFIX: &str = ".lock";
const OLD_SUFFIX: &str = ".old";
/// A lock file before it is locked: not matched by the leftover scan.
const UNLOCKED_PREFIX: &str = ".panguc-lock-new-";

/// A staging directory owned by this process until [`Staging::install`] or drop.
pub struct Staging {
    dir: PathBuf,
    lock_path: PathBuf,
    /// Holds the flock; closing it (drop, or process death) releases it.
    _lock: File,
    installed: bool,
}

impl Staging {
    /// Removes dead compiles' leftovers in `out`'s parent, then creates a
    /// locked staging directory there.
    pub fn create(out: &Path) -> Result<Staging> {
        let parent = parent_of(out);
        std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        remove_dead_leftovers(&parent)?;
        let id = unique_id();
        let fresh = parent.join(format!("{UNLOCKED_PREFIX}{id}"));
        let lock = File::options()
            .write(true)
            .create_new(true)
            .open(&fresh)
            .with_context(|| format!("creating the staging lock file {}", fresh.display()))?;
        try_lock(&lock)
            .with_context(|| format!("locking {}", fresh.display()))?
            .then_some(())
            .with_context(|| format!("{} is locked by another process", fresh.display()))?;
        // Which OUT this compile installs into, for the rename-aside recovery.
        std::fs::write(&fresh, out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            .with_context(|| format!("writing {}", fresh.display()))?;
        let lock_path = parent.join(format!("{STAGING_PREFIX}{id}{LOCK_SUFFIX}"));
        std::fs::rename(&fresh, &lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
        let dir = parent.join(format!("{STAGING_PREFIX}{id}"));
        std::fs::create_dir(&dir).with_context(|| format!("creating the staging directory {}", dir.display()))?;
        Ok(Staging { dir, lock_path, _lock: lock, installed: false })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the staged package to `out` atomically, replacing an existing
    /// `out` (the caller has checked it may).
    pub fn install(mut self, out: &Path) -> Result<()> {
        if !out.exists() || is_empty_dir(out) {
            // rename(2) replaces an empty directory atomically.
            std::fs::rename(&self.dir, out)
                .with_context(|| format!("moving the package into place at {}", out.display()))?;
        } else if exchange(&self.dir, out)? {
            // The staging path now holds the old package.
            remove_tree(&self.dir)?;
        } else {
            let old = self.dir.with_file_name(format!("{}{OLD_SUFFIX}", file_name(&self.dir)));
            std::fs::rename(out, &old).with_context(|| format!("moving the old {} aside", out.display()))?;
            std::fs::rename(&self.dir, out)
                .with_context(|| format!("moving the package into place at {}", out.display()))?;
            remove_tree(&old)?;
        }
        self.installed = true;
        Ok(())
    }
}

impl Drop for Staging {
    /// A failed compile removes its staging directory (a killed one cannot:
    /// the next compile does). The lock file goes last, so the directory is
    /// never unowned while it exists.
    fn drop(&mut self) {
        if !self.installed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Removes, in `parent`, every staging directory (and aside-renamed old
/// package) whose owning compile is dead, restoring an old package whose
/// OUT went missing. Returns what was removed. Live compiles' entries are
/// left alone.
pub fn remove_dead_leftovers(parent: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = vec![];
    let entries = std::fs::read_dir(parent).with_context(|| format!("listing {}", parent.display()))?;
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix(STAGING_PREFIX)).map(str::to_string))
        .map(|rest| rest.split('.').next().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    for id in ids {
        let base = parent.join(format!("{STAGING_PREFIX}{id}"));
        let lock_path = parent.join(format!("{STAGING_PREFIX}{id}{LOCK_SUFFIX}"));
        let old = parent.join(format!("{STAGING_PREFIX}{id}{OLD_SUFFIX}"));
        // Keep the lock open (held) while cleaning, so no one else acts on
        // the same leftovers concurrently.
        let lock = match File::options().read(true).write(true).open(&lock_path) {
            Ok(f) => {
                if !try_lock(&f).with_context(|| format!("locking {}", lock_path.display()))? {
                    continue; // a live compile owns it
                }
                Some(f)
            }
            // No lock file: the compile died before creating one was
            // possible only for an older panguc; nothing owns these entries.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("opening {}", lock_path.display())),
        };
        if old.exists() {
            let out_name = std::fs::read_to_string(&lock_path).unwrap_or_default();
            let out = parent.join(out_name.trim());
            if !out_name.trim().is_empty() && !out.exists() {
                // Killed between moving OUT aside and installing the new one.
                std::fs::rename(&old, &out).with_context(|| format!("restoring {}", out.display()))?;
            } else {
                remove_tree(&old)?;
                removed.push(old);
            }
        }
        if base.exists() {
            remove_tree(&base)?;
            removed.push(base);
        }
        if lock.is_some() {
            std::fs::remove_file(&lock_path).with_context(|| format!("removing {}", lock_path.display()))?;
        }
    }
    // Lock files that never got their final name belong to compiles killed
    // in `create`; they lock nothing.
    for e in std::fs::read_dir(parent).with_context(|| format!("listing {}", parent.display()))?.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with(UNLOCKED_PREFIX)) {
            if let Ok(f) = File::open(e.path()) {
                if try_lock(&f).unwrap_or(false) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(removed)
}

fn parent_of(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn is_empty_dir(p: &Path) -> bool {
    p.is_dir() && std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

fn remove_tree(p: &Path) -> Result<()> {
    std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))
}

/// Pid, time and a counter: unique among live compiles in one directory
/// (`create_new` and `create_dir` would fail rather than share).
fn unique_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{:x}-{}", std::process::id(), nanos, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Exclusive non-blocking flock: Ok(true) when acquired, Ok(false) when
/// another open file description holds it.
fn try_lock(f: &File) -> Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    bail!("flock failed: {err}")
}

/// Atomically swaps two directories. Ok(false) when the filesystem or
/// kernel cannot (the caller falls back to rename-aside).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated paths; renameat2 through syscall(2) so
    // it works with every libc.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(err).with_context(|| format!("exchanging {} and {}", a.display(), b.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn live_staging_is_kept_and_dead_leftovers_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        let live = Staging::create(&out).unwrap();
        std::fs::write(live.path().join("f"), b"x").unwrap();
        // A dead compile's leftovers: an unlocked lock file and its directory,
        // and a lock-less directory from an older panguc.
        std::fs::write(tmp.path().join(".panguc-staging-dead.lock"), b"pkg").unwrap();
        std::fs::create_dir_all(tmp.path().join(".panguc-staging-dead/weights")).unwrap();
        std::fs::create_dir(tmp.path().join(".panguc-staging-legacy")).unwrap();
        let removed = remove_dead_leftovers(tmp.path()).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(live.path().join("f").exists(), "the live staging directory must survive");
        live.install(&out).unwrap();
        assert_eq!(names(tmp.path()), ["pkg"]);
    }

    #[test]
    fn install_replaces_existing_output_and_failure_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pkg");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("old"), b"old").unwrap();
        let s = Staging::create(&out).unwrap();
        std::fs::write(s.path().join("new"), b"new").unwrap();
        s.install(&out).unwrap();
        assert_eq!(names(&out), ["new"]);
        assert_eq!(names(tmp.path()), ["pkg"]);
        // Dropped without install (a failed compile): nothing left beside OUT.
        let s = Staging::create(&out).unwrap();
        std::fs::write(s.path().join("partial"), b"p").unwrap();
        drop(s);
        assert_eq!(names(tmp.path()), ["pkg"]);
    }

    #[test]
    fn old_package_moved_aside_is_restored_when_out_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(".panguc-staging-k.lock"), b"pkg").unwrap();
        std::fs::create_dir(tmp.path().join(".panguc-staging-k.old")).unwrap();
        std::fs::write(tmp.path().join(".panguc-staging-k.old/manifest.json"), b"{}").unwrap();
        std::fs::create_dir(tmp.path().join(".panguc-staging-k")).unwrap();
        remove_dead_leftovers(tmp.path()).unwrap();
        assert_eq!(names(tmp.path()), ["pkg"]);
        assert!(tmp.path().join("pkg/manifest.json").exists());
    }
}
