//! `lanes-schema-registry`: a Confluent-compatible Schema Registry for the embedded
//! default, where no Confluent or Karapace server can be installed.
//!
//! Requests arrive at [`api::router`], which validates them and calls [`store::Store`];
//! the store checks compatibility ([`compat`]) and appends every change to a durable log
//! before applying it, so schema ids survive restarts. Only Avro schemas are stored.

pub mod api;
pub mod compat;
pub mod error;
pub mod store;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use store::Store;

/// Serves the registry API on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), log = ?store.path(), "schema registry listening");
    axum::serve(listener, api::router(store))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
