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

/// `mi_option_purge_delay` in mimalloc's option enum (libmimalloc-sys names no constant).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// How long mimalloc keeps freed memory before giving it back to the system. Its own
/// default, a second, left tens of MiB a service had already freed during a drain in
/// its peak RSS; 10 ms (mimalloc 2's default) cost no CPU we could measure
/// (`lanes bench-cpu`, with and without `--per-service`).
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Sets the allocator's options for a long-running process; every binary calls it
/// first. `MIMALLOC_PURGE_DELAY`, when set, still decides.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option, which mimalloc reads atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// A map looked up once or more per message (offsets, schema ids, held inputs): keyed
/// by topics, partitions and ids of our own, hashed with aHash, which costs a fraction
/// of the standard SipHash on such keys.
pub type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

#[cfg(test)]
mod tests {
    /// The option set is the purge delay: mimalloc's default for it is a second, which
    /// no neighbouring option has, and it reads back as set.
    #[test]
    #[allow(unsafe_code)]
    fn tune_allocator_sets_the_purge_delay() {
        // SAFETY: reads an integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        let preset = std::env::var("MIMALLOC_PURGE_DELAY").ok();
        match &preset {
            None => assert_eq!(get(), 1000, "mimalloc's own purge delay"),
            Some(v) => assert_eq!(get().to_string(), *v),
        }
        super::tune_allocator();
        match preset {
            None => assert_eq!(get(), 10),
            Some(v) => assert_eq!(get().to_string(), v, "the environment still decides"),
        }
    }
}
