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
mod queue;
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
/// default, a second, left memory a service had already freed during a drain in its
/// peak RSS; 10 ms (mimalloc 2's default) cost no CPU we could measure
/// (`lanes bench-cpu`, with and without `--per-service`).
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Sets memory options for a long-running process; every binary calls it first.
///
/// - mimalloc's purge delay, to [`PURGE_DELAY_MS`];
/// - no transparent huge pages for this process. mimalloc asks for them on its whole
///   arena, and each small heap a thread touches then costs 2 MiB: the services' peak
///   RSS under a drain was a third to a half higher with them.
///
/// `MIMALLOC_PURGE_DELAY` and `MIMALLOC_ALLOW_THP`, when set, still decide.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option, which mimalloc reads atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: integer arguments only; at worst it fails (old kernel) and nothing changes.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

/// A map looked up once or more per message (offsets, schema ids, held inputs): keyed
/// by topics, partitions and ids of our own, hashed with aHash, which costs a fraction
/// of the standard SipHash on such keys.
pub type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

#[cfg(test)]
mod tests {
    /// The option set is the purge delay: mimalloc's default for it is a second, which
    /// no neighbouring option has, and it reads back as set. Huge pages are off for the
    /// process, as the kernel reports it.
    #[test]
    #[allow(unsafe_code)]
    fn tune_allocator_sets_the_purge_delay_and_turns_huge_pages_off() {
        // SAFETY: reads an integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        let thp = || {
            crate::process::status_field(std::process::id(), "THP_enabled")
                .expect("THP_enabled in /proc/self/status")
        };
        let preset = std::env::var("MIMALLOC_PURGE_DELAY").ok();
        match &preset {
            None => assert_eq!(get(), 1000, "mimalloc's own purge delay"),
            Some(v) => assert_eq!(get().to_string(), *v),
        }
        let thp_preset = std::env::var_os("MIMALLOC_ALLOW_THP").is_some();
        if !thp_preset {
            assert_eq!(thp(), "1", "huge pages allowed before");
        }
        super::tune_allocator();
        match preset {
            None => assert_eq!(get(), 10),
            Some(v) => assert_eq!(get().to_string(), v, "the environment still decides"),
        }
        if !thp_preset {
            assert_eq!(thp(), "0", "huge pages off after");
        }
    }
}
