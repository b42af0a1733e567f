//! The `lanes-schema-registry` binary as an operator runs it: configuration errors,
//! SIGTERM within the drain deadline, and ids that survive a process restart.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lanes-schema-registry");
const SCHEMA: &str = r#"{"type":"record","name":"P","fields":[{"name":"x","type":"long"}]}"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(dir: &std::path::Path, port: u16) -> Child {
    Command::new(BIN)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir)
        .env("LANES__SHUTDOWN__DRAIN_TIMEOUT_MS", "3000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("{url}/subjects")).await.is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn terminate(mut child: Child) -> (i32, Duration) {
    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code().expect("exited, not killed");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, started.elapsed())
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_ids_survive_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let child = spawn(dir.path(), port);
    wait_ready(&url).await;
    let http = reqwest::Client::new();
    let body = serde_json::json!({ "schema": SCHEMA });
    let first: serde_json::Value = http
        .post(format!("{url}/subjects/p-value/versions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (code, took) = terminate(child);
    assert_eq!(code, 0, "SIGTERM is a clean stop");
    assert!(
        took < Duration::from_secs(3),
        "stopped within the drain deadline: {took:?}"
    );

    let child = spawn(dir.path(), port);
    wait_ready(&url).await;
    let again: serde_json::Value = http
        .get(format!("{url}/subjects/p-value/versions/1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["id"], first["id"]);
    terminate(child);
}

#[test]
fn a_config_error_names_the_key_and_exits_2() {
    let out = Command::new(BIN)
        .env("LANES__SCHEMA_REGISTRY__LISTEN_ADDR", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen_addr"), "{stderr}");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(BIN)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .env("LANES__LOG__FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(&format!("http://127.0.0.1:{port}")).await;
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "schema registry listening"),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
}
