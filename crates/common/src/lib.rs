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
pub mod features;
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

/// Every Lanes process allocates through jemalloc. Records are copied out of librdkafka
/// on polling threads and freed on the runtime's workers; jemalloc's thread caches took
/// the allocator from 19% to 11% of `lanes up`'s samples in a drain, where mimalloc paid
/// for collecting those frees (docs/performance.md). `_RJEM_MALLOC_CONF` tunes it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sets memory options for a long-running process; every binary calls it first.
///
/// No transparent huge pages for this process, whatever the kernel's mode or an
/// allocator asks: each small heap a thread touches would then cost 2 MiB (under
/// mimalloc, which asked for them, the services' peak RSS under a drain was a third to
/// a half higher). `LANES_ALLOW_THP`, when set, leaves the kernel's setting.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    if std::env::var_os("LANES_ALLOW_THP").is_none() {
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
    /// Huge pages are off for the process once tuned, as the kernel reports it.
    #[test]
    fn tune_allocator_turns_huge_pages_off() {
        let thp = || {
            crate::process::status_field(std::process::id(), "THP_enabled")
                .expect("THP_enabled in /proc/self/status")
        };
        let thp_preset = std::env::var_os("LANES_ALLOW_THP").is_some();
        if !thp_preset {
            assert_eq!(thp(), "1", "huge pages allowed before");
        }
        super::tune_allocator();
        if !thp_preset {
            assert_eq!(thp(), "0", "huge pages off after");
        }
    }

    /// Memory Rust allocates comes from jemalloc: its own size query knows the block.
    #[test]
    #[allow(unsafe_code)]
    fn the_global_allocator_is_jemalloc() {
        let block = vec![0u8; 1000];
        // SAFETY: asks the size of a live block jemalloc handed out, if it did.
        let usable = unsafe { tikv_jemalloc_sys::malloc_usable_size(block.as_ptr().cast()) };
        assert!(usable >= 1000, "jemalloc reports {usable} usable bytes");
    }
}
