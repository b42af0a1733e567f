//! Plumbing every Lanes service shares.
//!
//! A service loads [`config::Settings`] (defaults -> file -> `LANES__` environment), calls
//! [`telemetry::init`], builds its Kafka clients with [`kafka`], reads and writes Avro
//! records ([`records`]) in the Confluent wire format through [`avro::AvroCodec`], sends
//! records it can never process to the dead-letter topic with [`dlq::DlqWriter`], serves
//! [`admin`] endpoints, and runs its tasks under a [`shutdown::Supervisor`]. Input
//! offsets are committed only after the output is acknowledged, tracked by
//! [`kafka::OffsetTracker`]. Every streaming service is a [`stage::Stage`] run by
//! [`stage::run`], the one consume / decode / produce / acknowledge / commit loop;
//! [`error::Failure`] says whether a failure is poison, transient or fatal, and
//! [`retry`] waits out the transient ones.

pub mod admin;
pub mod avro;
pub mod cache;
pub mod config;
pub mod dlq;
pub mod error;
pub mod failpoint;
pub mod generator;
pub mod kafka;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod process;
pub mod producer;
pub mod records;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod source;
pub mod stage;
pub mod telemetry;

pub use config::Settings;

/// Every Lanes process allocates through mimalloc: the per-message allocations of the
/// Kafka and Avro plumbing cost markedly less CPU than with glibc's allocator
/// (`lanes bench-cpu`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A map looked up once or more per message (offsets, schema ids, held inputs): keyed
/// by topics, partitions and ids of our own, hashed with aHash, which costs a fraction
/// of the standard SipHash on such keys.
pub type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
