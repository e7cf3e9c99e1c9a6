//! A kernel program read from a package is untrusted input: `validate`
//! must turn every out-of-range reference into an error, never a panic.
//! Regression tests for what `fuzz/` found (`kernel_program` target: a
//! weight buffer whose index was past the weight table panicked in
//! `validate`).

use panguc_ir::kernel::KernelProgram;
use serde_json::Value;

/// The tiny model's scheduled program, as written into its package (also
/// the fuzz target's seed).
fn tiny() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/kernel_program/tiny.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn validate(v: &Value) -> Result<(), String> {
    serde_json::from_value::<KernelProgram>(v.clone()).unwrap().validate()
}

#[test]
fn the_real_program_validates() {
    validate(&tiny()).unwrap();
}

/// A damage: what it is, the edit, and what the error must say.
type Case = (&'static str, Box<dyn Fn(&mut Value)>, &'static str);

#[test]
fn out_of_range_references_are_errors() {
    let cases: Vec<Case> = vec![
        ("weight table emptied", Box::new(|p| p["weights"] = serde_json::json!([])), "no weight "),
        (
            "weight index past the table",
            Box::new(|p| p["buffers"][3]["kind"] = serde_json::json!({"Weight": {"index": 1000}})),
            "no weight 1000",
        ),
        (
            "KV cache index",
            Box::new(|p| p["buffers"][2]["kind"] = serde_json::json!({"KvCache": {"cache": 99}})),
            "no KV cache 99",
        ),
        (
            "arena slot",
            Box::new(|p| p["buffers"][5]["kind"] = serde_json::json!({"Activation": {"slot": 10}})),
            "no arena slot 10",
        ),
        (
            "entry input",
            Box::new(|p| p["buffers"][0]["kind"] = serde_json::json!({"Input": {"index": 7}})),
            "no entry input 7",
        ),
        (
            "cache list",
            Box::new(|p| p["caches"][0] = serde_json::json!(100000)),
            "KV cache buffer 100000 does not exist",
        ),
        (
            "output list",
            Box::new(|p| p["outputs"][0] = serde_json::json!(100000)),
            "output buffer 100000 does not exist",
        ),
    ];
    for (what, edit, want) in cases {
        let mut p = tiny();
        edit(&mut p);
        let err = validate(&p).expect_err(what);
        assert!(err.contains(want), "{what}: {err}");
    }
}
