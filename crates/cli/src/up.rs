//! `lanes up`: every service in one process, the embedded default. Each keeps its own
//! consumer group and task; one supervisor stops them all on a signal or a failure, and
//! one admin server reports their metrics and readiness together.

use lanes_common::Settings;
use lanes_common::admin::{self, ReadinessCheck};
use lanes_common::service::{dependency_checks, host};
use lanes_common::shutdown::{self, EXIT_CONFIG, Supervisor};
use prometheus::Registry;

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
    let consumer = match lanes_common::service::consumer_metrics(&registry) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register metrics");
            return EXIT_CONFIG;
        }
    };
    let token = supervisor.token();
    let ready = host(
        &settings,
        &lanes_services::all(),
        &registry,
        &consumer,
        &token,
        |name, fut| supervisor.spawn(name, fut),
    );
    checks.extend(
        ready
            .into_iter()
            .map(|r| Box::new(r) as Box<dyn ReadinessCheck>),
    );
    let app = admin::router(registry, checks);
    supervisor.spawn("admin", async move {
        Ok(admin::serve(listener, app, token).await?)
    });
    let exit = supervisor.run(shutdown::signal()).await;
    tracing::info!(?exit, "lanes up stopped");
    exit.code()
}
