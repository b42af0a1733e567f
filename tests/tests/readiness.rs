//! `/readyz` probes against the real dependencies, and against dead ports.

use lanes_common::admin::{KafkaCheck, ReadinessCheck, RedisCheck, RegistryCheck};
use lanes_common::config::{KafkaConfig, RegistryConfig};
use lanes_tests::*;

#[tokio::test]
async fn probes_pass_when_dependencies_answer() {
    let s = settings();
    KafkaCheck::new(&s.kafka).unwrap().check().await.unwrap();
    RegistryCheck::new(&s.registry).check().await.unwrap();
    RedisCheck::new(&s.redis).unwrap().check().await.unwrap();
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
    let redis = lanes_common::config::RedisConfig {
        url: format!("redis://{}", dead_address()),
        tls_ca_file: None,
    };
    assert!(RedisCheck::new(&redis).unwrap().check().await.is_err());
}

/// A CA and a server certificate it signed for 127.0.0.1, in `dir`: (ca, cert, key).
fn certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| dir.join(n);
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=lanes-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    (p("ca.pem"), p("server.pem"), p("server.key"))
}

/// A Redis of the test's own with an ACL user `lanes`/`secret` and the default user off;
/// over TLS when `tls` names a certificate and key.
fn acl_redis(
    port: u16,
    tls: Option<(&std::path::Path, &std::path::Path, &std::path::Path)>,
) -> RedisGuard {
    let mut cmd = std::process::Command::new("redis-server");
    match tls {
        Some((ca, cert, key)) => {
            cmd.args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(ca);
        }
        None => {
            cmd.args(["--port", &port.to_string()]);
        }
    }
    let child = cmd
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args([
            "--user", "lanes", "on", ">secret", "~*", "&*", "+@all", "--user", "default", "off",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    RedisGuard(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_is_written_over_tls_as_an_acl_user() {
    use redis::AsyncCommands;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let port = free_port();
    let _redis = acl_redis(port, Some((&ca, &cert, &key)));
    let mut lane = Lane::new("redis-tls");
    lane.settings.redis = lanes_common::config::RedisConfig {
        url: format!("rediss://lanes:secret@127.0.0.1:{port}"),
        tls_ca_file: Some(ca.clone()),
    };
    RedisCheck::new(&lane.settings.redis)
        .unwrap()
        .check()
        .await
        .unwrap();
    let wrong = lanes_common::config::RedisConfig {
        url: format!("rediss://lanes:wrong@127.0.0.1:{port}"),
        ..lane.settings.redis.clone()
    };
    let e = RedisCheck::new(&wrong).unwrap().check().await.unwrap_err();
    assert!(e.to_lowercase().contains("authentication"), "{e}");
    let untrusted = lanes_common::config::RedisConfig {
        tls_ca_file: None,
        ..lane.settings.redis.clone()
    };
    assert!(
        RedisCheck::new(&untrusted).unwrap().check().await.is_err(),
        "a private CA is not trusted by default"
    );

    lane.create_topics().await;
    let running = lane.start(&[lanes_cache_writer::def()]);
    running.ready().await;
    let codec = lanes_common::avro::AvroCodec::new(&lane.settings.registry).unwrap();
    let p = prediction_now("over-tls", 0.75);
    let topic = &lane.settings.topics.predictions;
    produce(
        &producer(&lane.settings),
        topic,
        b"over-tls",
        &codec.encode(topic, &p).await.unwrap(),
    )
    .await;
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{}over-tls", lane.settings.cache_writer.key_prefix);
    wait_for(
        "the prediction cached over TLS",
        std::time::Duration::from_secs(30),
        || {
            let (mut r, key) = (r.clone(), key.clone());
            async move {
                r.hget::<_, _, Option<String>>(&key, "score")
                    .await
                    .unwrap()
                    .filter(|s| s == "0.75")
            }
        },
    )
    .await;
    let _: () = r.del(&key).await.unwrap();
    running.stop().await;
}

/// `/readyz` of a spawned service: (ready, body).
async fn readyz(port: u16) -> Option<(bool, serde_json::Value)> {
    let r = http()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .ok()?;
    let ready = r.status().is_success();
    Some((ready, r.json().await.ok()?))
}

/// A flood of `/readyz` calls probes the dependencies once: each probe opens a Redis
/// connection (and asks the registry and the brokers), so two hundred calls at once
/// took two hundred connections from the Redis the service writes to.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_readiness_calls_probes_the_dependencies_once() {
    let port = free_port();
    let _own = redis_server(port);
    let mut lane = Lane::new("readyz-flood");
    lane.settings.redis.url = format!("redis://127.0.0.1:{port}");
    lane.create_topics().await;
    let _writer = lane.spawn("lanes-cache-writer", &[]);
    let admin = lane.settings.admin.ports.cache_writer;
    wait_for("ready", std::time::Duration::from_secs(30), || async {
        readyz(admin).await.filter(|(ready, _)| *ready)
    })
    .await;
    let mut conn = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut connections = async || {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = connections().await;
    let answers = futures::future::join_all((0..200).map(|_| readyz(admin))).await;
    let opened = connections().await - before;
    assert!(
        answers.iter().all(|a| matches!(a, Some((true, _)))),
        "every call answered ready"
    );
    // One probe, and one more if the calls outlast a window.
    assert!(opened <= 3, "{opened} Redis connections for 200 calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_keep_a_service_not_ready_and_consuming_nothing() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let port = free_port();
    let _redis = acl_redis(port, None);
    let dir = tempfile::tempdir().unwrap();
    let registry_port = free_port();
    let mut lane = Lane::new("refused");
    lane.settings.redis.url = format!("redis://lanes:wrong@127.0.0.1:{port}");
    lane.settings.schema_registry.listen = format!("127.0.0.1:{registry_port}");
    lane.settings.schema_registry.data_dir = dir.path().to_path_buf();
    lane.create_topics().await;
    // A registry that wants credentials, asked with the wrong ones.
    let mut registry = lane.clone();
    registry.settings.registry.url = format!("http://127.0.0.1:{registry_port}");
    let _registry = std::process::Command::new(bin("lanes-schema-registry"))
        .envs(registry.env())
        .env("LANES_REGISTRY_BASIC_AUTH", "lanes:secret")
        .stdout(std::process::Stdio::null())
        .spawn()
        .map(Proc)
        .unwrap();
    let mut ingest_lane = lane.clone();
    ingest_lane.settings.registry.url = registry.settings.registry.url.clone();
    ingest_lane.settings.registry.basic_auth_user = Some("lanes".into());
    ingest_lane.settings.registry.basic_auth_password =
        Some(lanes_common::config::Secret::new("wrong"));
    lane.publish_raw(
        &producer(&lane.settings),
        // A valid event: passing it on needs the registry.
        &[lanes_common::generator::Generator::new(5, 1)
            .next_sample()
            .raw_json()],
    )
    .await;

    let started = std::time::Instant::now();
    let _writer = lane.spawn("lanes-cache-writer", &[]);
    let _ingest = ingest_lane.spawn("lanes-ingest", &[]);
    for (port, dependency, says) in [
        (
            lane.settings.admin.ports.cache_writer,
            "redis",
            "authentication",
        ),
        (
            ingest_lane.settings.admin.ports.ingest,
            "schema_registry",
            "401",
        ),
    ] {
        let body = wait_for(dependency, std::time::Duration::from_secs(10), || async {
            readyz(port)
                .await
                .filter(|(ready, _)| !ready)
                .map(|(_, b)| b)
        })
        .await;
        let why = body["checks"][dependency]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(why.contains(says), "{dependency}: {body}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    // Nothing consumed: the services' groups committed nothing.
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &lane.settings.kafka.bootstrap_servers)
        .set("group.id", &lane.settings.ingest.group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..lane.settings.kafka.partitions {
        tpl.add_partition(&lane.settings.topics.raw, p);
    }
    let committed = c
        .committed_offsets(tpl, std::time::Duration::from_secs(10))
        .unwrap();
    assert!(
        committed
            .elements()
            .iter()
            .all(|e| !matches!(e.offset(), rdkafka::Offset::Offset(o) if o > 0)),
        "{committed:?}"
    );
}

#[tokio::test]
async fn the_admin_server_listens_on_loopback_only_by_default() {
    assert_eq!(settings().admin.host, "127.0.0.1");
    let lane = Lane::new("admin-bind");
    let _ingest = lane.spawn("lanes-ingest", &[]);
    let port = lane.settings.admin.ports.ingest;
    // /proc/net/tcp: local address as hex IPv4:port, state 0A = LISTEN.
    let listening = wait_for(
        "the admin port",
        std::time::Duration::from_secs(30),
        || async {
            let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
            let mine: Vec<String> = table
                .lines()
                .skip(1)
                .filter_map(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    let (addr, state) = (cols.get(1)?, cols.get(3)?);
                    let (ip, p) = addr.split_once(':')?;
                    (u16::from_str_radix(p, 16).ok()? == port && *state == "0A")
                        .then(|| ip.to_string())
                })
                .collect();
            (!mine.is_empty()).then_some(mine)
        },
    )
    .await;
    assert_eq!(listening, vec!["0100007F".to_string()], "127.0.0.1 only");
}

/// Each process turns transparent huge pages off for itself first thing
/// (`lanes_common::tune_allocator`): with them, its allocator's arena costs 2 MiB per
/// small heap touched.
#[tokio::test]
async fn services_and_the_cli_run_without_transparent_huge_pages() {
    let lane = Lane::new("no-thp");
    let ports = &lane.settings.admin.ports;
    for (binary, args, port, secs) in [
        ("lanes-ingest", &[][..], ports.ingest, 30),
        ("lanes-cache-writer", &[], ports.cache_writer, 30),
        ("lanes", &["up"], ports.up, 60),
    ] {
        let proc = lane.spawn(binary, args);
        let pid = proc.id();
        let seen = wait_for(binary, std::time::Duration::from_secs(secs), || async {
            // Ready means main has long run.
            readyz(port).await.filter(|(ready, _)| *ready)?;
            lanes_common::process::status_field(pid, "THP_enabled")
        })
        .await;
        assert_eq!(seen, "0", "{binary} {args:?}: THP_enabled");
    }
}
