//! Model rollout against the real stack: a new version is picked up mid-stream by the
//! scorer and the fallback-responder without a restart, every batch is scored by one
//! version, nothing is lost, a corrupt version is refused while the old one serves, and
//! a shadow version scores every batch without reaching the cache.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lanes_common::avro::AvroCodec;
use lanes_common::generator::{Generator, Sample};
use lanes_common::kafka::{delivered, enqueue};
use lanes_common::model::Model;
use lanes_common::records::{Lane as LaneKind, PredictionRequest, PredictionResponse, now_millis};
use lanes_tests::*;
use rdkafka::Message;
use rdkafka::producer::FutureRecord;
use redis::AsyncCommands;

/// A models folder holding `fraud/1`, copied from the repository's model.
fn models() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fraud");
    std::fs::create_dir(&root).unwrap();
    add_version(&root, "1", None);
    (dir, root)
}

/// Deploys `version` as an operator should: written to a hidden folder, then renamed.
/// `onnx` replaces the model file (a corrupt one); the graph is version 1's otherwise.
fn add_version(folder: &Path, version: &str, onnx: Option<&[u8]>) {
    let source = root().join("models/fraud/1");
    let staging = folder.join(format!(".{version}"));
    std::fs::create_dir(&staging).unwrap();
    match onnx {
        Some(bytes) => std::fs::write(staging.join("model.onnx"), bytes).unwrap(),
        None => {
            std::fs::copy(source.join("model.onnx"), staging.join("model.onnx")).unwrap();
        }
    }
    let toml = std::fs::read_to_string(source.join("model.toml"))
        .unwrap()
        .replace("version = \"1\"", &format!("version = \"{version}\""));
    std::fs::write(staging.join("model.toml"), toml).unwrap();
    std::fs::rename(&staging, folder.join(version)).unwrap();
}

async fn publish(lane: &Lane, producer: &lanes_common::producer::Producer, samples: &[Sample]) {
    let lines: Vec<String> = samples.iter().map(Sample::raw_json).collect();
    lane.publish_raw(producer, &lines).await;
}

/// The fallback-responder's answer to a miss carrying features.
async fn ask(lane: &Lane, features: BTreeMap<String, f64>) -> PredictionResponse {
    let s = &lane.settings;
    let responses = consumer(s, &[&s.topics.responses]);
    let codec = AvroCodec::new(&s.registry).unwrap();
    let req = PredictionRequest {
        request_id: unique("req"),
        entity_id: unique("new-card"),
        features: Some(features),
        max_age_ms: None,
        reply_topic: None,
        requested_at: now_millis(),
        stale_while_refresh: None,
    };
    let bytes = codec.encode(&s.topics.requests, &req).await.unwrap();
    let record = FutureRecord::to(&s.topics.requests)
        .key(req.entity_id.as_str())
        .payload(&bytes);
    delivered(enqueue(&producer(s), record).await.unwrap())
        .await
        .unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), responses.recv())
            .await
            .expect("a response in time")
            .unwrap();
        let r = codec
            .decode::<PredictionResponse>(m.payload().unwrap_or_default())
            .await
            .unwrap()
            .record;
        if r.request_id == req.request_id {
            return r;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_version_is_picked_up_mid_stream_and_a_corrupt_one_is_refused() {
    let (_models, root) = models();
    let mut lane = Lane::new("reload");
    lane.settings.model.dir = root.clone();
    lane.settings.model.version = "latest".into();
    lane.settings.model.watch_interval_ms = 100;
    lane.create_topics().await;
    let running = lane.start(&all_services());
    running.ready().await;
    let reloads = |service: &str, outcome: &str| {
        running.metric(
            &format!("lanes_{service}_model_reloads_total"),
            &[("outcome", outcome)],
        )
    };
    let producer = producer(&lane.settings);
    let samples: Vec<Sample> = Generator::new(21, 300).take(3000).collect();
    let ids: HashSet<String> = samples.iter().map(|s| s.event_id.clone()).collect();

    // Traffic keeps flowing while version 2 is deployed.
    for slice in samples[..1000].chunks(100) {
        publish(&lane, &producer, slice).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    add_version(&root, "2", None);
    for slice in samples[1000..2000].chunks(100) {
        publish(&lane, &producer, slice).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for service in ["scorer", "fallback_responder"] {
        wait_for("version 2 loaded", Duration::from_secs(30), || async {
            (reloads(service, "loaded") >= 1.0).then_some(())
        })
        .await;
    }
    // A corrupt version 3 is refused; version 2 keeps serving.
    add_version(&root, "3", Some(b"not an onnx graph"));
    for service in ["scorer", "fallback_responder"] {
        wait_for("version 3 refused", Duration::from_secs(30), || async {
            (reloads(service, "refused") >= 1.0).then_some(())
        })
        .await;
    }
    publish(&lane, &producer, &samples[2000..]).await;

    // The scorer's predictions; the responder also re-scores old-version cache entries
    // (REALTIME) on its own schedule.
    let all: Vec<_> = lane
        .predictions_until(&lane.settings.topics.predictions, &ids)
        .await
        .into_iter()
        .filter(|(_, _, p)| p.lane == LaneKind::Stream)
        .collect();
    let versions: HashSet<&str> = all
        .iter()
        .map(|(_, _, p)| p.model_version.as_str())
        .collect();
    assert_eq!(
        versions,
        HashSet::from(["1", "2"]),
        "every prediction names one of the two"
    );
    // Each batch is scored by exactly one version.
    let mut by_batch: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (_, _, p) in &all {
        by_batch
            .entry(p.batch_id.as_deref().unwrap())
            .or_default()
            .insert(&p.model_version);
    }
    assert!(
        by_batch.values().all(|v| v.len() == 1),
        "a batch mixed versions"
    );
    // One scorer switches once: in each partition, version 1 then version 2, never back.
    let mut ordered = all.clone();
    ordered.sort_by_key(|(partition, offset, _)| (*partition, *offset));
    for pair in ordered.windows(2) {
        let ((pa, _, a), (pb, _, b)) = (&pair[0], &pair[1]);
        assert!(
            pa != pb || !(a.model_version == "2" && b.model_version == "1"),
            "partition {pa} went back from version 2 to 1"
        );
    }
    // Events published after the refusal were scored by version 2.
    let late: HashSet<&str> = samples[2000..]
        .iter()
        .map(|s| s.event_id.as_str())
        .collect();
    assert!(
        all.iter()
            .filter(|(_, _, p)| late.contains(p.event_id.as_str()))
            .all(|(_, _, p)| p.model_version == "2")
    );
    for service in ["scorer", "fallback_responder"] {
        assert_eq!(reloads(service, "loaded"), 1.0, "{service} switched once");
        assert_eq!(
            reloads(service, "refused"),
            1.0,
            "{service} refused version 3 once"
        );
        let info = |v| running.metric(&format!("lanes_{service}_model_info"), &[("version", v)]);
        assert_eq!((info("1"), info("2"), info("3")), (0.0, 1.0, 0.0));
    }
    // The fallback-responder scores a miss with version 2 too.
    let answer = ask(&lane, samples[0].feature_map()).await;
    assert_eq!(answer.model_version.as_deref(), Some("2"));
    running.stop().await;

    // A restart with the corrupt version still the highest serves version 2, not nothing.
    let restarted = lane.start(&[lanes_scorer::def()]);
    restarted.ready().await;
    let info = |v| restarted.metric("lanes_scorer_model_info", &[("version", v)]);
    assert_eq!((info("2"), info("3")), (1.0, 0.0));
    assert_eq!(
        restarted.metric(
            "lanes_scorer_model_reloads_total",
            &[("outcome", "refused")]
        ),
        1.0
    );
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_version_scores_every_batch_and_never_reaches_the_cache() {
    let (_models, root) = models();
    add_version(&root, "2", None);
    let mut lane = Lane::new("shadow");
    lane.settings.model.dir = root.clone();
    lane.settings.model.version = "1".into();
    lane.settings.model.shadow_version = "2".into();
    lane.create_topics().await;
    let running = lane.start(&streaming_services());
    running.ready().await;
    let samples: Vec<Sample> = Generator::new(22, 50).take(400).collect();
    let ids: HashSet<String> = samples.iter().map(|s| s.event_id.clone()).collect();
    publish(&lane, &producer(&lane.settings), &samples).await;

    let served = lane
        .predictions_until(&lane.settings.topics.predictions, &ids)
        .await;
    let shadow = lane
        .predictions_until(&lane.settings.topics.shadow_predictions, &ids)
        .await;
    assert!(served.iter().all(|(_, _, p)| p.model_version == "1"));
    assert!(shadow.iter().all(|(_, _, p)| p.model_version == "2"));
    // The same graph: the shadow agrees with the served model row for row.
    let served_scores: HashMap<&str, f64> = served
        .iter()
        .map(|(_, _, p)| (p.event_id.as_str(), p.score))
        .collect();
    for (_, _, p) in &shadow {
        assert_eq!(p.score, served_scores[p.event_id.as_str()]);
    }
    assert!(running.metric("lanes_scorer_shadow_rows_total", &[("outcome", "scored")]) >= 400.0);
    assert_eq!(
        running.metric("lanes_scorer_shadow_model_info", &[("version", "2")]),
        1.0
    );

    // The cache holds only the served version.
    let entities: HashSet<&str> = samples.iter().map(|s| s.entity_id.as_str()).collect();
    let mut redis = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    wait_for("cache filled", Duration::from_secs(60), || {
        let mut redis = redis.clone();
        let entities = entities.clone();
        let prefix = lane.settings.cache_writer.key_prefix.clone();
        async move {
            for e in &entities {
                let v: Option<String> = redis
                    .hget(format!("{prefix}{e}"), "model_version")
                    .await
                    .unwrap();
                v?;
            }
            Some(())
        }
    })
    .await;
    for e in &entities {
        let v: String = redis
            .hget(
                format!("{}{e}", lane.settings.cache_writer.key_prefix),
                "model_version",
            )
            .await
            .unwrap();
        assert_eq!(v, "1", "{e}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_that_cannot_publish_never_holds_up_the_served_predictions() {
    let (_models, root) = models();
    add_version(&root, "2", None);
    let mut lane = Lane::new("shadow-refused");
    lane.settings.model.dir = root.clone();
    lane.settings.model.version = "1".into();
    lane.settings.model.shadow_version = "2".into();
    lane.create_topics().await;
    // The shadow topic's subject holds another schema: every shadow publish is refused.
    let subject = format!("{}-value", lane.settings.topics.shadow_predictions);
    occupy_subject(&lane.settings, &subject).await;
    let running = lane.start(&streaming_services());
    running.ready().await;
    let samples: Vec<Sample> = Generator::new(23, 50).take(300).collect();
    let ids: HashSet<String> = samples.iter().map(|s| s.event_id.clone()).collect();
    publish(&lane, &producer(&lane.settings), &samples).await;
    let served = lane
        .predictions_until(&lane.settings.topics.predictions, &ids)
        .await;
    assert!(served.iter().all(|(_, _, p)| p.model_version == "1"));
    running
        .wait_metric(
            "lanes_scorer_shadow_rows_total",
            &[("outcome", "failed")],
            1.0,
        )
        .await;
    assert_eq!(
        running.metric("lanes_scorer_shadow_rows_total", &[("outcome", "scored")]),
        0.0
    );
    running.stop().await;
}

/// Writes a one-node ONNX graph with Python's `onnx`: input `input` [N, 10] float32,
/// output `probabilities` [N, 2] as `kind` makes it.
fn write_graph(dir: &Path, kind: &str) {
    let script = r#"
import sys, numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
kind, path = sys.argv[1], sys.argv[2]
x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 10])
w = numpy_helper.from_array(np.zeros((10, 2), dtype=np.float32), "w")
nodes = [helper.make_node("MatMul", ["input", "w"], ["mm"])]
inits = [w]
if kind == "float64":
    nodes.append(helper.make_node("Cast", ["mm"], ["probabilities"], to=TensorProto.DOUBLE))
    out = helper.make_tensor_value_info("probabilities", TensorProto.DOUBLE, [None, 2])
elif kind == "nan":
    inits.append(numpy_helper.from_array(np.array([float("nan")], dtype=np.float32), "nan"))
    nodes.append(helper.make_node("Add", ["mm", "nan"], ["probabilities"]))
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])
elif kind == "zipmap":
    # skl2onnx's default export: probabilities as a sequence of maps.
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    X = np.random.RandomState(0).rand(40, 10).astype(np.float32)
    clf = LogisticRegression().fit(X, (X[:, 0] > 0.5).astype(int))
    m = convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 10]))])
    onnx.save(m, path)
    sys.exit(0)
elif kind == "vector":
    nodes.append(helper.make_node("ReduceSum", ["mm"], ["probabilities"], keepdims=0))
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None])
g = helper.make_graph(nodes, "g", [x], [out], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
onnx.save(m, path)
"#;
    let out = std::process::Command::new(python())
        .args(["-c", script, kind, dir.join("model.onnx").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = std::fs::read_to_string(root().join("models/fraud/1/model.toml")).unwrap();
    let toml = match kind {
        "zipmap" => toml.replace(
            "output = \"probabilities\"",
            "output = \"output_probability\"",
        ),
        _ => toml,
    };
    std::fs::write(dir.join("model.toml"), toml).unwrap();
}

#[test]
fn model_outputs_lanes_cannot_read_are_refused_and_non_finite_scores_are_errors() {
    for (kind, says) in [
        ("float64", "Lanes reads float32"),
        ("vector", "cannot read"),
        ("zipmap", "zipmap=False"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_graph(dir.path(), kind);
        let e = Model::load(dir.path()).expect_err(kind).to_string();
        assert!(e.contains(says), "{kind}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    write_graph(dir.path(), "nan");
    let model = Model::load(dir.path()).expect("a NaN model loads: its graph fits");
    let e = model
        .score(&[1.0; 20], 2)
        .expect_err("NaN scores are refused")
        .to_string();
    assert!(e.contains("non-finite"), "{e}");
}

/// What a rollout under request load looked like, window by window.
struct Rollout {
    /// The lowest share of fresh answers in any window of at least 20 lookups Redis
    /// answered after the deploy.
    min_fresh_share: f64,
    /// The most requests per second answered by real-time scoring after the deploy.
    max_realtime_per_s: f64,
    /// The most model runs per second (requests and the sweep) after the deploy.
    max_scorings_per_s: f64,
    /// Whether every sampled cache entry was on version 2 by the end.
    came_over: bool,
}

const ROLLOUT_ENTITIES: usize = 300;
const ROLLOUT_RATE: usize = 200;
const SWEEP_PER_S: u64 = 100;

/// Deploys version 2 under `ROLLOUT_RATE` requests/s over a cache of version-1 entries,
/// with the responder and the cache-writer running and `grace_ms` of rollout grace.
async fn roll_out(grace_ms: u64, watch_for: Duration) -> Rollout {
    let (_models, folder) = models();
    let mut lane = Lane::new("rollout");
    lane.settings.model.dir = folder.clone();
    lane.settings.model.watch_interval_ms = 200;
    let r = &mut lane.settings.fallback_responder;
    r.freshness_ms = 600_000;
    r.refresh_after_ms = 600_000;
    r.rollout_grace_ms = grace_ms;
    r.sweep_interval_ms = 500;
    r.sweep_max_per_second = SWEEP_PER_S;
    r.sample_interval_ms = 300;
    r.realtime_deadline_ms = 5_000;
    // A loaded CI machine can take Redis past the default 100 ms; a lookup that times out
    // (and the breaker it opens) says nothing of the rollout.
    r.redis_timeout_ms = 2_000;
    lane.create_topics().await;

    // A warm cache of version-1 entries, each with the online features it was scored from.
    let mut redis = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let now = now_millis();
    let entities: Vec<String> = (0..ROLLOUT_ENTITIES).map(|i| format!("ro-{i}")).collect();
    for (e, sample) in entities.iter().zip(Generator::new(31, ROLLOUT_ENTITIES)) {
        let key = format!("{}{e}", lane.settings.cache_writer.key_prefix);
        let t = (now - 5_000).to_string();
        let fields = [
            ("score", "0.5".to_string()),
            ("model_name", "fraud".into()),
            ("model_version", "1".into()),
            ("event_id", unique("seed")),
            ("event_time", t.clone()),
            ("scored_at", (now - 1_000).to_string()),
            ("lane", "STREAM".into()),
            (
                "features",
                serde_json::to_string(&sample.feature_map()).unwrap(),
            ),
            ("features_event_time", t),
        ];
        let _: () = redis.hset_multiple(&key, &fields).await.unwrap();
    }
    let running = lane.start(&[lanes_fallback_responder::def(), lanes_cache_writer::def()]);
    running.ready().await;

    // Requests at ROLLOUT_RATE per second over the entities, until told to stop.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (lane, stop, entities) = (lane.clone(), stop.clone(), entities.clone());
        tokio::spawn(async move {
            let s = &lane.settings;
            let codec = AvroCodec::new(&s.registry).unwrap();
            let producer = producer(s);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0usize;
            while !stop.is_cancelled() {
                tick.tick().await;
                let mut pending = Vec::new();
                for _ in 0..ROLLOUT_RATE / 10 {
                    let req = PredictionRequest {
                        request_id: unique("ro"),
                        entity_id: entities[n * 7919 % entities.len()].clone(),
                        features: None,
                        max_age_ms: None,
                        reply_topic: None,
                        requested_at: now_millis(),
                        stale_while_refresh: None,
                    };
                    n += 1;
                    let bytes = codec.encode(&s.topics.requests, &req).await.unwrap();
                    let record = FutureRecord::to(&s.topics.requests)
                        .key(req.entity_id.as_str())
                        .payload(&bytes);
                    pending.push(enqueue(&producer, record).await.unwrap());
                }
                for d in pending {
                    delivered(d).await.unwrap();
                }
            }
        })
    };
    let lookups = |result: &str| {
        running.metric(
            "lanes_fallback_responder_cache_lookups_total",
            &[("result", result)],
        )
    };
    // Lookups Redis answered: the share is of those, as a timeout is not a stale entry.
    let all_lookups = || {
        running.metric("lanes_fallback_responder_cache_lookups_total", &[]) - lookups("unavailable")
    };
    let realtime = || {
        running.metric(
            "lanes_fallback_responder_outcomes_total",
            &[("outcome", "realtime")],
        )
    };
    let scorings = || running.metric("lanes_fallback_responder_scorings_total", &[]);
    wait_for(
        "answers from the warm cache",
        Duration::from_secs(60),
        || async { (lookups("fresh") >= 200.0).then_some(()) },
    )
    .await;
    assert_eq!(realtime(), 0.0, "a warm cache needs no real-time scoring");

    add_version(&folder, "2", None);
    let mut rollout = Rollout {
        min_fresh_share: 1.0,
        max_realtime_per_s: 0.0,
        max_scorings_per_s: 0.0,
        came_over: false,
    };
    let window = Duration::from_secs(1);
    let until = tokio::time::Instant::now() + watch_for;
    let mut last = (all_lookups(), lookups("fresh"), realtime(), scorings());
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(window).await;
        let now = (all_lookups(), lookups("fresh"), realtime(), scorings());
        let looked = now.0 - last.0;
        if looked >= 20.0 {
            rollout.min_fresh_share = rollout.min_fresh_share.min((now.1 - last.1) / looked);
        }
        rollout.max_realtime_per_s = rollout.max_realtime_per_s.max(now.2 - last.2);
        rollout.max_scorings_per_s = rollout.max_scorings_per_s.max(now.3 - last.3);
        last = now;
        rollout.came_over = running.metric("lanes_fallback_responder_serving_version_share", &[])
            == 1.0
            && running.metric("lanes_fallback_responder_model_info", &[("version", "2")]) == 1.0;
        if rollout.came_over {
            break;
        }
    }
    stop.cancel();
    load.await.unwrap();
    running.stop().await;
    eprintln!(
        "rollout with grace {grace_ms} ms: lowest fresh share {:.3}, at most {} real-time answers/s and {} model runs/s, cache came over: {}",
        rollout.min_fresh_share,
        rollout.max_realtime_per_s,
        rollout.max_scorings_per_s,
        rollout.came_over
    );
    rollout
}

/// A deploy under request load is no stale storm: while version 2 takes over, version
/// 1's entries are answered fresh (with their version) for the grace period, the sweep
/// brings the cache over at its rate, the share of fresh answers never drops under the
/// hit-ratio floor, and real-time scoring stays within its bound. Without the grace the
/// same deploy sends every request to real-time scoring, which the check catches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_under_load_keeps_answers_fresh_and_real_time_bounded() {
    let floor = lanes_common::Settings::load_from(None, HashMap::new())
        .unwrap()
        .fallback_responder
        .hit_ratio_floor;
    let graced = roll_out(120_000, Duration::from_secs(60)).await;
    assert!(
        graced.came_over,
        "the sweep brought the cache over to version 2"
    );
    assert!(
        graced.min_fresh_share >= floor,
        "fresh share fell to {:.2} during the rollout, under the floor {floor}",
        graced.min_fresh_share
    );
    let realtime_bound = (1.0 - floor) * ROLLOUT_RATE as f64;
    assert!(
        graced.max_realtime_per_s <= realtime_bound,
        "{} requests/s scored in real time, over {realtime_bound}",
        graced.max_realtime_per_s
    );
    // The sweep's rate, allowing for a pass that ends inside one window and the next
    // one starting in it.
    let scoring_bound = 2.0 * SWEEP_PER_S as f64 + realtime_bound;
    assert!(
        graced.max_scorings_per_s <= scoring_bound,
        "{} model runs/s, over {scoring_bound}",
        graced.max_scorings_per_s
    );

    let storm = roll_out(0, Duration::from_secs(5)).await;
    assert!(
        storm.min_fresh_share < floor && storm.max_realtime_per_s > realtime_bound,
        "without grace the deploy is a stale storm: fresh share {:.2}, {} real-time/s",
        storm.min_fresh_share,
        storm.max_realtime_per_s
    );
}
