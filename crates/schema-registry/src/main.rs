use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use lanes_common::shutdown::{self, EXIT_CONFIG, Supervisor};
use lanes_common::{Settings, telemetry};
use lanes_schema_registry::Store;

/// Confluent-compatible Schema Registry for the Lanes embedded default.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Config file layered over the defaults (else $LANES_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: schema_registry.listen].
    #[arg(long)]
    listen: Option<String>,
    /// Folder of the durable log [default: schema_registry.data_dir].
    #[arg(long, conflicts_with = "in_memory")]
    data_dir: Option<PathBuf>,
    /// Keep schemas in memory only; they are lost on exit.
    #[arg(long)]
    in_memory: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let settings = match Settings::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lanes-schema-registry: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if let Err(e) = telemetry::init(&settings.log) {
        eprintln!("lanes-schema-registry: {e}");
        std::process::exit(EXIT_CONFIG);
    }
    let listen = args
        .listen
        .unwrap_or(settings.schema_registry.listen.clone());
    let store = if args.in_memory {
        Store::in_memory()
    } else {
        let dir = args
            .data_dir
            .unwrap_or(settings.schema_registry.data_dir.clone());
        match Store::open(&dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot open the registry log");
                std::process::exit(EXIT_CONFIG);
            }
        }
    };
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot listen");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let mut supervisor = Supervisor::new(settings.shutdown.drain_timeout());
    let token = supervisor.token();
    let store = Arc::new(store);
    supervisor.spawn("http", async move {
        lanes_schema_registry::run(listener, store, token).await?;
        Ok(())
    });
    let exit = supervisor.run(shutdown::signal()).await;
    tracing::info!(?exit, "schema registry stopped");
    std::process::exit(exit.code());
}
