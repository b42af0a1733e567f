//! `docker-compose.yml` and `deploy/` checked against the code: Prometheus config and
//! rules pass promtool, the Compose file passes docker-compose's schema check, every
//! Lanes service in it runs a real command with real `LANES__` settings on the ports its
//! config binds, and the dashboard and alerts use only metrics the services export.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lanes_common::Settings;
use lanes_common::generator::Generator;
use lanes_tests::*;
use serde::Deserialize;
use serde_yaml::Value;

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} not found: scripts/setup.sh installs it"
    );
    Command::new(name)
}

#[test]
fn promtool_accepts_the_prometheus_config_and_rules() {
    for args in [
        vec!["check", "config", "deploy/prometheus/prometheus.yml"],
        vec!["check", "rules", "deploy/prometheus/alerts.yml"],
        vec!["test", "rules", "deploy/prometheus/alerts_test.yml"],
    ] {
        let out = tool("promtool")
            .args(&args)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Alert names of `alerts.yml`.
fn alert_names() -> BTreeSet<String> {
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect()
}

#[test]
fn every_alert_has_unit_tests_where_it_fires_and_where_it_does_not() {
    let tests: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/alerts_test.yml")).unwrap(),
    )
    .unwrap();
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for case in tests["tests"].as_sequence().unwrap() {
        for check in case["alert_rule_test"].as_sequence().unwrap() {
            let name = check["alertname"].as_str().unwrap().to_string();
            match check["exp_alerts"].as_sequence() {
                Some(expected) if !expected.is_empty() => fires.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    let alerts = alert_names();
    assert!(alerts.len() >= 8, "{alerts:?}");
    let untested: Vec<&String> = alerts
        .iter()
        .filter(|a| !fires.contains(*a) || !quiet.contains(*a))
        .collect();
    assert!(
        untested.is_empty(),
        "alerts without a firing and a quiet promtool case in alerts_test.yml: {untested:?}"
    );
}

/// The Compose file as docker-compose resolves it (anchors and merges applied).
fn resolved(compose: &Path) -> Result<Value, String> {
    let out = tool("docker-compose")
        .arg("-f")
        .arg(compose)
        .arg("config")
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_yaml::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn admin_port(settings: &Settings, binary: &str) -> Option<u16> {
    let p = &settings.admin.ports;
    Some(match binary {
        "lanes-ingest" => p.ingest,
        "lanes-micro-batcher" => p.micro_batcher,
        "lanes-scorer" => p.scorer,
        "lanes-cache-writer" => p.cache_writer,
        "lanes-fallback-responder" => p.fallback_responder,
        _ => return None,
    })
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// A Compose service's environment, values as the container sees them.
fn environment(svc: &Value) -> HashMap<String, String> {
    svc["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => String::new(),
                    };
                    Some((k.as_str()?.to_string(), v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Everything wrong with a Compose file, as messages; empty when it is right.
fn compose_problems(compose: &Path) -> Vec<String> {
    let doc = match resolved(compose) {
        Ok(d) => d,
        Err(e) => return vec![format!("docker-compose config: {e}")],
    };
    let mut problems = Vec::new();
    let services = doc["services"].as_mapping().cloned().unwrap_or_default();
    let mut ports_of: HashMap<String, u16> = HashMap::new();
    for (name, svc) in &services {
        let name = name.as_str().unwrap_or_default().to_string();
        let command = strings(&svc["command"]);
        let Some(binary) = command.first().filter(|c| c.starts_with("lanes")) else {
            continue;
        };
        if !bin_path(binary).exists() {
            problems.push(format!("{name}: no binary {binary}"));
            continue;
        }
        let env = environment(svc);
        let settings = match Settings::load_from(None, env.clone()) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("{name}: its LANES__ settings are refused: {e}"));
                continue;
            }
        };
        if binary == "lanes" {
            let help = Command::new(bin("lanes"))
                .args(&command[1..])
                .arg("--help")
                .envs(&env)
                .output()
                .unwrap();
            if !help.status.success() {
                problems.push(format!(
                    "{name}: `{}` is not a lanes command",
                    command.join(" ")
                ));
            }
            continue;
        }
        let Some(port) = admin_port(&settings, binary) else {
            problems.push(format!("{name}: {binary} is not a service"));
            continue;
        };
        if settings.admin.host != "0.0.0.0" {
            problems.push(format!(
                "{name}: admin.host {} is unreachable from other containers",
                settings.admin.host
            ));
        }
        let published: Vec<u16> = svc["ports"]
            .as_sequence()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["target"].as_u64().map(|t| t as u16))
                    .collect()
            })
            .unwrap_or_default();
        if !published.contains(&port) {
            problems.push(format!(
                "{name}: binds admin port {port} but publishes {published:?}"
            ));
        }
        let check = strings(&svc["healthcheck"]["test"]).join(" ");
        if !check.contains(&format!("localhost:{port}/")) {
            problems.push(format!(
                "{name}: healthcheck `{check}` does not ask port {port}"
            ));
        }
        ports_of.insert(name, port);
    }
    for expected in [
        "kafka",
        "schema-registry",
        "redis",
        "prometheus",
        "grafana",
        "topic-init",
    ] {
        if !services.contains_key(expected) {
            problems.push(format!("no {expected} service"));
        }
    }
    // Prometheus scrapes each Lanes service on its admin port.
    let prom: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let targets: Vec<String> = prom["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_sequence()
        .map(|t| {
            t.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for (name, port) in &ports_of {
        if !targets.contains(&format!("{name}:{port}")) {
            problems.push(format!("prometheus does not scrape {name}:{port}"));
        }
    }
    problems
}

#[test]
fn the_compose_file_matches_the_code() {
    let problems = compose_problems(&root().join("docker-compose.yml"));
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The `LANES__` settings of the Kubernetes manifest's `lanes-env` ConfigMap.
fn k8s_env() -> HashMap<String, String> {
    let text = std::fs::read_to_string(root().join("deploy/k8s/lanes.yaml")).unwrap();
    let config = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "ConfigMap" && doc["metadata"]["name"] == "lanes-env")
        .expect("the lanes-env ConfigMap");
    config["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_string(),
                v.as_str()
                    .expect("ConfigMap values are strings")
                    .to_string(),
            )
        })
        .collect()
}

/// Both deployments run on Apache Kafka, which needs none of the embedded broker's
/// workarounds: rewinding each assignment replays up to 10,000 records a partition,
/// and waiting on gaps holds a partition up a second for every transaction a
/// publisher commits (its marker takes an offset).
#[test]
fn deployments_on_apache_kafka_turn_off_the_embedded_brokers_workarounds() {
    let doc = resolved(&root().join("docker-compose.yml")).unwrap();
    let mut checked = 0;
    for (name, svc) in doc["services"].as_mapping().unwrap() {
        if !strings(&svc["command"])
            .first()
            .is_some_and(|c| c.starts_with("lanes"))
        {
            continue;
        }
        let s = Settings::load_from(None, environment(svc)).unwrap();
        assert_eq!(
            (s.runner.rewind_records, s.runner.gap_wait_ms),
            (0, 0),
            "{name:?}"
        );
        checked += 1;
    }
    assert!(checked >= 5, "{checked} Lanes services in the Compose file");
    let s = Settings::load_from(None, k8s_env()).expect("lanes-env is accepted");
    assert_eq!((s.runner.rewind_records, s.runner.gap_wait_ms), (0, 0));
}

/// The check fails when the file is wrong: a mutation of the real file.
fn mutated(from: &str, to: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    assert!(text.contains(from), "{from:?} not in docker-compose.yml");
    let dir = tempfile::tempdir_in(root()).unwrap();
    let path = dir.path().join("docker-compose.yml");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    // Relative build contexts resolve against the file's folder.
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    std::fs::create_dir_all(dir.path().join("deploy")).unwrap();
    compose_problems(&path)
}

#[test]
fn the_compose_check_catches_a_wrong_variable_port_or_command() {
    let p = mutated(
        "LANES__MICRO_BATCHER__MAX_DELAY_MS",
        "LANES__MICRO_BATCHER__MAX_DELAY",
    );
    assert!(p.iter().any(|m| m.contains("max_delay")), "{p:?}");
    let p = mutated("\"9403:9403\"", "\"9403:9503\"");
    assert!(
        p.iter().any(|m| m.contains("scorer") && m.contains("9403")),
        "{p:?}"
    );
    let p = mutated("localhost:9401/readyz", "localhost:9400/readyz");
    assert!(
        p.iter()
            .any(|m| m.contains("ingest") && m.contains("healthcheck")),
        "{p:?}"
    );
    let p = mutated("[\"lanes-cache-writer\"]", "[\"lanes-cache-writr\"]");
    assert!(p.iter().any(|m| m.contains("lanes-cache-writr")), "{p:?}");
    let p = mutated(
        "[\"lanes\", \"topics\", \"create\"]",
        "[\"lanes\", \"topic\", \"create\"]",
    );
    assert!(p.iter().any(|m| m.contains("not a lanes command")), "{p:?}");
    let p = mutated(
        "LANES__ADMIN__HOST: 0.0.0.0",
        "LANES__ADMIN__HOST: 127.0.0.1",
    );
    assert!(p.iter().any(|m| m.contains("unreachable")), "{p:?}");
    let p = mutated("condition: service_healthy", "condition: service_sunny");
    assert!(
        p.iter().any(|m| m.contains("docker-compose config")),
        "{p:?}"
    );
}

/// `lanes_...` names in PromQL, histogram suffixes kept.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("lanes_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Referenced names that no exported family accounts for.
fn unknown(
    referenced: &BTreeSet<String>,
    exported: &BTreeMap<String, prometheus::proto::MetricType>,
) -> Vec<String> {
    referenced
        .iter()
        .filter(|name| {
            if exported.contains_key(*name) {
                return false;
            }
            !["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .and_then(|base| exported.get(base))
                    .is_some_and(|t| *t == prometheus::proto::MetricType::HISTOGRAM)
            })
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_and_alerts_use_only_exported_metrics() {
    // Run every service with a little traffic, so label-dependent series exist too.
    let lane = Lane::new("metrics");
    lane.create_topics().await;
    let running = lane.start(&all_services());
    running.ready().await;
    let mut lines: Vec<String> = Generator::new(5, 20)
        .take(50)
        .map(|s| s.raw_json())
        .collect();
    lines.push("not json".into());
    lane.publish_raw(&producer(&lane.settings), &lines).await;
    wait_for("the lane's metrics", Duration::from_secs(60), || async {
        (running.metric("lanes_cache_writer_writes_total", &[]) >= 50.0
            && running.metric("lanes_consumer_lag_messages", &[]) >= 0.0
            && running
                .metrics
                .gather()
                .iter()
                .any(|f| f.name() == "lanes_consumer_lag_messages" && !f.get_metric().is_empty()))
        .then_some(())
    })
    .await;
    let exported: BTreeMap<String, prometheus::proto::MetricType> = running
        .metrics
        .gather()
        .iter()
        .map(|f| (f.name().to_string(), f.get_field_type()))
        .collect();

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/lanes.json")).unwrap(),
    )
    .unwrap();
    let mut in_dashboard = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            in_dashboard.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(in_dashboard.len() >= 10, "{in_dashboard:?}");
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let mut in_alerts = BTreeSet::new();
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        in_alerts.extend(metric_names(rule["expr"].as_str().unwrap()));
    }
    assert_eq!(
        unknown(&in_dashboard, &exported),
        Vec::<String>::new(),
        "dashboard"
    );
    assert_eq!(
        unknown(&in_alerts, &exported),
        Vec::<String>::new(),
        "alerts"
    );
    // The comparison can fail: a name no service exports is caught.
    let made_up: BTreeSet<String> = [
        "lanes_scorer_rows_scored_total",
        "lanes_made_up_total",
        "lanes_scorer_rows_scored_total_bucket",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        unknown(&made_up, &exported),
        vec![
            "lanes_made_up_total",
            "lanes_scorer_rows_scored_total_bucket"
        ]
    );
    running.stop().await;
}

/// The README's "Choosing a lane" names each lane and each pitfall, and the commands and
/// settings it tells a user to reach for exist: a renamed one fails here.
#[test]
fn choosing_a_lane_cites_commands_and_settings_that_exist() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme.find("## Choosing a lane").expect("the section");
    let rest = &readme[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    for needed in [
        "**batch**",
        "**micro-batch / streaming**",
        "**cache + real-time fallback**",
        "**Real-time for everything.**",
        "**The feature pipeline's own latency.**",
        "**Cache staleness.**",
        "**Window sizing.**",
    ] {
        assert!(section.contains(needed), "{needed} missing");
    }
    let mut commands = BTreeSet::new();
    for quoted in section.split('`').skip(1).step_by(2) {
        if let Some(sub) = quoted.strip_prefix("lanes ") {
            commands.insert(sub.split_whitespace().next().unwrap().to_string());
        }
    }
    assert!(commands.len() >= 4, "{commands:?}");
    for sub in &commands {
        let out = Command::new(bin("lanes"))
            .args([sub.as_str(), "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "lanes {sub} is no command");
    }
    let settings =
        serde_json::to_value(Settings::load_from(None, HashMap::new()).unwrap()).unwrap();
    let known = |key: &str| match key.split_once('.') {
        Some((section, key)) => settings[section].get(key).is_some(),
        None => settings["fallback_responder"].get(key).is_some(),
    };
    for key in [
        "freshness_ms",
        "refresh_after_ms",
        "stale_while_refresh",
        "rollout_grace_ms",
        "max_in_flight",
        "micro_batcher.target_latency_ms",
    ] {
        let quoted = format!("`{key}`");
        assert!(section.contains(&quoted), "{quoted} not cited");
        assert!(known(key), "{key} is no setting");
    }
}
