//! `rerank loadgen` holds load on a real pool through the real client, survives a worker being
//! killed mid-run (retries), and reports requests, failures and worker memory.

use crate::common;

use std::process::Command;

use common::*;

#[test]
fn loadgen_holds_load_and_survives_a_worker_kill() {
    let nats = NatsServer::start();
    let first = WorkerProcess::start(&nats.url(), &[]);
    let mut second = WorkerProcess::start(&nats.url(), &[]);
    let pids = format!("{},{}", first.child.id(), second.child.id());
    let loadgen = Command::new(rerank_bin())
        .args(["loadgen", "--nats-url", &nats.url(), "--concurrency", "16"])
        .args([
            "--duration",
            "4",
            "--report-every",
            "1",
            "--backoff-ms",
            "50",
            // The killed worker's requests time out before they are retried: long enough that a
            // loaded box's slow answers are not mistaken for them.
            "--timeout",
            "15",
        ])
        .args(["--watch-pids", &pids])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("rerank loadgen");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    second.child.kill().expect("SIGKILL one worker mid-run");
    let output = loadgen.wait_with_output().expect("loadgen finishes");
    assert!(output.status.success(), "loadgen reported failures");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON line on stdout");
    assert!(report["requests"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let rss = report["rss_kib"].as_array().unwrap();
    assert_eq!(rss.len(), 2);
    assert!(
        rss[0][1].as_u64().unwrap() > 0,
        "the live worker's RSS is reported: {report}"
    );
    assert!(
        rss[1][1].is_null(),
        "the killed worker has no RSS: {report}"
    );
    println!("loadgen: {report}");
}
