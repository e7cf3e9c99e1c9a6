//! How much memory a run may use, checked before anything big is allocated:
//! a KV cache or a request that cannot fit is a clear error up front, not an
//! OOM kill halfway through generation.
//!
//! The budget is the smallest of: `MemAvailable` from /proc/meminfo, the
//! room left under this process's cgroup memory limit (v2 `memory.max`
//! minus `memory.current`, or v1 `memory.limit_in_bytes` minus
//! `memory.usage_in_bytes`), and `PANGUC_MEMORY_LIMIT` (bytes) when set, for
//! a user who wants to keep a run inside a smaller share of the machine.

use anyhow::{bail, Result};
use std::path::Path;

/// The environment variable that caps the budget (bytes).
pub const MEMORY_LIMIT_ENV: &str = "PANGUC_MEMORY_LIMIT";

/// Bytes a run may allocate and where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    pub bytes: u64,
    pub source: String,
}

/// The current budget; `None` when nothing can be read (not Linux, no
/// /proc), in which case nothing is refused.
pub fn memory_budget() -> Result<Option<MemoryBudget>> {
    let mut best: Option<MemoryBudget> = None;
    let mut offer = |bytes: u64, source: String| {
        if best.as_ref().is_none_or(|b| bytes < b.bytes) {
            best = Some(MemoryBudget { bytes, source });
        }
    };
    if let Some(b) = std::fs::read_to_string("/proc/meminfo").ok().as_deref().and_then(mem_available) {
        offer(b, "MemAvailable in /proc/meminfo".into());
    }
    if let Some((b, source)) = cgroup_room(Path::new("/sys/fs/cgroup"), "/proc/self/cgroup") {
        offer(b, source);
    }
    if let Ok(v) = std::env::var(MEMORY_LIMIT_ENV) {
        let Ok(b) = v.trim().parse::<u64>() else {
            bail!("{MEMORY_LIMIT_ENV}={v:?} is not a number of bytes");
        };
        offer(b, format!("{MEMORY_LIMIT_ENV}={b}"));
    }
    Ok(best)
}

/// Refuses `what` (a description of the allocation) when `bytes` (None:
/// the size overflowed 64 bits) exceeds the budget.
pub fn check_fits(what: &str, bytes: Option<u64>) -> Result<()> {
    let Some(bytes) = bytes else {
        bail!("{what} needs more than 2^64 bytes");
    };
    if let Some(budget) = memory_budget()? {
        if bytes > budget.bytes {
            bail!(
                "{what} needs {bytes} bytes ({:.2} GB), but only {} bytes ({:.2} GB) are available ({}); \
                 ask for fewer tokens or free memory",
                bytes as f64 / 1e9,
                budget.bytes,
                budget.bytes as f64 / 1e9,
                budget.source
            );
        }
    }
    Ok(())
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Room under the cgroup memory limit of this process, if it has one.
/// `root` is the cgroup filesystem mount, `self_cgroup` the process's
/// /proc/self/cgroup (parameters so tests can use fixtures).
pub fn cgroup_room(root: &Path, self_cgroup: &str) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(self_cgroup).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2: "0::/path".
            let dir = root.join(rel);
            let max = read_u64(&dir.join("memory.max"))?;
            let current = read_u64(&dir.join("memory.current")).unwrap_or(0);
            return Some((max.saturating_sub(current), format!("cgroup limit {}", dir.join("memory.max").display())));
        }
        if controllers.split(',').any(|c| c == "memory") {
            let dir = root.join("memory").join(rel);
            let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
            // v1 reports "no limit" as a huge page-rounded number.
            if limit >= 1 << 60 {
                return None;
            }
            let usage = read_u64(&dir.join("memory.usage_in_bytes")).unwrap_or(0);
            return Some((
                limit.saturating_sub(usage),
                format!("cgroup limit {}", dir.join("memory.limit_in_bytes").display()),
            ));
        }
    }
    None
}

/// A number file; None for "max" (no limit) or anything unreadable.
fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_available() {
        let text = "MemTotal:       16315812 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(mem_available(text), Some(8_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn reads_cgroup_v2_and_v1_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let proc = root.join("self_cgroup");
        // v2 with a limit.
        std::fs::create_dir_all(root.join("job")).unwrap();
        std::fs::write(root.join("job/memory.max"), "1000000\n").unwrap();
        std::fs::write(root.join("job/memory.current"), "250000\n").unwrap();
        std::fs::write(&proc, "0::/job\n").unwrap();
        assert_eq!(cgroup_room(root, proc.to_str().unwrap()).map(|r| r.0), Some(750_000));
        // v2 without one.
        std::fs::write(root.join("job/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_room(root, proc.to_str().unwrap()), None);
        // v1.
        std::fs::create_dir_all(root.join("memory/j")).unwrap();
        std::fs::write(root.join("memory/j/memory.limit_in_bytes"), "4096\n").unwrap();
        std::fs::write(root.join("memory/j/memory.usage_in_bytes"), "1024\n").unwrap();
        std::fs::write(&proc, "4:cpu,cpuacct:/j\n3:memory:/j\n").unwrap();
        assert_eq!(cgroup_room(root, proc.to_str().unwrap()).map(|r| r.0), Some(3072));
    }

    #[test]
    fn check_fits_refuses_overflow_and_names_the_budget() {
        let e = format!("{:#}", check_fits("the KV cache", None).unwrap_err());
        assert!(e.contains("the KV cache needs more than 2^64 bytes"), "{e}");
        let e = format!("{:#}", check_fits("the KV cache", Some(u64::MAX)).unwrap_err());
        assert!(e.contains("the KV cache needs") && e.contains("available ("), "{e}");
        check_fits("one byte", Some(1)).unwrap();
    }
}
