//! `/readyz` probes against the real dependencies, and against dead ports.

use lanes_common::admin::{KafkaCheck, ReadinessCheck, RedisCheck, RegistryCheck};
use lanes_common::config::{KafkaConfig, RegistryConfig};
use lanes_tests::*;

#[tokio::test]
async fn probes_pass_when_dependencies_answer() {
    let s = settings();
    KafkaCheck::new(&s.kafka).unwrap().check().await.unwrap();
    RegistryCheck::new(&s.registry).check().await.unwrap();
    RedisCheck::new(&s.redis.url)
        .unwrap()
        .check()
        .await
        .unwrap();
}

#[tokio::test]
async fn probes_fail_when_dependencies_are_gone() {
    let s = settings();
    let kafka = KafkaConfig {
        bootstrap_servers: dead_address(),
        ..s.kafka.clone()
    };
    assert!(KafkaCheck::new(&kafka).unwrap().check().await.is_err());
    let registry = RegistryConfig {
        url: format!("http://{}", dead_address()),
        ..s.registry.clone()
    };
    assert!(RegistryCheck::new(&registry).check().await.is_err());
    let redis = format!("redis://{}", dead_address());
    assert!(RedisCheck::new(&redis).unwrap().check().await.is_err());
}
