//! How a Lanes service runs: alone as its own binary ([`main`]) or beside the others in
//! `lanes up`. Either way it gets a [`ServiceContext`] (config, metrics registry,
//! shutdown token, readiness flag) and returns when the token is cancelled and its work
//! is drained and committed.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use clap::Parser;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, KafkaCheck, ReadinessCheck, ReadyFlag, RedisCheck, RegistryCheck};
use crate::producer::Producers;
use crate::shutdown::{self, EXIT_CONFIG, Supervisor};
use crate::{Settings, telemetry};

/// What a running service is handed.
#[derive(Clone)]
pub struct ServiceContext {
    pub settings: Settings,
    pub metrics: Registry,
    pub shutdown: CancellationToken,
    /// Set once the service is doing its job (model loaded, consumer started).
    pub ready: ReadyFlag,
    /// Lag and rebalances, shared by the services of one process.
    pub consumer: ConsumerMetrics,
    /// Producers, shared by the services of one process.
    pub producers: Producers,
}

/// Metrics of every consuming service in a process, labelled by service.
#[derive(Clone)]
pub struct ConsumerMetrics {
    /// `lanes_consumer_lag_messages{service,topic,partition}`, from librdkafka statistics.
    pub lag: IntGaugeVec,
    /// `lanes_consumer_rebalances_total{service,kind}`: partitions assigned or revoked.
    /// Flat through an outage means the members stayed in their groups.
    pub rebalances: IntCounterVec,
    /// `lanes_consumer_assigned_partitions{service,topic}`: partitions this member owns.
    pub assigned: IntGaugeVec,
    /// `lanes_consumer_offset_gaps_total{service,topic,outcome}`: gaps in a partition's
    /// offsets, fetched again (`refetched`) or, still there after `runner.gap_wait_ms`,
    /// stepped over (`skipped`: those records were not read).
    pub gaps: IntCounterVec,
}

/// Registers the consumer metrics; once per registry.
pub fn consumer_metrics(registry: &Registry) -> prometheus::Result<ConsumerMetrics> {
    let lag = IntGaugeVec::new(
        Opts::new(
            "lanes_consumer_lag_messages",
            "Messages behind the partition's end, per consuming service (librdkafka statistics).",
        ),
        &["service", "topic", "partition"],
    )?;
    let rebalances = IntCounterVec::new(
        Opts::new(
            "lanes_consumer_rebalances_total",
            "Rebalances a consuming service took part in, by kind (assigned, revoked).",
        ),
        &["service", "kind"],
    )?;
    let assigned = IntGaugeVec::new(
        Opts::new(
            "lanes_consumer_assigned_partitions",
            "Partitions of a topic this member of its consumer group owns now.",
        ),
        &["service", "topic"],
    )?;
    let gaps = IntCounterVec::new(
        Opts::new(
            "lanes_consumer_offset_gaps_total",
            "Gaps in a partition's offsets a consuming service met, by outcome (refetched, skipped).",
        ),
        &["service", "topic", "outcome"],
    )?;
    registry.register(Box::new(gaps.clone()))?;
    registry.register(Box::new(lag.clone()))?;
    registry.register(Box::new(rebalances.clone()))?;
    registry.register(Box::new(assigned.clone()))?;
    Ok(ConsumerMetrics {
        lag,
        rebalances,
        assigned,
        gaps,
    })
}

pub type ServiceFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A service as every host sees it (its binary, `lanes up`, benchmarks, tests).
#[derive(Clone, Copy)]
pub struct ServiceDef {
    pub name: &'static str,
    pub admin_port: fn(&Settings) -> u16,
    pub needs_redis: bool,
    /// The (consumer group, topic) pairs it reads, for lag and status.
    pub inputs: fn(&Settings) -> Vec<(String, String)>,
    /// Its consumer group's setting, so a namespace can rename it.
    pub group: fn(&mut Settings) -> &mut String,
    pub run: fn(ServiceContext) -> ServiceFuture,
}

/// Starts `defs` the one way every host does: each gets its context (these settings,
/// the shared registry and lag gauge, `shutdown`, its own readiness flag) and its future
/// goes to `spawn`. Returns the readiness flags, in order.
pub fn host(
    settings: &Settings,
    defs: &[ServiceDef],
    metrics: &Registry,
    consumer: &ConsumerMetrics,
    shutdown: &CancellationToken,
    mut spawn: impl FnMut(&'static str, ServiceFuture),
) -> Vec<ReadyFlag> {
    let producers = Producers::new(match defs {
        [one] => format!("lanes-{}", one.name),
        _ => "lanes-up".to_string(),
    });
    defs.iter()
        .map(|def| {
            let ready = ReadyFlag::new(def.name);
            let ctx = ServiceContext {
                settings: settings.for_service(def.name),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
                ready: ready.clone(),
                consumer: consumer.clone(),
                producers: producers.clone(),
            };
            spawn(def.name, (def.run)(ctx));
            ready
        })
        .collect()
}

/// Readiness checks for the service's dependencies.
pub fn dependency_checks(
    settings: &Settings,
    needs_redis: bool,
) -> anyhow::Result<Vec<Box<dyn ReadinessCheck>>> {
    let mut checks: Vec<Box<dyn ReadinessCheck>> = vec![
        Box::new(KafkaCheck::new(&settings.kafka)?),
        Box::new(RegistryCheck::new(&settings.registry)),
    ];
    if needs_redis {
        checks.push(Box::new(RedisCheck::new(&settings.redis)?));
    }
    Ok(checks)
}

#[derive(Debug, Parser)]
struct Args {
    /// Config file layered over the defaults (else $LANES_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Tunes the allocator, loads config and logging for a binary; exits with code 2 on bad
/// configuration.
pub fn load_or_exit(binary: &str, config: Option<&std::path::Path>) -> Settings {
    crate::tune_allocator();
    let settings = Settings::load(config).unwrap_or_else(|e| {
        eprintln!("{binary}: {e}");
        std::process::exit(EXIT_CONFIG);
    });
    if let Err(e) = telemetry::init(&settings.log) {
        eprintln!("{binary}: {e}");
        std::process::exit(EXIT_CONFIG);
    }
    tracing::info!(config = %settings.redacted(), "configuration loaded");
    crate::failpoint::setup();
    settings
}

/// The whole `main` of a service binary: config, logging, admin server, the service
/// under a supervisor that stops on SIGINT/SIGTERM. Returns the exit code.
pub async fn main(def: ServiceDef) -> i32 {
    let args = Args::parse();
    let binary = format!("lanes-{}", def.name);
    let settings = load_or_exit(&binary, args.config.as_deref());
    let registry = Registry::new();
    let mut supervisor = Supervisor::new(settings.shutdown.drain_timeout());
    let checks = match dependency_checks(&settings, def.needs_redis) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build readiness checks");
            return EXIT_CONFIG;
        }
    };
    let port = (def.admin_port)(&settings);
    let listener = match admin::bind(&settings.admin.host, port).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(port, error = %e, "cannot bind the admin port");
            return EXIT_CONFIG;
        }
    };
    let consumer = match consumer_metrics(&registry) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register metrics");
            return EXIT_CONFIG;
        }
    };
    let token = supervisor.token();
    let ready = host(
        &settings,
        &[def],
        &registry,
        &consumer,
        &token,
        |name, fut| supervisor.spawn(name, fut),
    );
    let mut all: Vec<Box<dyn ReadinessCheck>> = ready
        .into_iter()
        .map(|r| Box::new(r) as Box<dyn ReadinessCheck>)
        .collect();
    all.extend(checks);
    let app = admin::router(registry.clone(), all);
    supervisor.spawn("admin", async move {
        Ok(admin::serve(listener, app, token).await?)
    });
    let exit = supervisor.run(shutdown::signal()).await;
    tracing::info!(?exit, "{binary} stopped");
    exit.code()
}
