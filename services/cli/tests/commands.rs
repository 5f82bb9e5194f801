//! `meridianctl`'s one-shot commands against a real `meridian` region on loopback.

mod common;

use common::{stdout_json, Region};
use meridian_shared::session::SessionToken;
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Output, Stdio};

/// A successful run's output, as JSON.
fn json(output: &Output) -> Value {
    assert!(output.status.success(), "meridianctl failed: {output:?}");
    stdout_json(output)
}

#[test]
fn put_reads_a_value_too_long_for_a_command_line_from_stdin() {
    let region = Region::start("");
    json(&region.ctl(&["bucket", "create", "docs", "--type", "register"]));
    // Over the 128 KiB a single command-line argument may have on Linux.
    let long = "x".repeat(200 * 1024);
    let mut put = Command::new(env!("CARGO_BIN_EXE_meridianctl"))
        .args(["--url", &region.url, "put", "docs", "big", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meridianctl");
    let mut stdin = put.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{long:?}").as_bytes())
        .expect("write the value");
    drop(stdin);
    json(&put.wait_with_output().expect("meridianctl put"));
    let read = json(&region.ctl(&["get", "docs", "big"]));
    assert_eq!(read["values"], serde_json::json!([long]));
}

#[test]
fn list_reads_at_the_consistency_it_is_given() {
    let region = Region::start("");
    json(&region.ctl(&["bucket", "create", "users", "--type", "register"]));
    let put = region.ctl(&["-v", "put", "users", "alice", "1"]);
    json(&put);
    // A session that has seen far more than this region holds: a session listing must refuse
    // it at once, a local one ignores it.
    let stderr = String::from_utf8_lossy(&put.stderr);
    let issued = stderr
        .lines()
        .find_map(|line| line.strip_prefix("< x-meridian-session: "))
        .unwrap_or_else(|| panic!("no session token in {stderr}"));
    let mut ahead = SessionToken::decode(issued).expect("the region's own token");
    for seq in ahead.seen.values_mut() {
        *seq += 1_000_000;
    }
    let ahead = ahead.encode();
    let session = region.ctl(&[
        "--session",
        &ahead,
        "list",
        "users",
        "--consistency",
        "session",
    ]);
    assert_eq!(session.status.code(), Some(1), "{session:?}");
    let said = String::from_utf8_lossy(&session.stderr);
    assert!(said.contains("session_ahead_of_region"), "{said}");
    let local = json(&region.ctl(&[
        "--session",
        &ahead,
        "list",
        "users",
        "--consistency",
        "local",
    ]));
    assert_eq!(local["keys"], serde_json::json!(["alice"]));
    // Not a listing's level: refused by the CLI itself, before any request.
    let refused = region.ctl(&["list", "users", "--consistency", "home"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
}
