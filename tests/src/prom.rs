//! A real Prometheus (Debian's, installed by `scripts/setup.sh`) scraping running
//! services every second and evaluating the project's alert rules.

use std::path::Path;
use std::time::Duration;

use serde_yaml::Value;

use crate::{Proc, free_port, http, wait_for};

pub struct Prometheus {
    port: u16,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

/// `deploy/prometheus/alerts.yml` with each named alert's `for` replaced, so a test
/// need not wait minutes; the expressions are the deployed ones.
pub fn rules_with_for(rules: &Path, overrides: &[(&str, &str)]) -> String {
    let mut doc: Value =
        serde_yaml::from_str(&std::fs::read_to_string(rules).expect("rules")).expect("yaml");
    for group in doc["groups"].as_sequence_mut().expect("groups") {
        for rule in group["rules"].as_sequence_mut().expect("rules") {
            let name = rule["alert"].as_str().unwrap_or_default().to_string();
            if let Some((_, to)) = overrides.iter().find(|(a, _)| *a == name) {
                rule["for"] = Value::String(to.to_string());
            }
        }
    }
    serde_yaml::to_string(&doc).expect("yaml")
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (host:port) every second with `rules`.
    pub async fn start(targets: &[String], rules: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\nscrape_configs:\n  - job_name: lanes\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("config");
        std::fs::write(dir.path().join("rules.yml"), rules).expect("rules");
        let port = free_port();
        let proc = Proc(
            std::process::Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("prometheus starts (scripts/setup.sh installs it)"),
        );
        let p = Self {
            port,
            _proc: proc,
            _dir: dir,
        };
        wait_for("prometheus ready", Duration::from_secs(60), || async {
            crate::answers_ok(&format!("http://127.0.0.1:{port}/-/ready"))
                .await
                .then_some(())
        })
        .await;
        p
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<serde_json::Value> {
        let v: serde_json::Value = http()
            .get(format!("http://127.0.0.1:{}/api/v1/{path}", self.port))
            .query(query)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (v["status"] == "success").then(|| v["data"].clone())
    }

    /// The state of alert `name` now: "firing", "pending", or `None` when inactive.
    pub async fn alert_state(&self, name: &str) -> Option<String> {
        let data = self.api("alerts", &[]).await?;
        data["alerts"]
            .as_array()?
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .filter_map(|a| a["state"].as_str().map(String::from))
            .max_by_key(|s| s == "firing")
    }

    /// The value of an instant query's first sample, if it has one.
    pub async fn query(&self, promql: &str) -> Option<f64> {
        let data = self.api("query", &[("query", promql)]).await?;
        data["result"].as_array()?.first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}
