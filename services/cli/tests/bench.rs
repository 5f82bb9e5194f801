//! `meridianctl bench` against a real `meridian` region on loopback: what the bench writes is
//! what the region stores, and the region's refusals reach the report.
//!
//! The region binary is the one `cargo test --workspace` builds beside `meridianctl`.

mod common;

use common::{stdout_json, Region, TOKEN};
use serde_json::Value;
use std::process::{Command, Output};
use std::time::Duration;

/// Runs `meridianctl bench <args> --warmup 0s --json` against `region` (`args` split at
/// spaces); its exit and report.
fn bench(region: &Region, args: &str) -> (Output, Value) {
    let mut all = vec!["bench"];
    all.extend(args.split_whitespace());
    all.extend_from_slice(&["--warmup", "0s", "--json"]);
    let output = region.ctl(&all);
    let report = stdout_json(&output);
    (output, report)
}

/// Starts a region that requires the client token and runs a bench against it that must
/// succeed without an error; the region and the report.
fn clean_bench(args: &str) -> (Region, Value) {
    let region = Region::start(&format!("[security]\nclient_tokens = [\"{TOKEN}\"]"));
    let (output, report) = bench(&region, args);
    assert!(output.status.success(), "bench failed: {report}");
    assert_eq!(report["errors"], 0, "{report}");
    (region, report)
}

#[test]
fn bench_writes_and_reads_what_the_region_stores() {
    let (region, report) =
        clean_bench("--workload mixed --keys 40 --concurrency 4 --duration 1s --value-size 64");
    assert_eq!(report["preloaded_keys"], 40, "{report}");
    assert!(
        report["ops"].as_u64().is_some_and(|ops| ops > 100),
        "{report}"
    );

    // Every key was preloaded with the bench's value: a 64-byte JSON string.
    let get = region.ctl(&["get", "bench", "k39"]);
    let text = String::from_utf8_lossy(&get.stdout);
    assert!(get.status.success(), "get failed: {text}");
    let expected: String = (0..62).map(|i| char::from(b'a' + i % 26)).collect();
    assert!(text.contains(&expected), "k39 holds {text}");
}

#[test]
fn bench_reports_the_regions_refusals() {
    let region = Region::start(&format!(
        "max_body_bytes = 1024\n[security]\nclient_tokens = [\"{TOKEN}\"]"
    ));
    let (output, report) = bench(
        &region,
        "--workload put --concurrency 2 --duration 500ms --value-size 2048",
    );
    assert!(
        !output.status.success(),
        "a run with no success must fail: {report}"
    );
    assert_eq!(report["ops"], 0, "{report}");
    assert!(
        report["http_errors"]["413"]
            .as_u64()
            .is_some_and(|n| n > 10),
        "{report}"
    );
    let first = report["first_error"].as_str().unwrap_or_default();
    assert!(first.contains("payload_too_large"), "{report}");
}

#[test]
fn a_request_unanswered_within_the_timeout_counts_as_a_timeout() {
    let region = Region::start(&format!("[security]\nclient_tokens = [\"{TOKEN}\"]"));
    // Made beforehand (a durable commit), so the bench's own setup is a quick read well
    // within its 300 ms.
    let made = region.ctl(&["bucket", "create", "bench", "--type", "register"]);
    assert!(made.status.success(), "{made:?}");
    // The region hangs for a second and a half in the middle of the run.
    let pid = region.child.id().to_string();
    let signal = move |which: &str| {
        let sent = Command::new("kill").args([which, &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {which}");
    };
    let hang = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        signal("-STOP");
        std::thread::sleep(Duration::from_millis(1500));
        signal("-CONT");
    });
    let (_, report) = bench(
        &region,
        "--workload put --concurrency 2 --duration 5s --timeout 300ms",
    );
    hang.join().expect("signals sent");
    // Before: --timeout bounded only the setup, and these waited out the hang (max 1.5 s).
    assert!(
        report["timeouts"].as_u64().is_some_and(|n| n >= 2),
        "{report}"
    );
    assert!(report["ops"].as_u64().is_some_and(|n| n > 0), "{report}");
    let first = report["first_error"].as_str().unwrap_or_default();
    assert!(first.contains("--timeout"), "{report}");
}

#[test]
fn a_paced_bench_sends_on_schedule_not_as_fast_as_it_can() {
    let (_region, report) = clean_bench("--workload put --concurrency 4 --rate 200 --duration 2s");
    assert_eq!(report["rate_per_sec"], 200, "{report}");
    // 200/s for 2 s is 400 requests at most, however fast the region answers (a closed loop
    // of 4 sends thousands). A worker still behind at the end (a stall on a loaded machine)
    // leaves its last few unsent.
    let ops = report["ops"].as_u64().unwrap_or_default();
    assert!((300..=400).contains(&ops), "{ops} requests sent: {report}");
    assert_eq!(report["duration_s"], 2.0, "{report}");
}
