//! The `lanes-schema-registry` binary: flags, config and logging, then
//! [`lanes_schema_registry::run_with`] under the shutdown supervisor.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use lanes_common::shutdown::{self, EXIT_CONFIG, Supervisor};
use lanes_common::{Settings, telemetry};
use lanes_schema_registry::{Credentials, DEFAULT_MAX_BODY_BYTES, ServerOptions, Store};

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
    /// Largest request body accepted, in bytes; larger requests get HTTP 413.
    #[arg(
        long,
        env = "LANES_REGISTRY_MAX_BODY_BYTES",
        default_value_t = DEFAULT_MAX_BODY_BYTES as u64,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_body_bytes: u64,
    /// Require HTTP basic auth on every endpoint, as USER:PASSWORD. Prefer the
    /// environment variable: a flag's value shows in `ps`. The password is never logged.
    #[arg(
        long,
        env = "LANES_REGISTRY_BASIC_AUTH",
        value_name = "USER:PASSWORD",
        hide_env_values = true
    )]
    basic_auth: Option<Hidden>,
}

/// A flag value kept out of `Debug` output and clap's error messages.
#[derive(Clone)]
struct Hidden(String);

impl std::str::FromStr for Hidden {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Hidden(s.to_string()))
    }
}

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[tokio::main]
async fn main() {
    lanes_common::tune_allocator();
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
    let basic_auth = match args.basic_auth.as_ref().map(|h| Credentials::parse(&h.0)) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("lanes-schema-registry: --basic-auth / LANES_REGISTRY_BASIC_AUTH: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let options = ServerOptions {
        max_body_bytes: usize::try_from(args.max_body_bytes).unwrap_or(usize::MAX),
        basic_auth,
    };
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
        lanes_schema_registry::run_with(listener, store, options, token).await?;
        Ok(())
    });
    let exit = supervisor.run(shutdown::signal()).await;
    tracing::info!(?exit, "schema registry stopped");
    std::process::exit(exit.code());
}
