//! Named crash points for the fault suite, compiled in only with the `failpoints`
//! feature. The test crate turns it on, so `cargo test --workspace` builds service
//! binaries with them; the image (`--exclude lanes-tests`) has none, and an unarmed
//! point costs one relaxed load.
//!
//! `LANES_FAILPOINT=<name>` aborts the process the first time the point is reached;
//! `LANES_FAILPOINT=<name>=<actions>` takes the `fail` crate's action syntax, e.g.
//! `after_produce_before_commit=20*off->return` aborts on the 21st pass.

/// Where a crash loses the most: outputs acknowledged, their inputs not yet committed.
pub const AFTER_PRODUCE_BEFORE_COMMIT: &str = "after_produce_before_commit";
/// Inputs read and decoded, nothing produced for them yet.
pub const AFTER_CONSUME_BEFORE_PRODUCE: &str = "after_consume_before_produce";

/// Reads of a group's committed offsets answer "none" for the topics whose name starts
/// with the armed prefix, as when the group's coordinator cannot answer:
/// `committed_unknown=return(<prefix>)`.
pub const COMMITTED_UNKNOWN: &str = "committed_unknown";

/// The environment variable that arms a failpoint.
pub const ENV: &str = "LANES_FAILPOINT";

/// Arms the failpoint named in [`ENV`], if any. Call once at process start.
pub fn setup() {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    #[cfg(feature = "failpoints")]
    {
        let (name, actions) = spec.split_once('=').unwrap_or((spec.as_str(), "return"));
        if let Err(e) = fail::cfg(name, actions) {
            eprintln!("{ENV}={spec}: {e}");
            std::process::exit(crate::shutdown::EXIT_CONFIG);
        }
        tracing::warn!(failpoint = name, actions, "failpoint armed");
    }
    #[cfg(not(feature = "failpoints"))]
    tracing::warn!("{ENV}={spec} is ignored: this build has no failpoints (feature `failpoints`)");
}

/// A crash where a failpoint fires: no destructors, no flush, as with SIGKILL.
pub fn crash(name: &str) -> ! {
    eprintln!("failpoint {name}: aborting");
    std::process::abort()
}

/// Aborts the process here when the named failpoint is armed and due.
macro_rules! hit {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| $crate::failpoint::crash($name));
    };
}
pub(crate) use hit;

/// Arms `name` with `actions` in this process (tests that run a source in-process).
#[cfg(feature = "failpoints")]
pub fn arm(name: &str, actions: &str) {
    fail::cfg(name, actions).expect("failpoint actions parse");
}

/// Disarms `name` in this process.
#[cfg(feature = "failpoints")]
pub fn disarm(name: &str) {
    fail::remove(name);
}

/// `committed` with the offsets of [`COMMITTED_UNKNOWN`]'s topics made unknown, when armed.
pub fn committed_read(committed: rdkafka::TopicPartitionList) -> rdkafka::TopicPartitionList {
    #[cfg(feature = "failpoints")]
    if let Some(prefix) = committed_unknown_prefix() {
        let mut committed = committed;
        let unknown: Vec<(String, i32)> = committed
            .elements()
            .iter()
            .filter(|e| e.topic().starts_with(&prefix))
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for (topic, partition) in unknown {
            let _ = committed.set_partition_offset(&topic, partition, rdkafka::Offset::Invalid);
        }
        return committed;
    }
    committed
}

#[cfg(feature = "failpoints")]
fn committed_unknown_prefix() -> Option<String> {
    fail::fail_point!(COMMITTED_UNKNOWN, |prefix| prefix);
    None
}
