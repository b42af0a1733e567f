//! `lanes-schema-registry`: a Confluent-compatible Schema Registry for the embedded
//! default, where no Confluent or Karapace server can be installed.
//!
//! Requests pass optional basic auth ([`auth`]) and a body-size limit, then arrive at
//! [`api::router_with`], which reads them as Confluent's server does ([`params`]) and
//! calls [`store::Store`]. The store checks compatibility ([`compat`]) and appends every
//! change to a durable log ([`log`]) before applying it to the state in memory
//! ([`state`]), so schema ids survive restarts. Only Avro schemas are stored.
//!
//! The binary's options, besides `--config`, `--listen`, `--data-dir` and `--in-memory`:
//! - `--max-body-bytes N` / `LANES_REGISTRY_MAX_BODY_BYTES` (default 1 MiB): larger
//!   request bodies are answered with 413 and a Confluent error body.
//! - `--basic-auth USER:PASSWORD` / `LANES_REGISTRY_BASIC_AUTH`: every endpoint then
//!   requires HTTP basic auth (401 with `WWW-Authenticate: Basic` otherwise). Prefer
//!   the variable, since a flag's value shows in `ps`; the password is never logged.

pub mod api;
pub mod auth;
pub mod compat;
mod config_api;
pub mod error;
pub mod log;
mod params;
pub mod state;
pub mod store;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::Credentials;
pub use store::Store;

/// Largest request body accepted by default. Avro schemas are a few KiB; a MiB leaves
/// room for generated ones while bounding what one request can make the server buffer.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// How the HTTP server guards itself.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest request body accepted, in bytes; larger ones are answered with 413.
    pub max_body_bytes: usize,
    /// Credentials every request must carry; `None` leaves the API open.
    pub basic_auth: Option<Credentials>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            basic_auth: None,
        }
    }
}

/// Serves the registry API with the default [`ServerOptions`] on `listener` until
/// `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    run_with(listener, store, ServerOptions::default(), shutdown).await
}

/// Serves the registry API on `listener` until `shutdown` is cancelled.
pub async fn run_with(
    listener: TcpListener,
    store: Arc<Store>,
    options: ServerOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        log = ?store.path(),
        max_body_bytes = options.max_body_bytes,
        basic_auth_user = options.basic_auth.as_ref().map(Credentials::user),
        "schema registry listening"
    );
    axum::serve(listener, api::router_with(store, &options))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
