//! The batch lane against the real stack, through the `lanes` binary as an operator
//! runs it: a snapshot of 100k entities fills the cache with one fresh BATCH entry each
//! through the cache-writer, a re-run changes nothing, and bad snapshots fail with a
//! clear message and a non-zero exit.

use std::collections::HashMap;
use std::process::Output;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use lanes_common::generator::Generator;
use lanes_common::model::Model;
use lanes_common::records::now_millis;
use lanes_tests::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every entity's hash, read in pipelines.
async fn dump(lane: &Lane, entities: usize) -> HashMap<String, HashMap<String, String>> {
    let mut redis = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let prefix = &lane.settings.cache_writer.key_prefix;
    let mut all = HashMap::with_capacity(entities);
    for start in (0..entities).step_by(500) {
        let ids: Vec<String> = (start..(start + 500).min(entities))
            .map(|i| format!("card-{i}"))
            .collect();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(format!("{prefix}{id}"));
        }
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut redis).await.unwrap();
        for (id, h) in ids.into_iter().zip(hashes) {
            if !h.is_empty() {
                all.insert(id, h);
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_run_fills_the_cache_once_and_a_rerun_changes_nothing() {
    const N: usize = 100_000;
    let mut lane = Lane::new("batch");
    lane.settings.cache_writer.online_features = false;
    // 100k entries must not outlive the test in a shared Redis.
    lane.settings.cache_writer.ttl_seconds = 900;
    lane.create_topics().await;
    let running = lane.start(&[lanes_cache_writer::def()]);
    running.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("entities.parquet");
    let scored = dir.path().join("scored.parquet");
    let as_of = now_millis() - 60_000;
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    ok(&lane.lanes(&[
        "generate",
        "--entities",
        &N.to_string(),
        "--out",
        &path(&snapshot),
        "--as-of",
        &as_of.to_string(),
    ]));

    let started = now_millis();
    let said = ok(&lane.lanes(&["batch", &path(&snapshot), "--out", &path(&scored)]));
    assert!(said.contains("scored 100000 rows with fraud v1"), "{said}");
    let writes = |result| running.metric("lanes_cache_writer_writes_total", &[("result", result)]);
    wait_for(
        "every prediction cached",
        Duration::from_secs(300),
        || async { (writes("written") >= N as f64).then_some(()) },
    )
    .await;
    assert_eq!(writes("written"), N as f64);
    assert_eq!(writes("stale") + writes("duplicate"), 0.0);
    let before = dump(&lane, N).await;
    assert_eq!(before.len(), N, "one entry per entity");
    assert_eq!(
        cache_keys(&lane.settings).await.len(),
        N,
        "and nothing else"
    );
    let freshness = lane.settings.fallback_responder.freshness_ms;
    let now = now_millis();
    for (entity, h) in &before {
        assert_eq!(h["lane"], "BATCH");
        assert_eq!(h["model_version"], "1");
        assert_eq!(h["event_time"], as_of.to_string());
        assert_eq!(h["event_id"], format!("batch-{entity}-{as_of}"));
        assert_eq!(h["model_name"], "fraud");
        let scored_at: i64 = h["scored_at"].parse().unwrap();
        assert!(
            scored_at >= started && now - scored_at < freshness,
            "{entity} fresh"
        );
    }
    // Scores are the model's own for the snapshot's rows.
    let model = Model::load(&root().join("models/fraud/1")).unwrap();
    for (entity, features) in Generator::snapshot(42, N).take(500) {
        let row: Vec<f32> = features.iter().map(|v| *v as f32).collect();
        let expected = model.score(&row, 1).unwrap()[0];
        let cached: f64 = before[&entity]["score"].parse().unwrap();
        assert!(
            (cached - expected).abs() < 1e-6,
            "{entity}: {cached} vs {expected}"
        );
        assert_eq!(before[&entity]["label"], model.label(cached), "{entity}");
    }
    // The scored rows were also written to Parquet, one per entity.
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&scored).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut rows = 0;
    for batch in reader {
        let batch = batch.unwrap();
        let ids = batch
            .column_by_name("entity_id")
            .unwrap()
            .as_string::<i32>();
        let scores = batch
            .column_by_name("score")
            .unwrap()
            .as_primitive::<Float64Type>();
        let text = |name| batch.column_by_name(name).unwrap().as_string::<i32>();
        let (event_ids, labels, versions) =
            (text("event_id"), text("label"), text("model_version"));
        for i in 0..batch.num_rows() {
            let cached = &before[ids.value(i)];
            assert_eq!(scores.value(i), cached["score"].parse::<f64>().unwrap());
            assert_eq!(event_ids.value(i), cached["event_id"]);
            assert_eq!(labels.value(i), cached["label"]);
            assert_eq!(versions.value(i), cached["model_version"]);
        }
        rows += batch.num_rows();
    }
    assert_eq!(rows, N);

    // A second run of the same snapshot is a duplicate everywhere.
    ok(&lane.lanes(&["batch", &path(&snapshot)]));
    wait_for(
        "the re-run is consumed",
        Duration::from_secs(300),
        || async { (writes("duplicate") >= N as f64).then_some(()) },
    )
    .await;
    assert_eq!(writes("written"), N as f64);
    assert_eq!(dump(&lane, N).await, before, "the re-run changed the cache");
    running.stop().await;
    delete_cache(&lane.settings).await;
}

#[tokio::test]
async fn bad_snapshots_fail_with_the_reason() {
    let lane = Lane::new("bad-snapshot");
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let header = "entity_id,event_time,amount,hour,merchant_risk,distance_km,txn_count_1h,avg_amount_30d,amount_ratio,card_age_days,is_foreign,is_online";
    let cases = [
        (
            dir.path().join("missing.csv").to_str().unwrap().to_string(),
            "No such file",
        ),
        (
            file("garbage.parquet", "not parquet at all"),
            "not a readable Parquet file",
        ),
        (file("snapshot.json", "{}"), "cannot tell the format"),
        (
            file(
                "no-amount.csv",
                &format!(
                    "{}\ncard-1,1,2,3,4,5,6,7,8,9,1\n",
                    header.replace(",amount", "")
                ),
            ),
            "missing column \"amount\", a feature of the model",
        ),
        (
            file(
                "text.csv",
                &format!("{header}\ncard-1,1,lots,3,0.1,5,6,7,8,9,1,0\n"),
            ),
            "Error while parsing value",
        ),
        (
            file(
                "no-time.csv",
                &format!(
                    "{}\ncard-1,2,3,0.1,5,6,7,8,9,1,0\n",
                    header.replace(",event_time", "")
                ),
            ),
            "or pass --as-of",
        ),
    ];
    for (path, expected) in cases {
        let out = lane.lanes(&["batch", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{path}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{path}: expected {expected:?} in {stderr}"
        );
    }

    // A model whose model.toml does not match its graph is refused before scoring.
    let good = file(
        "good.csv",
        &format!("{header}\ncard-1,1,2,3,0.1,5,6,7,8,9,1,0\n"),
    );
    let model = tempfile::tempdir().unwrap();
    let source = root().join("models/fraud/1");
    std::fs::copy(source.join("model.onnx"), model.path().join("model.onnx")).unwrap();
    let toml = std::fs::read_to_string(source.join("model.toml"))
        .unwrap()
        .replace("output = \"probabilities\"", "output = \"scores\"");
    std::fs::write(model.path().join("model.toml"), toml).unwrap();
    let mut mismatched = lane.clone();
    mismatched.settings.model.dir = model.path().to_path_buf();
    let out = mismatched.lanes(&["batch", &good]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no output named \"scores\""), "{stderr}");

    // The same file scores once the model fits (a dry run needs no broker).
    let said = ok(&lane.lanes(&["batch", &good, "--dry-run"]));
    assert!(said.contains("scored 1 rows"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_batch_runs_every_interval_and_stops_on_sigterm() {
    let lane = Lane::new("batch-every");
    lane.create_topics().await;
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("entities.csv");
    let snapshot = snapshot.to_str().unwrap();
    ok(&lane.lanes(&["generate", "--entities", "200", "--out", snapshot]));
    let mut job = lane.spawn("lanes", &["batch", snapshot, "--every", "1s"]);
    let url = format!(
        "http://127.0.0.1:{}/metrics",
        lane.settings.admin.ports.batch
    );
    let runs = wait_for("two scheduled runs", Duration::from_secs(60), || async {
        let text = http().get(&url).send().await.ok()?.text().await.ok()?;
        let value = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        let ok = value("lanes_batch_runs_total{outcome=\"ok\"}")?;
        (ok >= 2.0).then(|| (ok, value("lanes_batch_rows_total")))
    })
    .await;
    assert!(runs.1.unwrap() >= 400.0, "{runs:?}");
    signal(&job, "TERM");
    let status = tokio::task::spawn_blocking(move || job.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_anywhere_stops_the_run_before_anything_is_published() {
    let lane = Lane::new("batch-precheck");
    lane.create_topics().await;
    let dir = tempfile::tempdir().unwrap();
    let header = "entity_id,event_time,amount,hour,merchant_risk,distance_km,txn_count_1h,avg_amount_30d,amount_ratio,card_age_days,is_foreign,is_online";
    let now = lanes_common::records::now_millis();
    let mut text = format!("{header}\n");
    for i in 0..300 {
        text.push_str(&format!("card-{i},{now},2,3,0.1,5,6,7,8,9,1,0\n"));
    }
    // The last row claims a time an hour ahead: it would pin card-x's cache entry.
    text.push_str(&format!(
        "card-x,{},2,3,0.1,5,6,7,8,9,1,0\n",
        now + 3_600_000
    ));
    let path = dir.path().join("late-row.csv");
    std::fs::write(&path, &text).unwrap();
    let out = lane.lanes(&["batch", path.to_str().unwrap(), "--batch-size", "16"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("row 301") && stderr.contains("ahead"),
        "{stderr}"
    );
    // The last row's id is longer than the cache takes: the cache-writer would refuse
    // it after the first 300 were published.
    let mut text: String = text.lines().take(301).map(|l| format!("{l}\n")).collect();
    text.push_str(&format!(
        "card-{},{now},2,3,0.1,5,6,7,8,9,1,0\n",
        "x".repeat(508)
    ));
    let path = dir.path().join("long-id.csv");
    std::fs::write(&path, text).unwrap();
    let out = lane.lanes(&["batch", path.to_str().unwrap(), "--batch-size", "16"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("row 301")
            && stderr.contains("entity_id of 513 bytes is over 512, the longest the cache takes"),
        "{}",
        &stderr[..stderr.len().min(2000)]
    );
    let predictions = consumer(&lane.settings, &[&lane.settings.topics.predictions]);
    let got = tokio::time::timeout(Duration::from_secs(5), predictions.recv()).await;
    assert!(got.is_err(), "nothing is published: {got:?}");
}
