//! Plumbing every Lanes service shares.
//!
//! A service loads [`config::Settings`] (defaults -> file -> `LANES__` environment), calls
//! [`telemetry::init`], builds its Kafka clients with [`kafka`], reads and writes Avro
//! records ([`records`]) in the Confluent wire format through [`avro::AvroCodec`], sends
//! records it can never process to the dead-letter topic with [`dlq::DlqWriter`], serves
//! [`admin`] endpoints, and runs its tasks under a [`shutdown::Supervisor`]. Input
//! offsets are committed only after the output is acknowledged, tracked by
//! [`kafka::OffsetTracker`].

pub mod admin;
pub mod avro;
pub mod config;
pub mod dlq;
pub mod generator;
pub mod kafka;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod records;
pub mod service;
pub mod shutdown;
pub mod source;
pub mod telemetry;

pub use config::Settings;
