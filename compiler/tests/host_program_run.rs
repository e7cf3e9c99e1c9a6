//! The generated ACL host programs (one device, and every rank of a
//! partitioned package), built with g++ against a recording stand-in for
//! ACL and HCCL (`fixtures/fake_acl_hccl.cpp`; the aclnn operators are
//! generated from the project's stub headers and only check that every
//! tensor they get exists), and run as one process per rank, like on an
//! 8-card server.
//!
//! What this shows without CANN: a host program loads exactly the weight
//! files its tables expect (and refuses one of the wrong size); the ranks
//! of a partitioned package find each other through the root-info files
//! (each communicator's first member publishes, the others read it); and
//! each rank issues the partition's collectives in program order, every
//! layer, every forward call, with the element counts HCCL expects for the
//! actual token count, in the device dtype. (The kernels do nothing here,
//! so the tokens printed are meaningless; their numerics are covered by
//! the `ascend-sim` engine.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn panguc(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_panguc")).args(args).output().expect("panguc runs");
    assert!(o.status.success(), "panguc {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Definitions for the two entry points of every operator header in
/// `host/stub/aclnn_*.h`: the workspace query fails on a missing tensor and
/// asks for a larger workspace every time; the launch queues it.
fn fake_ops(stub: &Path) -> String {
    let mut out = String::from(
        "#include <cstdint>\n#include \"aclnn/acl_meta.h\"\n\nextern \"C\" {\nvoid FakeAclQueueLaunch(void* workspace);\nuint64_t FakeAclWorkspaceSize();\n",
    );
    let mut headers: Vec<PathBuf> = std::fs::read_dir(stub)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("aclnn_"))
        .collect();
    headers.sort();
    assert!(!headers.is_empty(), "no operator headers in {}", stub.display());
    for h in headers {
        for decl in std::fs::read_to_string(&h).unwrap().lines().filter(|l| l.starts_with("aclnnStatus aclnn")) {
            let sig = decl.trim_end_matches(';');
            let params = sig.split_once('(').unwrap().1.trim_end_matches(')');
            let tensors: Vec<&str> = params
                .split(", ")
                .filter(|p| p.starts_with("const aclTensor*"))
                .map(|p| p.rsplit(' ').next().unwrap())
                .collect();
            let body = if sig.contains("GetWorkspaceSize") {
                let missing: Vec<String> = tensors.iter().map(|t| format!("{t} == nullptr")).collect();
                format!(
                    "*workspaceSize = FakeAclWorkspaceSize();\n    *executor = nullptr;\n    return ({}) ? 1 : 0;",
                    missing.join(" || ")
                )
            } else {
                "(void)workspaceSize; (void)executor; (void)stream;\n    FakeAclQueueLaunch(workspace);\n    return 0;"
                    .to_string()
            };
            out += &format!("{sig}\n{{\n    {body}\n}}\n");
        }
    }
    out + "}\n"
}

/// Build a project's host program with the fake runtime into `exe`.
fn build_host(project: &Path, exe: &Path) -> PathBuf {
    let cxx = std::env::var("PANGUC_SIM_CXX").unwrap_or_else(|_| "g++".into());
    let fake = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_acl_hccl.cpp");
    let ops = exe.with_extension("ops.cpp");
    std::fs::write(&ops, fake_ops(&project.join("host/stub"))).unwrap();
    let built = Command::new(&cxx)
        .args(["-std=c++17", "-O0", "-I"])
        .arg(project.join("host/stub"))
        .arg(project.join("host/panguc_host.cpp"))
        .arg(&fake)
        .arg(&ops)
        .arg("-o")
        .arg(exe)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}: {}", project.display(), String::from_utf8_lossy(&built.stderr));
    exe.to_path_buf()
}

/// One device, both targets: the host program loads every weight file (the
/// sizes its tables expect), runs prefill and decode, and prints the tokens.
#[test]
fn single_device_host_programs_load_their_weights_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu");
    let out = dir.path().join("pkg");
    panguc(&["compile", tiny.to_str().unwrap(), "--target", "ascend910b,ascend310p", "-o", out.to_str().unwrap()]);
    for t in ["ascend910b", "ascend310p"] {
        let project = out.join("ascend").join(t);
        // Every operator definition compiles against the registration API
        // and declares its kernel's parameters.
        panguc_codegen_ascendc::op_host_check::check_op_host_compiles(&project).unwrap();
        let exe = build_host(&project, &dir.path().join(format!("host_{t}")));
        let o = Command::new(&exe).arg(project.join("weights")).arg("1,2,3,4").arg("3").output().unwrap();
        assert!(o.status.success(), "{t}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim().split(',').count(), 3, "{t}");
        // A weight file of the wrong size is refused, naming it.
        let w = std::fs::read_dir(project.join("weights")).unwrap().next().unwrap().unwrap().path();
        let mut bytes = std::fs::read(&w).unwrap();
        bytes.pop();
        std::fs::write(&w, bytes).unwrap();
        let o = Command::new(&exe).arg(project.join("weights")).arg("1,2,3,4").arg("3").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(&w.display().to_string()), "{t}: {err}");
    }
}

/// `vendor_name` of a project's CMakePresets.json.
fn vendor_of(project: &Path) -> String {
    let presets: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(project.join("CMakePresets.json")).unwrap()).unwrap();
    presets["configurePresets"][0]["cacheVariables"]["vendor_name"]["value"].as_str().unwrap().to_string()
}

/// Every file of a project's `op_kernel/`, sorted by name.
fn kernel_sources(project: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(project.join("op_kernel"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// Elements of a partition.json type like `f32[tokens,64]` at `tokens`.
fn elements(ty: &str, tokens: u64) -> u64 {
    let dims = ty.split_once('[').unwrap().1.trim_end_matches(']');
    dims.split(',').map(|d| if d == "tokens" { tokens } else { d.parse::<u64>().unwrap() }).product()
}

/// h2p on 2 devices (one communicator) and on 4 (attention pairs and all
/// four: two communicators per rank, joined in the same order everywhere).
#[test]
fn rank_host_programs_meet_through_hccl_and_issue_collectives_in_program_order() {
    run_ranks(2);
    run_ranks(4);
}

fn run_ranks(devices: usize) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pkg");
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu");
    let n = devices.to_string();
    let args = ["compile", tiny.to_str().unwrap(), "--target", "ascend910b", "--devices", &n, "--plan", "h2p", "-o"];
    panguc(&[&args[..], &[out.to_str().unwrap()]].concat());
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("partition.json")).unwrap()).unwrap();

    // Build every rank's program, then start them all at once.
    let comm_dir = dir.path().join("comm");
    std::fs::create_dir(&comm_dir).unwrap();
    let mut children = vec![];
    let mut names: Vec<(String, Vec<(String, String)>)> = vec![];
    for r in 0..devices {
        let project = out.join(format!("ranks/rank{r}/ascend/ascend910b"));
        panguc_codegen_ascendc::op_host_check::check_op_host_compiles(&project).unwrap();
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
        assert!(readme.contains("-lcust_opapi -lhccl"), "rank {r}: the link line needs libhccl");
        names.push((vendor_of(&project), kernel_sources(&project)));
        let exe = build_host(&project, &dir.path().join(format!("host{r}")));
        let log = dir.path().join(format!("rank{r}.log"));
        let child = Command::new(&exe)
            .arg(project.join("weights"))
            .arg("1,2,3,4")
            .arg(&comm_dir)
            .arg("3")
            .env("PANGUC_FAKE_LOG", &log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.push((child, log));
    }
    // Ranks install side by side: a vendor name is shared only by ranks
    // whose kernels are identical (op-type prefix included).
    for a in &names {
        for b in &names {
            assert_eq!(a.0 == b.0, a.1 == b.1, "vendors {} and {}", a.0, b.0);
        }
    }
    let started = Instant::now();
    for (r, (child, log)) in children.into_iter().enumerate() {
        let mut child = child;
        while child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(120), "rank {r} hangs");
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "rank {r}: {}", String::from_utf8_lossy(&o.stderr));
        // Rank 0 prints the 3 tokens; the others print nothing.
        assert_eq!(stdout.trim().split(',').filter(|t| !t.is_empty()).count(), if r == 0 { 3 } else { 0 });

        let got: Vec<String> = std::fs::read_to_string(&log).unwrap().lines().map(String::from).collect();
        let mut want: Vec<String> = vec![];
        let colls = doc["ranks"][r]["collectives"].as_array().unwrap();
        assert!(!colls.is_empty());
        // One communicator per distinct group, in sorted order; its first
        // member publishes the root info.
        let mut groups: Vec<Vec<u64>> = colls
            .iter()
            .map(|c| c["group"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect())
            .collect();
        groups.sort();
        groups.dedup();
        for g in &groups {
            let pos = g.iter().position(|m| *m == r as u64).unwrap();
            if pos == 0 {
                want.push("root".into());
            }
            want.push(format!("init {} {pos}", g.len()));
        }
        for tokens in [4u64, 1, 1] {
            for _layer in 0..2 {
                for c in colls {
                    assert_eq!(c["function"], "decoder_layer");
                    let members = c["group"].as_array().unwrap().len() as u64;
                    let sent = elements(c["send_type"].as_str().unwrap(), tokens);
                    let (kind, count) = match c["hccl"].as_str().unwrap() {
                        "HcclReduceScatter" => ("reduce_scatter", sent / members),
                        "HcclAllGather" => ("all_gather", sent),
                        "HcclAllReduce" => ("all_reduce", sent),
                        other => panic!("unexpected {other}"),
                    };
                    // HCCL_DATA_TYPE_BFP16: 910B runs bf16 activations.
                    want.push(format!("{kind} {count} 11"));
                }
            }
        }
        assert_eq!(got, want, "{devices} devices, rank {r}");
    }
    // The root info went through the communication directory.
    assert!(comm_dir.join("hccl_0-1.rootinfo").is_file());
}
