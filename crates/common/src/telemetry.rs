//! Tracing set-up: human or JSON lines on stderr, filtered by `log.level`. librdkafka's
//! own log lines arrive through rdkafka's `tracing` feature under the `rdkafka` target.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `log.level` so an
/// operator can turn up one module without editing config. Safe to call twice (tests).
pub fn init(cfg: &LogConfig) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives),
        _ => EnvFilter::try_new(&cfg.level),
    }
    .map_err(|e| format!("log.level {:?}: {e}", cfg.level))?;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match cfg.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    // A second init in one process (tests, `lanes up`) keeps the first subscriber.
    let _ = result;
    Ok(())
}
