//! The producer's polling thread against the real broker: it delivers reports as they
//! come, sleeps while there are none, and stops with the last clone. Its own test
//! binary, so the process holds no other producer's thread.

use std::time::{Duration, Instant};

use lanes_tests::*;

const THREAD: &str = "lanes-produce";

/// The ids of this process's threads named `name`.
fn threads(name: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let tid = t.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            (comm.trim() == name).then_some(tid)
        })
        .collect()
}

/// A thread's time on a CPU and its voluntary context switches (each one a wake-up).
fn cpu_and_wakeups(tid: &str) -> (Duration, u64) {
    let sched = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    let ns: u64 = sched.split_whitespace().next().unwrap().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let switches = status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (Duration::from_nanos(ns), switches)
}

#[tokio::test]
async fn the_polling_thread_delivers_sleeps_when_idle_and_stops_with_the_last_clone() {
    let s = settings();
    let topic = unique("producer-thread");
    create_topics(&s, &[&topic]).await;
    let p = producer(&s);
    produce(&p, &topic, b"k", b"first").await;
    let ids = threads(THREAD);
    assert_eq!(ids.len(), 1, "one polling thread per producer: {ids:?}");
    let tid = &ids[0];

    // rdkafka's own polling thread wakes 10 times a second and spins through the last
    // millisecond of each wait: about 30 ms on a CPU and 30 wake-ups here.
    let (cpu0, woke0) = cpu_and_wakeups(tid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu1, woke1) = cpu_and_wakeups(tid);
    assert!(
        cpu1 - cpu0 < Duration::from_millis(5),
        "an idle polling thread ran {:?} in 3 s",
        cpu1 - cpu0
    );
    assert!(
        woke1 - woke0 <= 12,
        "an idle polling thread woke {} times in 3 s",
        woke1 - woke0
    );

    // Reports wake it at once: its idle wait (1 s) would make 20 sends take about 10 s.
    let clone = p.clone();
    let started = Instant::now();
    for i in 0..20u8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        produce(&clone, &topic, b"k", &[i]).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "20 acknowledgements after idle gaps took {:?}",
        started.elapsed()
    );

    drop(p);
    assert_eq!(threads(THREAD).len(), 1, "a clone keeps the thread");
    produce(&clone, &topic, b"k", b"last").await;
    drop(clone);
    assert!(
        threads(THREAD).is_empty(),
        "the thread stops with the last clone"
    );
}
