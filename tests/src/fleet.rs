//! A lane whose every service is its own process, so the fault suite can kill, pause,
//! restart and replicate each one while it works, and read its peak memory.

use std::collections::BTreeMap;
use std::time::Duration;

use lanes_common::Settings;
use lanes_common::process::peak_rss_mib;
use lanes_common::service::ServiceDef;

use crate::{Lane, Proc, answers_ok, bin, free_port, http, signal, wait_for};

/// One running copy of a service.
struct Member {
    proc: Proc,
    port: u16,
}

pub struct Fleet {
    pub lane: Lane,
    members: BTreeMap<&'static str, Vec<Member>>,
    peak: BTreeMap<String, f64>,
}

impl Fleet {
    /// Starts one process per service and waits until each is ready.
    pub async fn start(lane: &Lane, defs: &[ServiceDef]) -> Self {
        let mut fleet = Self {
            lane: lane.clone(),
            members: BTreeMap::new(),
            peak: BTreeMap::new(),
        };
        for d in defs {
            let port = (d.admin_port)(&lane.settings);
            let member = fleet.spawn(d.name, port, &[]);
            fleet.members.entry(d.name).or_default().push(member);
        }
        for d in defs {
            fleet.ready(d.name, 0).await;
        }
        fleet
    }

    fn spawn(&self, name: &str, port: u16, env: &[(&str, &str)]) -> Member {
        let mut lane = self.lane.clone();
        set_admin_port(&mut lane.settings, name, port);
        let binary = format!("lanes-{name}");
        let proc = Proc(
            std::process::Command::new(bin(&binary))
                .envs(lane.env())
                .envs(env.iter().copied())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("{binary} starts: {e}")),
        );
        Member { proc, port }
    }

    /// Waits until copy `i` of `name` answers ready.
    pub async fn ready(&self, name: &str, i: usize) {
        let port = self.members[name][i].port;
        wait_for(
            &format!("{name} #{i} ready"),
            Duration::from_secs(60),
            || async move {
                answers_ok(&format!("http://127.0.0.1:{port}/readyz"))
                    .await
                    .then_some(())
            },
        )
        .await;
    }

    /// The process id of copy `i` of `name`.
    pub fn pid(&self, name: &str, i: usize) -> u32 {
        self.members[name][i].proc.id()
    }

    /// Resident memory (VmRSS) of copy `i` of `name` now, in MiB.
    pub fn rss_mib(&self, name: &str, i: usize) -> f64 {
        lanes_common::process::rss_mib(self.pid(name, i)).expect("VmRSS")
    }

    /// A metric of copy `i` of `name` from its admin port, summed over the series that
    /// carry `labels`.
    pub async fn metric(&self, name: &str, i: usize, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let port = self.members[name][i].port;
        let text = http()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Records the peak memory of every live process.
    pub fn sample_rss(&mut self) {
        for (name, members) in &self.members {
            for m in members {
                if let Some(mib) = peak_rss_mib(m.proc.id()) {
                    let e = self.peak.entry(name.to_string()).or_insert(0.0);
                    *e = e.max(mib);
                }
            }
        }
    }

    /// SIGKILLs copy `i` of `name`, as a crash would.
    pub fn kill(&mut self, name: &str, i: usize) {
        self.sample_rss();
        let m = &mut self.members.get_mut(name).expect("service")[i];
        signal(&m.proc, "KILL");
        m.proc.wait().expect("killed process is reaped");
    }

    /// Waits for copy `i` of `name` to exit on its own (a failpoint), up to `timeout`.
    pub async fn exited(&mut self, name: &str, i: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.sample_rss();
            let m = &mut self.members.get_mut(name).expect("service")[i];
            if let Ok(Some(_)) = m.proc.try_wait() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts copy `i` of `name` again after its crash, with `env` (e.g. a failpoint),
    /// once the crashed member's session has expired (as a supervisor's restart delay
    /// would; tansu can stall a group when a member joins while a crashed one is still
    /// registered). Waits until it is ready.
    pub async fn restart(&mut self, name: &str, i: usize, env: &[(&str, &str)]) {
        self.restart_unready(name, i, env).await;
        self.ready(name, i).await;
    }

    /// [`Fleet::restart`] without waiting for readiness (a dependency may be down).
    pub async fn restart_unready(&mut self, name: &str, i: usize, env: &[(&str, &str)]) {
        tokio::time::sleep(Duration::from_millis(
            self.lane.settings.kafka.session_timeout_ms + 1000,
        ))
        .await;
        let port = self.members[name][i].port;
        let member = self.spawn(name, port, env);
        self.members.get_mut(name).expect("service")[i] = member;
    }

    /// Replaces copy `i` of `name` with one started with `env`, without waiting for a
    /// session to expire: for a copy stopped cleanly, or not yet doing anything.
    pub async fn respawn(&mut self, name: &str, i: usize, env: &[(&str, &str)]) {
        self.stop_one(name, i).await;
        let port = self.members[name][i].port;
        let member = self.spawn(name, port, env);
        self.members.get_mut(name).expect("service")[i] = member;
        self.ready(name, i).await;
    }

    /// SIGSTOP / SIGCONT of copy `i` of `name`.
    pub fn pause(&self, name: &str, i: usize, paused: bool) {
        signal(
            &self.members[name][i].proc,
            if paused { "STOP" } else { "CONT" },
        );
    }

    /// Starts another copy of `name` on its own admin port; returns its index.
    pub async fn add_replica(&mut self, name: &str) -> usize {
        let member = self.spawn(name, free_port(), &[]);
        let list = self.members.get_mut(name).expect("service");
        list.push(member);
        let i = list.len() - 1;
        self.ready(name, i).await;
        i
    }

    /// Stops copy `i` of `name` with SIGTERM and checks it exits cleanly.
    pub async fn stop_one(&mut self, name: &str, i: usize) {
        self.sample_rss();
        let m = &mut self.members.get_mut(name).expect("service")[i];
        if matches!(m.proc.try_wait(), Ok(Some(_))) {
            return;
        }
        signal(&m.proc, "TERM");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = m.proc.try_wait().expect("wait") {
                assert!(status.success(), "{name} #{i} stopped with {status}");
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} #{i} did not stop within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every process cleanly; returns each service's peak memory in MiB.
    pub async fn stop(mut self) -> BTreeMap<String, f64> {
        let names: Vec<(&'static str, usize)> = self
            .members
            .iter()
            .flat_map(|(n, ms)| (0..ms.len()).map(move |i| (*n, i)))
            .collect();
        for (name, i) in names {
            self.stop_one(name, i).await;
        }
        self.peak
    }
}

fn set_admin_port(s: &mut Settings, name: &str, port: u16) {
    let p = &mut s.admin.ports;
    match name {
        "ingest" => p.ingest = port,
        "micro-batcher" => p.micro_batcher = port,
        "scorer" => p.scorer = port,
        "cache-writer" => p.cache_writer = port,
        "fallback-responder" => p.fallback_responder = port,
        other => panic!("no admin port for {other}"),
    }
}
