//! SIGKILL during `panguc compile`: OUT is always absent or a complete
//! package (the previous one or the new one, byte-identical since compiles
//! are reproducible), never partial; a killed compile's leftovers are
//! removed by the next compile into the same place, which succeeds.

use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const TRIALS: usize = 30;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu")
}

fn compile_cmd(out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_panguc"));
    // ir + ascend910b: 140 files (IR, CANN project, device weights, host
    // program) written in a fraction of a second, so 30 kills spread over the
    // whole compile stay cheap; the staging logic is the same for every target.
    c.args(["compile", tiny().to_str().unwrap(), "--target", "ir,ascend910b", "--force", "-o", out.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Relative path -> contents of every file except the timing report.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                // Timings and the verification stamp (inodes, file times)
                // are local state, not package contents.
                if rel != "report.json" && !rel.ends_with("verified.json") {
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".panguc-"))
        .collect()
}

#[test]
fn sigkill_at_random_points_never_leaves_a_partial_package() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pkg");
    let started = Instant::now();
    assert!(compile_cmd(&out).status().unwrap().success());
    let full = started.elapsed();
    let reference = contents(&out);
    // A copy of the complete package outside OUT's parent, to restore OUT
    // before a replacing trial.
    let keep = tempfile::tempdir().unwrap();
    let saved = keep.path().join("pkg");
    copy_dir(&out, &saved);
    assert!(reference.len() > 100, "expected a full package, got {} files", reference.len());

    let seed: u64 = std::env::var("PANGUC_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("crash test seed {seed} (PANGUC_CRASH_SEED), full compile {full:?}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut killed_with_leftovers, mut absent_after_kill, mut replaced) = (0, 0, 0);
    for trial in 0..TRIALS {
        // One trial in three starts without OUT; the others replace a
        // complete one (--force).
        let existed = trial % 3 != 0;
        if !existed && out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        } else if existed && !out.exists() {
            copy_dir(&saved, &out);
        }
        let mut child = compile_cmd(&out).spawn().unwrap();
        // Spread over the whole compile, a little past its end.
        let delay = full.mul_f64(rng.random_range(0.0..1.1));
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        if out.exists() {
            assert!(
                contents(&out) == reference,
                "trial {trial} (seed {seed}, killed after {delay:?}): OUT is not a complete package"
            );
            panguc_runtime::package::verify_package(&out)
                .unwrap_or_else(|e| panic!("trial {trial} (seed {seed}): OUT does not verify: {e:#}"));
            if existed && std::fs::read(out.join("report.json")).ok() != std::fs::read(saved.join("report.json")).ok() {
                replaced += 1; // the new package (its own timings) replaced the old
            }
        } else {
            assert!(!existed, "trial {trial} (seed {seed}, killed after {delay:?}): the previous OUT disappeared");
            absent_after_kill += 1;
        }
        if !leftovers(tmp.path()).is_empty() {
            killed_with_leftovers += 1;
        }
    }
    eprintln!(
        "{TRIALS} kills: {killed_with_leftovers} left staging leftovers, {absent_after_kill} left OUT absent, {replaced} came after the new package replaced the old; total {:?}",
        started.elapsed()
    );
    // The next compile succeeds and removes every dead compile's leftovers.
    assert!(compile_cmd(&out).status().unwrap().success());
    assert_eq!(contents(&out), reference);
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new(), "leftovers survived the next compile");
}
