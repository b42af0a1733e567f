//! `lanes up`: every service in one process, the embedded default. Each keeps its own
//! consumer group and task; one supervisor stops them all on a signal or a failure, and
//! one admin server reports their metrics and readiness together.

use lanes_common::Settings;
use lanes_common::admin::{self, ReadinessCheck, ReadyFlag};
use lanes_common::service::{ServiceContext, ServiceDef, dependency_checks};
use lanes_common::shutdown::{self, EXIT_CONFIG, Supervisor};
use prometheus::Registry;

/// The services `lanes up` runs, upstream first.
pub fn services() -> [ServiceDef; 5] {
    [
        lanes_ingest::def(),
        lanes_micro_batcher::def(),
        lanes_scorer::def(),
        lanes_cache_writer::def(),
        lanes_fallback_responder::def(),
    ]
}

pub async fn run(settings: Settings) -> i32 {
    tracing::info!(config = %settings.redacted(), "configuration loaded");
    let registry = Registry::new();
    let mut supervisor = Supervisor::new(settings.shutdown.drain_timeout());
    let mut checks: Vec<Box<dyn ReadinessCheck>> = match dependency_checks(&settings, true) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build readiness checks");
            return EXIT_CONFIG;
        }
    };
    let listener = match admin::bind(&settings.admin.host, settings.admin.ports.up).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(port = settings.admin.ports.up, error = %e, "cannot bind the admin port");
            return EXIT_CONFIG;
        }
    };
    let lag = match lanes_common::service::lag_gauge(&registry) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register metrics");
            return EXIT_CONFIG;
        }
    };
    for def in services() {
        let ready = ReadyFlag::new(def.name);
        checks.push(Box::new(ready.clone()));
        let ctx = ServiceContext {
            lag: lag.clone(),
            settings: settings.clone(),
            metrics: registry.clone(),
            shutdown: supervisor.token(),
            ready,
        };
        supervisor.spawn(def.name, (def.run)(ctx));
    }
    let token = supervisor.token();
    let app = admin::router(registry, checks);
    supervisor.spawn("admin", async move {
        Ok(admin::serve(listener, app, token).await?)
    });
    let exit = supervisor.run(shutdown::signal()).await;
    tracing::info!(?exit, "lanes up stopped");
    exit.code()
}
