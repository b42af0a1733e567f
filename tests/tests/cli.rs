//! The `lanes` CLI against the real stack, as an operator runs it: topics, publish,
//! tail, cache get, dlq list and replay after a fix, status, help and errors.

use std::collections::HashSet;
use std::process::{Command, Output};
use std::time::Duration;

use lanes_common::generator::{Generator, Sample};
use lanes_tests::*;

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

async fn run(lane: &Lane, args: &[&str]) -> Output {
    let (lane, args): (Lane, Vec<String>) =
        (lane.clone(), args.iter().map(|s| s.to_string()).collect());
    tokio::task::spawn_blocking(move || {
        lane.lanes(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topics_publish_tail_and_cache_get() {
    let lane = Lane::new("cli");
    let created = ok(&run(&lane, &["topics", "create"]).await);
    assert_eq!(
        created.lines().filter(|l| l.ends_with("\tcreated")).count(),
        lane.settings.topics.all().len(),
        "{created}"
    );
    let again = ok(&run(&lane, &["topics", "create"]).await);
    assert_eq!(
        again.lines().filter(|l| l.ends_with("\texists")).count(),
        lane.settings.topics.all().len(),
        "{again}"
    );
    let listed = ok(&run(&lane, &["topics", "list"]).await);
    assert!(
        listed
            .lines()
            .any(|l| l == format!("{}\t3", lane.settings.topics.predictions)),
        "{listed}"
    );

    let running = lane.start(&streaming_services());
    running.ready().await;
    ok(&run(
        &lane,
        &["publish", "--sample", "30", "--seed", "77", "--cards", "5"],
    )
    .await);
    let samples: Vec<Sample> = Generator::new(77, 5).take(33).collect();
    // The last three come from a JSON-lines file instead.
    let file = tempfile::NamedTempFile::new().unwrap();
    let lines: Vec<String> = samples[30..].iter().map(Sample::raw_json).collect();
    std::fs::write(file.path(), lines.join("\n") + "\n\n").unwrap();
    let published = run(&lane, &["publish", "--file", file.path().to_str().unwrap()]).await;
    ok(&published);
    assert!(String::from_utf8_lossy(&published.stderr).contains("published 3 events"));

    // tail decodes the Avro events through the registry.
    let events = ok(&run(
        &lane,
        &[
            "tail",
            &lane.settings.topics.events,
            "--from-beginning",
            "--max",
            "33",
            "--idle-timeout",
            "60",
        ],
    )
    .await);
    let ids: HashSet<String> = events
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["value"]["record"]["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, samples.iter().map(|s| s.event_id.clone()).collect());

    // cache get shows the entity's newest prediction, its age and a verdict.
    let entity = &samples[32].entity_id;
    let newest = samples
        .iter()
        .filter(|s| &s.entity_id == entity)
        .map(|s| s.event_time)
        .max()
        .unwrap();
    let report: serde_json::Value =
        wait_for("the cache entry", Duration::from_secs(60), || async {
            let out = run(&lane, &["cache", "get", entity]).await;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["fields"]["event_time"].as_str() == Some(newest.to_string().as_str())).then_some(v)
        })
        .await;
    assert!(
        report["verdict"].as_str().unwrap().starts_with("fresh"),
        "{report}"
    );
    assert!(report["age_ms"].as_i64().unwrap() >= 0);
    assert!(
        report["fields"]["features"]["amount"].is_number(),
        "online features beside it"
    );
    let missing = run(&lane, &["cache", "get", "no-such-card"]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no cache entry"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_listed_and_replayed_after_a_fix() {
    let mut lane = Lane::new("replay");
    lane.create_topics().await;
    let downstream = lane.start(&[
        lanes_micro_batcher::def(),
        lanes_scorer::def(),
        lanes_cache_writer::def(),
    ]);
    downstream.ready().await;

    // An ingest limit too small for real events: every one is dead-lettered TOO_LARGE.
    lane.settings.ingest.max_event_bytes = 100;
    let ingest = lane.start(&[lanes_ingest::def()]);
    ingest.ready().await;
    let samples: Vec<Sample> = Generator::new(88, 10).take(12).collect();
    let mut lines: Vec<String> = samples.iter().map(Sample::raw_json).collect();
    lines.push("{broken".into());
    lane.publish_raw(&producer(&lane.settings), &lines).await;
    wait_for("dead letters", Duration::from_secs(60), || async {
        (ingest.metric("lanes_ingest_dead_letters_total", &[]) >= 13.0).then_some(())
    })
    .await;
    ingest.stop().await;

    let listed = ok(&run(&lane, &["dlq", "list", "--class", "TOO_LARGE"]).await);
    let letters: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 12);
    assert!(
        letters
            .iter()
            .all(|l| l["class"] == "TOO_LARGE" && l["stage"] == "ingest")
    );
    assert!(
        letters[0]["source"]
            .as_str()
            .unwrap()
            .starts_with(&lane.settings.topics.raw)
    );
    let all = ok(&run(&lane, &["dlq", "list"]).await);
    assert_eq!(all.lines().count(), 13);

    // The fix: a sane limit. Then replay only the TOO_LARGE ones.
    lane.settings.ingest.max_event_bytes = 65_536;
    let ingest = lane.start(&[lanes_ingest::def()]);
    ingest.ready().await;
    let dry = ok(&run(
        &lane,
        &["dlq", "replay", "--class", "TOO_LARGE", "--dry-run"],
    )
    .await);
    assert!(dry.contains("would replay 12 dead letters"), "{dry}");
    let replayed = ok(&run(&lane, &["dlq", "replay", "--class", "TOO_LARGE"]).await);
    assert!(
        replayed.contains(&format!("replayed 12 to {}", lane.settings.topics.raw)),
        "{replayed}"
    );

    let consumer = consumer(&lane.settings, &[&lane.settings.topics.predictions]);
    let codec = lanes_common::avro::AvroCodec::new(&lane.settings.registry).unwrap();
    let mut predicted = HashSet::new();
    for m in consume_n(&consumer, 12, Duration::from_secs(60)).await {
        let p = codec
            .decode::<lanes_common::records::Prediction>(payload(&m))
            .await
            .unwrap()
            .record;
        predicted.insert(p.event_id);
    }
    assert_eq!(
        predicted,
        samples.iter().map(|s| s.event_id.clone()).collect()
    );

    // A second replay with the same filter continues where the first stopped.
    let again = ok(&run(&lane, &["dlq", "replay", "--class", "TOO_LARGE"]).await);
    assert!(again.contains("replayed 0 dead letters"), "{again}");
    ingest.stop().await;
    downstream.stop().await;
}

/// Anyone who may write to the dead-letter topic can name any source topic; a replay
/// sends letters only to topics Lanes services read, and a chunk at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_writes_only_to_topics_lanes_reads() {
    use rdkafka::message::{Header, OwnedHeaders};
    let lane = Lane::new("replay-to");
    lane.create_topics().await;
    let victim = unique("victim");
    create_topics(&lane.settings, &[&victim]).await;
    let raw = lane.settings.topics.raw.clone();
    let p = producer(&lane.settings);
    let letter = |key: &'static str, source: Option<&str>| {
        let mut h = OwnedHeaders::new().insert(Header {
            key: lanes_common::dlq::HEADER_CLASS,
            value: Some("TOO_LARGE"),
        });
        if let Some(source) = source {
            h = h.insert(Header {
                key: lanes_common::dlq::HEADER_SOURCE_TOPIC,
                value: Some(source),
            });
        }
        (key, h)
    };
    for (key, headers) in [
        letter("a", Some(&raw)),
        letter("theirs", Some(&victim)),
        letter("b", Some(&raw)),
        letter("nowhere", None),
        letter("escape", Some("x\u{1b}[2J")),
        letter("c", Some(&raw)),
    ] {
        produce_record(
            &p,
            rdkafka::producer::FutureRecord::to(&lane.settings.topics.dlq)
                .key(key)
                .payload("{}")
                .headers(headers),
        )
        .await;
    }
    // One letter per chunk: each is committed before the next is read.
    let out = ok(&run(&lane, &["dlq", "replay", "--chunk-bytes", "1"]).await);
    assert!(out.contains(&format!("replayed 3 to {raw}\n")), "{out}");
    assert!(out.contains("replayed 3 dead letters"), "{out}");
    assert!(
        out.contains(&format!(
            "left 1 dead letters: source topic \"{victim}\" is not read by a Lanes service"
        )),
        "{out}"
    );
    assert!(
        out.contains("left 1 dead letters: without a source topic"),
        "{out}"
    );
    assert!(
        out.contains("left 1 dead letters: a source topic that is no topic name")
            && !out.contains('\u{1b}'),
        "{out}"
    );
    let keys: HashSet<Vec<u8>> = consume_n(
        &consumer(&lane.settings, &[&raw]),
        3,
        Duration::from_secs(30),
    )
    .await
    .iter()
    .map(|m| rdkafka::Message::key(m).unwrap().to_vec())
    .collect();
    assert_eq!(
        keys,
        HashSet::from([b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
    );
    let again = ok(&run(&lane, &["dlq", "replay"]).await);
    assert!(again.contains("replayed 0 dead letters"), "{again}");
    let dry = ok(&run(&lane, &["dlq", "replay", "--from-beginning", "--dry-run"]).await);
    assert!(dry.contains("would replay 3 dead letters"), "{dry}");
    let c = consumer(&lane.settings, &[&victim]);
    assert!(
        tokio::time::timeout(Duration::from_secs(3), c.recv())
            .await
            .is_err(),
        "nothing written to {victim}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_reports_health_and_lag() {
    let lane = Lane::new("status");
    lane.create_topics().await;
    let mut up = lane.spawn("lanes", &["up"]);
    let port = lane.settings.admin.ports.up;
    wait_for("lanes up ready", Duration::from_secs(60), || async move {
        http()
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    let out = run(&lane, &["status"]).await;
    let text = ok(&out);
    for service in [
        "ingest",
        "micro-batcher",
        "scorer",
        "cache-writer",
        "fallback-responder",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(service) && l.contains("ready")),
            "{service}: {text}"
        );
    }
    assert!(text.contains(&lane.settings.topics.raw));
    signal(&up, "TERM");
    assert!(up.wait().unwrap().success());
    let down = run(&lane, &["status"]).await;
    assert_eq!(
        down.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&down.stdout)
    );
    assert!(String::from_utf8_lossy(&down.stdout).contains("DOWN"));
}

#[test]
fn help_and_usage_errors() {
    let lane = Lane::new("help");
    let help = ok(&lane.lanes(&["--help"]));
    for command in [
        "up", "topics", "publish", "tail", "cache", "dlq", "status", "demo", "bench",
    ] {
        assert!(help.contains(command), "{command} missing from --help");
    }
    assert!(ok(&lane.lanes(&["dlq", "replay", "--help"])).contains("--class"));
    let wrong = lane.lanes(&["fly"]);
    assert_eq!(wrong.status.code(), Some(2));
    let bad_class = lane.lanes(&["dlq", "list", "--class", "SHRUG"]);
    assert_eq!(bad_class.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_class.stderr).contains("unknown error class"));
    let bad_config = Command::new(bin("lanes"))
        .args(["topics", "list"])
        .env("LANES__KAFKA__BOOTSTRAP", "x")
        .output()
        .unwrap();
    assert_eq!(bad_config.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_config.stderr).contains("bootstrap"));
}

/// `lanes bench-cpu` drains its backlog through a child `lanes up` and reports CPU
/// per event for Lanes, the broker and Redis, its idle CPU, and the same drain through
/// the Python baseline.
#[test]
fn bench_cpu_reports_cpu_per_event_of_a_drain() {
    let lane = Lane::new("bench-cpu");
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("cpu.json");
    let mut args = vec![
        "bench-cpu".to_string(),
        "--events".into(),
        "3000".into(),
        "--idle-secs".into(),
        "2".into(),
        "--python".into(),
        "--rounds".into(),
        "2".into(),
        "--out".into(),
        json.display().to_string(),
    ];
    args.extend(broker_pid_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let printed = ok(&lane.lanes(&args));
    assert!(printed.contains("CPU µs/event"), "{printed}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["events"], 3000);
    assert!(report["drain_s"].as_f64().unwrap() > 0.0, "{report}");
    for process in ["lanes", "broker", "redis"] {
        let us = report["cpu_us_per_event"][process].as_f64().unwrap();
        assert!(us > 0.0 && us.is_finite(), "{process}: {report}");
    }
    assert!(report["lanes_peak_rss_mib"].as_f64().unwrap() > 0.0);
    let idle = report["lanes_idle_cpu_percent"].as_f64().unwrap();
    assert!((0.0..200.0).contains(&idle), "{report}");
    // What the drain's cache entries cost Redis, read before they were deleted: an entry
    // holds a prediction and features, a dozen fields, so never under 100 bytes.
    let cache = &report["redis_cache"];
    let entries = cache["entries"].as_u64().unwrap();
    assert!((1..=3000).contains(&entries), "{report}");
    assert!(
        cache["mean_entry_bytes"].as_f64().unwrap() > 100.0,
        "{report}"
    );
    let encodings = cache["encodings"].as_object().unwrap();
    assert_eq!(
        encodings.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        entries,
        "{report}"
    );
    assert!(
        encodings
            .keys()
            .all(|e| e == "hashtable" || e == "listpack"),
        "{report}"
    );
    assert!(
        printed.contains("Redis bytes per cached entity"),
        "{printed}"
    );
    // Two alternated rounds; the goals are read at the median of the Lanes drains.
    let runs = report["lanes"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{report}");
    assert_eq!(report["python"].as_array().unwrap().len(), 2, "{report}");
    for process in ["lanes", "redis"] {
        let of = |r: &serde_json::Value| r["cpu_us_per_event"][process].as_f64().unwrap();
        let median = report["median_cpu_us_per_event"][process].as_f64().unwrap();
        assert!(
            (median - (of(&runs[0]) + of(&runs[1])) / 2.0).abs() < 1e-9,
            "{process}: {report}"
        );
    }
    assert!(printed.contains("(median of 2 drains, "), "{printed}");
    // The Python baseline drained the same events through its own topics.
    let python = &report["python"][0];
    assert_eq!(python["events"], 3000, "{report}");
    assert!(python["events_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        python["cpu_us_per_event"]["python"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(report["drain_ratio"].as_f64().unwrap() > 0.0, "{report}");
    assert!(printed.contains("drain rate, lanes / python"), "{printed}");
    let none = lane.lanes(&["bench-cpu", "--events", "0"]);
    assert_eq!(none.status.code(), Some(2), "no events is a usage error");
}

/// The broker's pid for `bench-cpu`, when scripts/dev-up.sh started it (other tansu
/// processes may run).
fn broker_pid_args() -> Vec<String> {
    std::fs::read_to_string(root().join(".lanes/run/broker.pid"))
        .map(|pid| vec!["--broker-pid".into(), pid.trim().to_string()])
        .unwrap_or_default()
}

/// `lanes bench-cpu --per-service` runs every service as its own binary, the
/// fallback-responder answering requests during the drain, and reports each one's CPU
/// and peak memory beside its goal.
#[test]
fn bench_cpu_per_service_reports_each_services_peak_memory() {
    let lane = Lane::new("bench-cpu-svc");
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("cpu.json");
    let mut args = vec![
        "bench-cpu".to_string(),
        "--per-service".into(),
        "--events".into(),
        "2000".into(),
        "--requests".into(),
        "300".into(),
        "--idle-secs".into(),
        "0".into(),
        "--out".into(),
        json.display().to_string(),
    ];
    args.extend(broker_pid_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let printed = ok(&lane.lanes(&args));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["requests"], 300, "{report}");
    let services = report["services"].as_array().unwrap();
    let names: Vec<&str> = services
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "ingest",
            "micro-batcher",
            "scorer",
            "cache-writer",
            "fallback-responder"
        ],
        "{report}"
    );
    for svc in services {
        let name = svc["service"].as_str().unwrap();
        // Each handled its share: events, or the requests for the responder.
        assert!(svc["cpu_us_per_item"].as_f64().unwrap() > 0.0, "{report}");
        assert!(svc["peak_rss_mib"].as_f64().unwrap() > 1.0, "{report}");
        let goal = if matches!(name, "scorer" | "fallback-responder") {
            128.0
        } else {
            64.0
        };
        assert_eq!(svc["goal_peak_rss_mib"].as_f64(), Some(goal), "{report}");
        assert!(
            printed.contains(&format!("| peak RSS of {name}, MiB |")),
            "{printed}"
        );
    }
    let lanes = report["cpu_us_per_event"]["lanes"].as_f64().unwrap();
    assert!(lanes > 0.0 && lanes.is_finite(), "{report}");
}

/// `lanes bench` sweeps window settings and rates on the user's own model and sample
/// events, draws the curves to SVG and recommends the setting that batches most within
/// the latency target; a sample that ingest would refuse is refused by line.
#[test]
fn bench_sweeps_windows_on_the_users_model_and_events() {
    let lane = Lane::new("bench-sweep");
    let dir = tempfile::tempdir().unwrap();
    // The user's model: the served one, copied under another name and version.
    let model = dir.path().join("mine").join("7");
    std::fs::create_dir_all(&model).unwrap();
    let served = lane.settings.model.resolve().unwrap();
    std::fs::copy(served.join("model.onnx"), model.join("model.onnx")).unwrap();
    let spec = std::fs::read_to_string(served.join("model.toml")).unwrap();
    let spec = spec.replace("name = \"fraud\"", "name = \"mine\"");
    let spec = spec.replace("version = \"1\"", "version = \"7\"");
    std::fs::write(model.join("model.toml"), spec).unwrap();
    let samples = dir.path().join("events.jsonl");
    let sample = ok(&lane.lanes(&["sample", "--count", "50", "--format", "jsonl"]));
    std::fs::write(&samples, &sample).unwrap();
    let (json, svg) = (dir.path().join("sweep.json"), dir.path().join("sweep.svg"));
    let args = |events: &std::path::Path| {
        vec![
            "bench".to_string(),
            "--model".into(),
            dir.path().join("mine").display().to_string(),
            "--events".into(),
            events.display().to_string(),
            "--burst".into(),
            "300".into(),
            "--rates".into(),
            "50,400".into(),
            "--seconds".into(),
            "1".into(),
            "--delays".into(),
            "5,60".into(),
            "--sizes".into(),
            "64".into(),
            "--raw-messages".into(),
            "1000".into(),
            "--hop-messages".into(),
            "100".into(),
            "--target-ms".into(),
            "1000".into(),
            "--out".into(),
            json.display().to_string(),
            "--plot".into(),
            svg.display().to_string(),
            "--half-peak".into(),
        ]
    };
    let run = |events: &std::path::Path| {
        let args = args(events);
        lane.lanes(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let printed = ok(&run(&samples));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["model"]["name"], "mine", "{report}");
    assert_eq!(report["model"]["version"], "7", "{report}");
    assert_eq!(report["events"], samples.display().to_string());
    let rows = report["lane"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
    let batching = |row: &serde_json::Value| -> f64 {
        let rates = row["rates"].as_array().unwrap();
        assert_eq!(rates.len(), 2, "{report}");
        for r in rates {
            let p99 = r["latency_p99_ms"].as_f64().unwrap();
            assert!(p99 > 0.0 && p99 < 1000.0, "{report}");
            assert!(r["mean_batch_events"].as_f64().unwrap() >= 1.0, "{report}");
        }
        rates
            .iter()
            .map(|r| r["mean_batch_events"].as_f64().unwrap().ln())
            .sum()
    };
    // Each event's latency by stage: the window is the micro-batcher's share.
    let batcher_p50 = |row: &serde_json::Value, i: usize| -> f64 {
        let stages = &row["rates"][i]["stages"];
        for name in ["ingest", "micro-batcher", "scorer", "delivery"] {
            let (p50, p99) = (
                stages[name]["p50_ms"].as_f64().unwrap(),
                stages[name]["p99_ms"].as_f64().unwrap(),
            );
            assert!(0.0 <= p50 && p50 <= p99 && p99 < 1000.0, "{name}: {report}");
        }
        stages["micro-batcher"]["p50_ms"].as_f64().unwrap()
    };
    for i in 0..2 {
        let (short, long) = (batcher_p50(&rows[0], i), batcher_p50(&rows[1], i));
        assert!(
            long >= 25.0 && long > short,
            "a 60 ms window waits: {report}"
        );
    }
    assert!(printed.contains("| 60 | 64 | 50 | "), "{printed}");
    // `--half-peak`: one more run at half the burst's rate, beside the goal there.
    // It is judged by event-to-cache, read back from Redis: each of the 50 sample
    // entities' last write of the run.
    for (row, delay) in rows.iter().zip([5.0, 60.0]) {
        let half = &row["half_peak"];
        let peak = row["throughput_events_per_s"].as_f64().unwrap();
        let rate = half["rate_events_per_s"].as_f64().unwrap();
        assert_eq!(rate, (peak / 2.0).round().max(1.0), "{report}");
        let p99 = half["latency_p99_ms"].as_f64().unwrap();
        assert!(p99 > 0.0 && p99 < 1000.0, "{report}");
        let cache = &half["event_to_cache"];
        let (c50, c99) = (
            cache["p50_ms"].as_f64().unwrap(),
            cache["p99_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < c50 && c50 <= c99 && c99 < 1000.0, "{report}");
        let entities = cache["entities"].as_u64().unwrap();
        assert!((1..=50).contains(&entities), "{report}");
        let goal = half["goal_p99_ms"].as_f64().unwrap();
        assert_eq!(goal, delay + 25.0, "{report}");
        assert_eq!(half["meets_goal"], c99 <= goal, "{report}");
        assert!(
            half["stages"]["micro-batcher"]["p99_ms"].is_f64(),
            "{report}"
        );
        let line = format!(
            "| max_delay_ms {delay}, max_events 64, {rate} events/s | {c99} ms ({entities} entities) | <= {goal} ms | {p99} ms |"
        );
        assert!(printed.contains(&line), "{line} in {printed}");
    }
    // Every run of the sweep reads its own events back from the cache.
    for row in rows {
        for r in row["rates"].as_array().unwrap() {
            assert!(
                r["event_to_cache"]["entities"].as_u64().unwrap() >= 1,
                "{report}"
            );
        }
    }
    // Both hold the loose target; the recommendation is the one that batches more.
    let (short, long) = (batching(&rows[0]), batching(&rows[1]));
    let best = &report["recommended"];
    assert_eq!(best["meets_target"], true, "{report}");
    let expected = if long >= short { 60 } else { 5 };
    assert_eq!(best["max_delay_ms"], expected, "{report}");
    assert!(
        printed.contains(&format!(
            "recommended for p99 <= 1000 ms: micro_batcher.max_delay_ms = {expected}, max_events = 64"
        )),
        "{printed}"
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"), "{picture}");
    assert!(picture.contains("5 ms / 64 events"), "{picture}");
    assert!(picture.contains("60 ms / 64 events"), "{picture}");
    assert!(picture.contains("(recommended)"), "{picture}");
    assert!(picture.contains("model mine v7"), "{picture}");

    // A sample event ingest would dead-letter is refused up front, by line.
    let bad = dir.path().join("bad.jsonl");
    let first = sample.lines().next().unwrap();
    std::fs::write(&bad, format!("{first}\n{{\"features\": {{}}}}\n")).unwrap();
    let refused = run(&bad);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("bad.jsonl line 2"), "{err}");
    assert!(err.contains("MISSING_FIELD"), "{err}");
    // Settings that measure nothing are usage errors.
    for (flag, value) in [("--sizes", "0"), ("--seconds", "0"), ("--rates", "0")] {
        let usage = lane.lanes(&["bench", flag, value]);
        assert_eq!(usage.status.code(), Some(2), "{flag} {value}");
    }
}

/// `lanes bench-window` runs the real window code over a rate sweep: the adaptive
/// window holds its target at every rate, where a fixed window of twice the target
/// misses it on thin traffic and gathers more per batch than a short one under load.
#[test]
fn bench_window_shows_the_adaptive_window_holding_its_target() {
    let lane = Lane::new("bench-window");
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("window.json");
    let printed = ok(&lane.lanes(&[
        "bench-window",
        "--seconds",
        "5",
        "--rates",
        "20,500,20000",
        "--fixed-ms",
        "10,100",
        "--out",
        &json.display().to_string(),
    ]));
    assert!(
        printed.contains("adaptive p99 within target at every rate: yes"),
        "{printed}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let at = |rate: u64, policy: &str, what: &str| {
        rows.iter().find(|r| r["rate"] == rate).unwrap()["policies"][policy][what]
            .as_f64()
            .unwrap()
    };
    let adaptive = "adaptive, target 50 ms";
    for rate in [20, 500, 20000] {
        assert!(at(rate, adaptive, "p99_ms") <= 50.0, "{report}");
    }
    assert!(at(20, "fixed 100 ms", "p99_ms") > 50.0, "{report}");
    assert!(
        at(500, adaptive, "mean_batch") > at(500, "fixed 10 ms", "mean_batch"),
        "{report}"
    );
    let bad = lane.lanes(&["bench-window", "--target-ms", "0"]);
    assert!(!bad.status.success(), "a zero target is refused");
}
