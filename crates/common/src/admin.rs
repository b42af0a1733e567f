//! The admin HTTP server every service runs: `/metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (every dependency answers and the service says
//! it is ready).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::{BoxFuture, join_all};
use prometheus::{Encoder, Registry, TextEncoder};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{KafkaConfig, RegistryConfig};

/// How long one readiness probe may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a probe of the dependencies answers later `/readyz` calls. Each probe opens
/// a Redis connection and asks the registry and the brokers (on a blocking thread): a
/// flood of calls, one probe each, would take connections from the services' own.
const PROBE_REUSE: Duration = Duration::from_secs(1);

/// One dependency or condition `/readyz` asks about.
pub trait ReadinessCheck: Send + Sync {
    fn name(&self) -> &str;
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
    /// A dependency outside the process: its refusals are logged for the operator.
    fn is_dependency(&self) -> bool {
        true
    }
}

/// A condition the service sets itself, e.g. "model loaded" or "partitions assigned".
#[derive(Debug, Clone)]
pub struct ReadyFlag {
    name: String,
    ready: Arc<AtomicBool>,
}

impl ReadyFlag {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    pub fn is_set(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

impl ReadinessCheck for ReadyFlag {
    fn name(&self) -> &str {
        &self.name
    }
    fn is_dependency(&self) -> bool {
        false
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if self.is_set() {
                Ok(())
            } else {
                Err("not yet".into())
            }
        })
    }
}

/// The brokers answer a metadata request.
pub struct KafkaCheck {
    consumer: Arc<BaseConsumer>,
}

impl KafkaCheck {
    pub fn new(cfg: &KafkaConfig) -> rdkafka::error::KafkaResult<Self> {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &cfg.bootstrap_servers)
            .set("client.id", "lanes-readiness");
        for (k, v) in &cfg.properties {
            c.set(k, v);
        }
        Ok(Self {
            consumer: Arc::new(c.create()?),
        })
    }
}

impl ReadinessCheck for KafkaCheck {
    fn name(&self) -> &str {
        "kafka"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let consumer = self.consumer.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                consumer
                    .fetch_metadata(None, CHECK_TIMEOUT)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

/// The schema registry answers `GET /subjects`: any user may ask (a registry with access
/// rules lists only the subjects the user may read; Karapace answers 401 to `/config`
/// without a grant on it), and [`PROBE_REUSE`] bounds how often the list is read.
pub struct RegistryCheck {
    client: reqwest::Client,
    url: String,
    auth: Option<(String, Option<String>)>,
}

impl RegistryCheck {
    pub fn new(cfg: &RegistryConfig) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(CHECK_TIMEOUT)
                .build()
                .expect("a default HTTP client builds"),
            url: format!("{}/subjects", cfg.url.trim_end_matches('/')),
            auth: cfg.basic_auth_user.clone().map(|u| {
                (
                    u,
                    cfg.basic_auth_password
                        .as_ref()
                        .map(|p| p.expose().to_string()),
                )
            }),
        }
    }
}

impl ReadinessCheck for RegistryCheck {
    fn name(&self) -> &str {
        "schema_registry"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut req = self.client.get(&self.url);
            if let Some((u, p)) = &self.auth {
                req = req.basic_auth(u, p.as_ref());
            }
            let resp = req.send().await.map_err(|e| e.to_string())?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {}", resp.status()))
            }
        })
    }
}

/// Redis answers `PING`.
pub struct RedisCheck {
    client: redis::Client,
}

impl RedisCheck {
    pub fn new(cfg: &crate::config::RedisConfig) -> redis::RedisResult<Self> {
        Ok(Self {
            client: crate::cache::client(cfg)?,
        })
    }
}

impl ReadinessCheck for RedisCheck {
    fn name(&self) -> &str {
        "redis"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self
                .client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    checks: Arc<Vec<Box<dyn ReadinessCheck>>>,
    /// The last probe of the dependencies, and when it ended; locked while one runs, so
    /// calls meanwhile wait for it.
    probed: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, Outcomes)>>>,
    /// [`PROBE_REUSE`], but in tests.
    reuse: Duration,
}

/// Each check's name and outcome.
type Outcomes = Arc<Vec<(String, Result<(), String>)>>;

/// The admin routes, for tests and for servers that add their own.
pub fn router(registry: Registry, checks: Vec<Box<dyn ReadinessCheck>>) -> Router {
    router_reusing(registry, checks, PROBE_REUSE)
}

/// [`router`], reusing a probe of the dependencies for `reuse`.
fn router_reusing(
    registry: Registry,
    checks: Vec<Box<dyn ReadinessCheck>>,
    reuse: Duration,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            registry,
            checks: Arc::new(checks),
            probed: Arc::default(),
            reuse,
        })
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], buf).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let dependencies = dependencies(&state).await;
    // The service's own conditions are read each time, after any wait; they cost nothing.
    let own = outcomes(state.checks.iter().filter(|c| !c.is_dependency())).await;
    let results = own.iter().chain(dependencies.iter());
    let ready = results.clone().all(|(_, r)| r.is_ok());
    let checks: serde_json::Map<String, serde_json::Value> = results
        .map(|(name, r)| {
            let says = r.as_ref().err().map_or("ok", String::as_str);
            (name.clone(), says.into())
        })
        .collect();
    let body = serde_json::json!({ "ready": ready, "checks": checks });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// The dependencies' outcomes: of a probe that ended within the reuse window, or of a
/// new one. The probe runs in a task of its own that keeps the lock, so a caller that
/// gives up (a probe's own timeout) neither cancels it nor loses its outcome for the
/// callers waiting behind it.
async fn dependencies(state: &AdminState) -> Outcomes {
    let mut probed = state.probed.clone().lock_owned().await;
    if let Some((at, outcomes)) = probed.as_ref()
        && at.elapsed() < state.reuse
    {
        return outcomes.clone();
    }
    let checks = state.checks.clone();
    let probe = tokio::spawn(async move {
        let outcomes = outcomes(checks.iter().filter(|c| c.is_dependency())).await;
        for (name, r) in &outcomes {
            if let Err(e) = r {
                tracing::warn!(dependency = %name, error = %e, "dependency refused or unreachable; not ready");
            }
        }
        let outcomes = Arc::new(outcomes);
        *probed = Some((tokio::time::Instant::now(), outcomes.clone()));
        outcomes
    });
    match probe.await {
        Ok(outcomes) => outcomes,
        Err(e) => Arc::new(vec![("readiness".into(), Err(e.to_string()))]),
    }
}

/// Runs `checks` at once, each within [`CHECK_TIMEOUT`].
async fn outcomes<'a>(
    checks: impl Iterator<Item = &'a Box<dyn ReadinessCheck>>,
) -> Vec<(String, Result<(), String>)> {
    join_all(checks.map(|c| async move {
        let outcome = match tokio::time::timeout(CHECK_TIMEOUT, c.check()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        };
        (c.name().to_string(), outcome)
    }))
    .await
}

/// Binds `host:port`; port 0 picks a free one.
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((host, port)).await
}

/// Serves `app` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "admin server listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::IntCounter;

    struct Failing;
    impl ReadinessCheck for Failing {
        fn name(&self) -> &str {
            "dependency"
        }
        fn check(&self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async { Err("connection refused".into()) })
        }
    }

    /// A dependency that answers after a while, counting its probes.
    struct Counted(Arc<std::sync::atomic::AtomicUsize>, Duration);
    impl ReadinessCheck for Counted {
        fn name(&self) -> &str {
            "counted"
        }
        fn check(&self) -> BoxFuture<'_, Result<(), String>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Box::pin(async {
                tokio::time::sleep(self.1).await;
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn calls_at_once_share_one_probe_of_the_dependencies() {
        let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flag = ReadyFlag::new("started");
        let checks: Vec<Box<dyn ReadinessCheck>> = vec![
            Box::new(flag.clone()),
            Box::new(Counted(probes.clone(), Duration::from_millis(50))),
        ];
        let (url, token) = start_reusing(checks, Duration::from_secs(600)).await;
        let http = reqwest::Client::new();
        let calls = (0..50).map(|_| http.get(format!("{url}/readyz")).send());
        for r in join_all(calls).await {
            assert_eq!(r.unwrap().status(), 503, "not started");
        }
        assert_eq!(probes.load(Ordering::Relaxed), 1);
        // The service's own flag is read each time, the probe's outcome reused.
        flag.set(true);
        let r = http.get(format!("{url}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(probes.load(Ordering::Relaxed), 1);
        token.cancel();
        // Past the reuse window, each call probes again.
        let checks: Vec<Box<dyn ReadinessCheck>> =
            vec![Box::new(Counted(probes.clone(), Duration::ZERO))];
        let (url, token) = start_reusing(checks, Duration::ZERO).await;
        for _ in 0..2 {
            let r = http.get(format!("{url}/readyz")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
        assert_eq!(probes.load(Ordering::Relaxed), 3);
        token.cancel();
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_leaves_the_probe_to_the_next() {
        let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let checks: Vec<Box<dyn ReadinessCheck>> = vec![Box::new(Counted(
            probes.clone(),
            Duration::from_millis(500),
        ))];
        let (url, token) = start_reusing(checks, Duration::from_secs(600)).await;
        let http = reqwest::Client::new();
        let gave_up = http
            .get(format!("{url}/readyz"))
            .timeout(Duration::from_millis(100))
            .send()
            .await;
        assert!(gave_up.is_err());
        let r = http.get(format!("{url}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(probes.load(Ordering::Relaxed), 1, "the first probe went on");
        token.cancel();
    }

    /// Serves `checks` alone, reusing a probe of the dependencies for `reuse`.
    async fn start_reusing(
        checks: Vec<Box<dyn ReadinessCheck>>,
        reuse: Duration,
    ) -> (String, CancellationToken) {
        start(router_reusing(Registry::new(), checks, reuse)).await
    }

    async fn start(app: Router) -> (String, CancellationToken) {
        let listener = bind("127.0.0.1", 0).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let token = CancellationToken::new();
        tokio::spawn(serve(listener, app, token.clone()));
        (url, token)
    }

    #[tokio::test]
    async fn metrics_health_and_readiness() {
        let registry = Registry::new();
        let counter = IntCounter::new("lanes_test_things_total", "Things.").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc_by(3);
        let flag = ReadyFlag::new("model");
        let (url, token) = start(router(registry, vec![Box::new(flag.clone())])).await;
        let http = reqwest::Client::new();

        let metrics = http.get(format!("{url}/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), 200);
        assert!(
            metrics.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        assert!(
            metrics
                .text()
                .await
                .unwrap()
                .contains("lanes_test_things_total 3")
        );

        assert_eq!(
            http.get(format!("{url}/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );

        let not_ready = http.get(format!("{url}/readyz")).send().await.unwrap();
        assert_eq!(not_ready.status(), 503);
        let body: serde_json::Value = not_ready.json().await.unwrap();
        assert_eq!(body["checks"]["model"], "not yet");

        flag.set(true);
        let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        token.cancel();
    }

    #[tokio::test]
    async fn one_failing_dependency_makes_the_service_unready() {
        let flag = ReadyFlag::new("started");
        flag.set(true);
        let (url, token) = start(router(
            Registry::new(),
            vec![Box::new(flag), Box::new(Failing)],
        ))
        .await;
        let resp = reqwest::get(format!("{url}/readyz")).await.unwrap();
        assert_eq!(resp.status(), 503);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["ready"], false);
        assert_eq!(body["checks"]["started"], "ok");
        assert_eq!(body["checks"]["dependency"], "connection refused");
        token.cancel();
    }
}
