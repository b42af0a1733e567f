//! The `lanes-schema-registry` binary as an operator runs it: configuration errors,
//! SIGTERM within the drain deadline, ids that survive a process restart, what it does
//! with a damaged log, and its basic-auth and body-limit options.

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

/// Two complete lines (schema 1 registered as `p-value` version 1).
const LOG: &str = concat!(
    r#"{"op":"schema","id":1,"schema":"{\"type\":\"record\",\"name\":\"P\",\"fields\":[{\"name\":\"x\",\"type\":\"long\"}]}"}"#,
    "\n",
    r#"{"op":"version","subject":"p-value","version":1,"id":1}"#,
    "\n",
);

#[test]
fn a_corrupt_line_before_the_tail_stops_the_start_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let (first, rest) = LOG.split_once('\n').unwrap();
    std::fs::write(
        dir.path().join("schemas.log"),
        format!("{first}\n{{\"op\":\"vers\n{rest}"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_the_complete_entries_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("schemas.log");
    std::fs::write(&file, format!("{LOG}{{\"op\":\"schema\",\"id\":2,\"sch")).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let child = spawn(dir.path(), port);
    wait_ready(&url).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), LOG, "cut at start");
    let http = reqwest::Client::new();
    let got: serde_json::Value = http
        .get(format!("{url}/subjects/p-value/versions/latest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((&got["id"], &got["version"]), (&1.into(), &1.into()));
    let other = r#"{"type":"record","name":"Q","fields":[{"name":"y","type":"long"}]}"#;
    let registered: serde_json::Value = http
        .post(format!("{url}/subjects/q-value/versions"))
        .json(&serde_json::json!({ "schema": other }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(registered["id"], 2);
    terminate(child);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.ends_with('\n'));
}

#[tokio::test]
async fn basic_auth_and_body_limit_from_the_environment() {
    const PASSWORD: &str = "s3cret-Pa55";
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let child = Command::new(BIN)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .env("LANES_REGISTRY_BASIC_AUTH", format!("ops:{PASSWORD}"))
        .env("LANES_REGISTRY_MAX_BODY_BYTES", "200")
        // Everything the registry logs, to show the password is in none of it.
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(&url).await;
    let http = reqwest::Client::new();
    let resp = http.get(format!("{url}/subjects")).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let resp = http
        .get(format!("{url}/subjects"))
        .basic_auth("ops", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let resp = http
        .post(format!("{url}/subjects/p-value/versions"))
        .basic_auth("ops", Some(PASSWORD))
        .json(&serde_json::json!({ "schema": SCHEMA, "pad": "x".repeat(200) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    let resp = http
        .post(format!("{url}/subjects/p-value/versions"))
        .basic_auth("ops", Some(PASSWORD))
        .json(&serde_json::json!({ "schema": SCHEMA }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);

    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.contains("basic_auth_user"), "{logs}");
    assert!(!logs.contains(PASSWORD), "the password was logged: {logs}");
    // Nor the header that carries it: base64 of "ops:s3cret-Pa55".
    assert!(!logs.contains("b3BzOnMzY3JldC1QYTU1"), "{logs}");
}

#[test]
fn help_documents_the_options_and_bad_credentials_exit_2_without_echoing_them() {
    let out = Command::new(BIN)
        .arg("--help")
        .env("LANES_REGISTRY_BASIC_AUTH", "ops:hunter2")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--basic-auth <USER:PASSWORD>",
        "LANES_REGISTRY_BASIC_AUTH",
        "--max-body-bytes",
        "LANES_REGISTRY_MAX_BODY_BYTES",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
    assert!(!help.contains("hunter2"), "{help}");

    let out = Command::new(BIN)
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--in-memory",
        ])
        .env("LANES_REGISTRY_BASIC_AUTH", ":hunter2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("user must not be empty"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
