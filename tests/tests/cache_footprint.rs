//! What a cache entry costs Redis under the Redis settings Lanes ships
//! (`docker-compose.yml`): an entity's prediction and online features, written by the
//! real scripts, stay one listpack, about half the size of the hashtable Redis's default
//! `hash-max-listpack-value` (64 bytes, less than the features' JSON) turns it into.

use lanes_common::cache::{self, FEATURES_IF_NEWER, WRITE_IF_NEWER};
use lanes_common::generator::Generator;
use lanes_tests::*;

/// The Redis arguments `docker-compose.yml` gives its `redis` service.
fn compose_redis_args() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc["services"]["redis"]["command"]
        .as_sequence()
        .expect("the redis service has a command list")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Writes one generated entity as the cache-writer does (features, then its prediction)
/// and answers its hash encoding and `MEMORY USAGE` in bytes.
async fn write_entity(
    conn: &mut redis::aio::MultiplexedConnection,
    generator: &mut Generator,
) -> (String, u64) {
    let prefix = "lanes:prediction:";
    let sample = generator.next_sample();
    let features = sample.feature_map();
    let mut p = prediction_now(&sample.entity_id, 0.123_456_789_012_345_67);
    p.label = Some("fraud".into());
    let reply = cache::write_features(
        &redis::Script::new(FEATURES_IF_NEWER),
        prefix,
        [(sample.entity_id.as_str(), &features, p.event_time)],
        0,
    )
    .invoke(conn)
    .await
    .unwrap();
    assert!(cache::replies(reply, 1).unwrap()[0].is_ok());
    let reply = cache::write_predictions(
        &redis::Script::new(WRITE_IF_NEWER),
        prefix,
        [(&p, false)],
        0,
    )
    .invoke(conn)
    .await
    .unwrap();
    assert_eq!(
        cache::replies(reply, 1).unwrap()[0].as_ref().ok(),
        Some(&cache::Written::Written)
    );
    let key = cache::key(prefix, &sample.entity_id);
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(&key)
        .query_async(conn)
        .await
        .unwrap();
    let bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(conn)
        .await
        .unwrap();
    (encoding, bytes)
}

async fn set_listpack_value(conn: &mut redis::aio::MultiplexedConnection, bytes: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("hash-max-listpack-value")
        .arg(bytes)
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_entry_stays_a_listpack_under_the_shipped_redis_settings() {
    let args = compose_redis_args();
    let at = args
        .iter()
        .position(|a| a == "--hash-max-listpack-value")
        .expect("docker-compose.yml sets hash-max-listpack-value for Redis");
    let limit = &args[at + 1];
    let port = free_port();
    let _redis = redis_server(port);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut generator = Generator::new(7, 100);

    set_listpack_value(&mut conn, limit).await;
    let (shipped, shipped_bytes) = write_entity(&mut conn, &mut generator).await;
    assert_eq!(shipped, "listpack", "at hash-max-listpack-value {limit}");

    // Redis's default, which the features' JSON outgrows.
    set_listpack_value(&mut conn, "64").await;
    let (default, default_bytes) = write_entity(&mut conn, &mut generator).await;
    assert_eq!(default, "hashtable");
    // About half (584 bytes against 1,160 when this was written).
    assert!(
        shipped_bytes * 10 < default_bytes * 6,
        "listpack {shipped_bytes} bytes, hashtable {default_bytes}"
    );
}
