//! Per-partition windows, pure: events go in, closed `MicroBatch`es come out when a
//! window reaches its event count, its byte budget or its delay, when a significant
//! event arrives, or when the caller flushes (revocation, shutdown).
//!
//! Time is `tokio::time::Instant`, so tests drive it with paused time.

use std::collections::BTreeMap;
use std::time::Duration;

use lanes_common::dlq::ErrorClass;
use lanes_common::features::{FeatureIndex, Features};
use lanes_common::records::{CloseReason, Event, MicroBatch, unusable_event};
use tokio::time::Instant;

use crate::adaptive::{Adaptive, Limits};

#[derive(Debug, Clone)]
pub struct WindowConfig {
    pub max_events: usize,
    /// Upper bound on a batch's encoded size.
    pub max_bytes: usize,
    pub max_delay: Duration,
    /// Event kinds that close their window at once.
    pub priority_kinds: Vec<String>,
    /// The model's features, in column order.
    pub features: Vec<String>,
    /// Event-to-batch latency to hold: the delay and size then adapt ([`Adaptive`])
    /// within `max_delay` and `max_events`.
    pub target_latency: Option<Duration>,
}

/// Writes the model's features of one event into its row, in one pass over the event's
/// sorted map and the model's sorted names (a lookup per name compared each name with
/// several keys). Names the event lacks stay as they are.
fn fill_row(row: &mut [f32], index: &FeatureIndex, features: &Features) {
    index.fill(row, features.iter().map(|(k, v)| (k.as_str(), *v as f32)));
}

/// A closed window: the batch and the input offsets it covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub batch: MicroBatch,
    pub offsets: Vec<i64>,
    /// How long the window stayed open.
    pub open_for: Duration,
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    opened_ms: i64,
    /// The oldest `ingested_at` it holds.
    oldest_ingested: i64,
    bytes: usize,
    offsets: Vec<i64>,
    batch: MicroBatch,
}

/// The fixed part of an encoded batch: ids, offsets, times, names, array framing.
fn base_bytes(features: &[String], topic: &str) -> usize {
    128 + topic.len() + features.iter().map(|f| f.len() + 5).sum::<usize>()
}

/// An upper bound on the bytes one event adds to an encoded batch: 4 per float feature,
/// strings with their length prefix, two timestamps as varints.
pub fn event_bytes(event: &Event, features: usize) -> usize {
    4 * features + event.event_id.len() + event.entity_id.len() + event.kind.len() + 3 * 5 + 2 * 10
}

pub struct Windows {
    cfg: WindowConfig,
    /// The model's feature names, to read an event's sorted map in one pass.
    index: FeatureIndex,
    topic: String,
    open: BTreeMap<i32, Window>,
    adaptive: Option<Adaptive>,
}

impl Windows {
    pub fn new(cfg: WindowConfig, topic: impl Into<String>) -> Self {
        let adaptive = cfg.target_latency.map(|target| {
            Adaptive::new(Limits {
                target,
                max_delay: cfg.max_delay,
                max_events: cfg.max_events,
            })
        });
        Self {
            index: FeatureIndex::new(cfg.features.clone()),
            cfg,
            topic: topic.into(),
            open: BTreeMap::new(),
            adaptive,
        }
    }

    /// How long a window may stay open now.
    pub fn delay(&self) -> Duration {
        self.adaptive
            .as_ref()
            .map_or(self.cfg.max_delay, Adaptive::delay)
    }

    /// How many events a window of `partition` gathers at most now.
    pub fn size(&self, partition: i32) -> usize {
        self.adaptive
            .as_ref()
            .map_or(self.cfg.max_events, |a| a.size(partition))
    }

    /// The largest [`Windows::size`] among the partitions with open windows.
    pub fn largest_size(&self) -> usize {
        self.open
            .keys()
            .map(|p| self.size(*p))
            .max()
            .unwrap_or_else(|| self.size(-1))
    }

    /// When the window of `partition` (opened at `opened`) is due to close.
    fn due(&self, partition: i32, opened: Instant) -> Instant {
        let by_delay = opened + self.delay();
        match self
            .adaptive
            .as_ref()
            .and_then(|a| a.idle_deadline(partition))
        {
            Some(idle) => by_delay.min(idle),
            None => by_delay,
        }
    }

    /// Why `event` cannot join a batch ([`unusable_event`]): in a batch, a row of a
    /// value past f32 would score `NaN` and the scorer refuse the whole batch with it.
    pub fn unscorable(&self, event: &Event) -> Option<(ErrorClass, String)> {
        unusable_event(event, &self.index)
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Adds one event read at `offset` of `partition`, its strings moved into the
    /// batch's columns; returns the windows it closed (at most two: the full one it
    /// could not join, and its own if that closes at once).
    pub fn push(
        &mut self,
        partition: i32,
        offset: i64,
        event: Event,
        now: Instant,
        now_ms: i64,
    ) -> Vec<Closed> {
        let mut closed = Vec::new();
        if let Some(a) = &mut self.adaptive {
            a.arrived(partition, now, now_ms.saturating_sub(event.ingested_at));
        }
        let size = event_bytes(&event, self.cfg.features.len());
        let priority = self.cfg.priority_kinds.contains(&event.kind);
        if let Some(w) = self.open.get(&partition)
            && w.bytes + size > self.cfg.max_bytes
            && !w.offsets.is_empty()
        {
            closed.extend(self.close(partition, CloseReason::Bytes, now, now_ms));
        }
        let max_events = self.size(partition);
        let (features, topic) = (&self.cfg.features, &self.topic);
        // Only a new window needs the names and the base size: not once per event.
        let w = self.open.entry(partition).or_insert_with(|| Window {
            opened: now,
            opened_ms: now_ms,
            oldest_ingested: event.ingested_at,
            bytes: base_bytes(features, topic),
            offsets: Vec::new(),
            batch: MicroBatch {
                batch_id: String::new(),
                source_partition: partition,
                first_offset: offset,
                last_offset: offset,
                opened_at: now_ms,
                closed_at: now_ms,
                close_reason: CloseReason::Flush,
                feature_names: features.clone(),
                features: Vec::new(),
                event_ids: Vec::new(),
                entity_ids: Vec::new(),
                kinds: Vec::new(),
                event_times: Vec::new(),
                ingested_ats: Vec::new(),
            },
        });
        w.bytes += size;
        w.oldest_ingested = w.oldest_ingested.min(event.ingested_at);
        w.offsets.push(offset);
        let b = &mut w.batch;
        b.last_offset = offset;
        // Every model feature is given ([`Windows::unscorable`]).
        let row = b.features.len();
        b.features.resize(row + b.feature_names.len(), 0.0);
        fill_row(&mut b.features[row..], &self.index, &event.features);
        b.event_ids.push(event.event_id);
        b.entity_ids.push(event.entity_id);
        b.kinds.push(event.kind);
        b.event_times.push(event.event_time);
        b.ingested_ats.push(event.ingested_at);
        let reason = if priority {
            Some(CloseReason::Priority)
        } else if w.offsets.len() >= max_events {
            Some(CloseReason::Count)
        } else {
            None
        };
        if let Some(reason) = reason {
            closed.extend(self.close(partition, reason, now, now_ms));
        }
        closed
    }

    /// When the first open window is due to close.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.iter().map(|(p, w)| self.due(*p, w.opened)).min()
    }

    /// Closes every window whose delay has run out (or whose partition went quiet).
    pub fn expire(&mut self, now: Instant, now_ms: i64) -> Vec<Closed> {
        let due: Vec<i32> = self
            .open
            .iter()
            .filter(|(p, w)| self.due(**p, w.opened) <= now)
            .map(|(p, _)| *p)
            .collect();
        due.into_iter()
            .filter_map(|p| self.close(p, CloseReason::Delay, now, now_ms))
            .collect()
    }

    /// Closes the windows of `partitions` (all when `None`).
    pub fn flush(&mut self, partitions: Option<&[i32]>, now: Instant, now_ms: i64) -> Vec<Closed> {
        let targets: Vec<i32> = match partitions {
            Some(ps) => ps
                .iter()
                .copied()
                .filter(|p| self.open.contains_key(p))
                .collect(),
            None => self.open.keys().copied().collect(),
        };
        if let (Some(a), Some(ps)) = (&mut self.adaptive, partitions) {
            for p in ps {
                a.forget(*p);
            }
        }
        targets
            .into_iter()
            .filter_map(|p| self.close(p, CloseReason::Flush, now, now_ms))
            .collect()
    }

    fn close(
        &mut self,
        partition: i32,
        reason: CloseReason,
        now: Instant,
        now_ms: i64,
    ) -> Option<Closed> {
        let w = self.open.remove(&partition)?;
        if let Some(a) = &mut self.adaptive
            && reason != CloseReason::Flush
        {
            a.closed(now_ms.saturating_sub(w.oldest_ingested));
        }
        let mut batch = w.batch;
        batch.close_reason = reason;
        batch.closed_at = now_ms.max(w.opened_ms);
        batch.batch_id = batch_id(
            &self.topic,
            partition,
            batch.first_offset,
            batch.last_offset,
        );
        Some(Closed {
            batch,
            offsets: w.offsets,
            open_for: now.saturating_duration_since(w.opened),
        })
    }
}

/// Deterministic: a replay of the same offsets yields the same id.
pub fn batch_id(topic: &str, partition: i32, first: i64, last: i64) -> String {
    format!("{topic}-{partition}-{first}-{last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_events: usize, max_bytes: usize, delay_ms: u64) -> WindowConfig {
        WindowConfig {
            max_events,
            max_bytes,
            max_delay: Duration::from_millis(delay_ms),
            priority_kinds: vec!["chargeback".into()],
            features: vec!["a".into(), "b".into()],
            target_latency: None,
        }
    }

    /// `n` events on partition 0, one every `gap`, each `age_ms` old on arrival; the
    /// windows' own deadlines are honoured between arrivals. Returns what closed.
    fn drive(w: &mut Windows, n: i64, gap: Duration, age_ms: i64) -> Vec<Closed> {
        let start = Instant::now();
        let mut closed = Vec::new();
        for i in 0..n {
            let now = start + gap * i as u32;
            while let Some(d) = w.next_deadline().filter(|d| *d <= now) {
                closed.extend(w.expire(d, ms(start, d)));
            }
            let mut e = event(i, "t");
            e.ingested_at = ms(start, now) - age_ms;
            closed.extend(w.push(0, i, e, now, ms(start, now)));
        }
        closed
    }

    fn ms(start: Instant, t: Instant) -> i64 {
        1_000_000 + t.duration_since(start).as_millis() as i64
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_window_fills_under_load_and_closes_early_when_thin() {
        let adaptive = |target_ms| WindowConfig {
            target_latency: Some(Duration::from_millis(target_ms)),
            ..cfg(256, 1 << 20, 100)
        };
        // 20k events/s, 5 ms upstream, 50 ms target: windows close full, by count.
        let mut w = Windows::new(adaptive(50), "events");
        let busy = drive(&mut w, 4000, Duration::from_micros(50), 5);
        let full = busy.iter().filter(|c| c.offsets.len() == 256).count();
        assert!(full >= busy.len() - 2, "{full} of {} full", busy.len());
        assert!(
            busy.iter()
                .skip(2)
                .all(|c| c.batch.close_reason == CloseReason::Count)
        );
        // 50 events/s: a fixed 100 ms window holds each event 100 ms for five per batch
        // and misses a 50 ms target; the adaptive one sends each at once.
        let mut fixed = Windows::new(cfg(256, 1 << 20, 100), "events");
        let thin_fixed = drive(&mut fixed, 200, Duration::from_millis(20), 5);
        assert!(
            thin_fixed
                .iter()
                .any(|c| c.open_for >= Duration::from_millis(80))
        );
        let mut w = Windows::new(adaptive(50), "events");
        let thin = drive(&mut w, 200, Duration::from_millis(20), 5);
        let late = thin
            .iter()
            .skip(5)
            .filter(|c| c.open_for + Duration::from_millis(5) > Duration::from_millis(50))
            .count();
        assert_eq!(
            late, 0,
            "every batch within its target once the rate is known"
        );
        // 1k events/s: batches of about the events the 45 ms budget allows.
        let mut w = Windows::new(adaptive(50), "events");
        let mid = drive(&mut w, 2000, Duration::from_millis(1), 5);
        let sizes: Vec<usize> = mid.iter().skip(5).map(|c| c.offsets.len()).collect();
        assert!(sizes.iter().all(|n| (40..=46).contains(n)), "{sizes:?}");
        assert!(w.delay() <= Duration::from_millis(45));
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_window_closes_when_its_partition_goes_quiet() {
        let mut w = Windows::new(
            WindowConfig {
                target_latency: Some(Duration::from_millis(1000)),
                ..cfg(1000, 1 << 20, 1000)
            },
            "events",
        );
        // 30 events 1 ms apart, then silence.
        let closed = drive(&mut w, 30, Duration::from_millis(1), 0);
        assert!(
            closed.is_empty(),
            "the window waits while events keep coming"
        );
        let quiet = w.next_deadline().expect("a window is open");
        let since = quiet.duration_since(Instant::now());
        assert!(
            since <= Duration::from_millis(50),
            "closes 20 ms (two rate samples) after the last event, not after the 1 s delay: {since:?}"
        );
        let closed = w.expire(quiet, 0);
        assert_eq!(closed[0].offsets.len(), 30);
        assert_eq!(closed[0].batch.close_reason, CloseReason::Delay);
    }

    fn event(i: i64, kind: &str) -> Event {
        Event {
            event_id: format!("e{i}"),
            entity_id: format!("c{}", i % 3),
            kind: kind.into(),
            event_time: 1000 + i,
            ingested_at: 2000 + i,
            features: Features::from([("a".into(), i as f64), ("b".into(), -(i as f64))]),
        }
    }

    #[test]
    fn only_a_model_feature_past_f32_makes_an_event_unscorable() {
        let w = Windows::new(cfg(3, 1 << 20, 1000), "events");
        assert_eq!(w.unscorable(&event(1, "t")), None);
        for bad in [f64::NAN, f64::INFINITY, 1e39] {
            let mut e = event(1, "t");
            e.features.insert("b".into(), bad);
            let (class, reason) = w.unscorable(&e).expect("unscorable");
            assert_eq!(class, ErrorClass::NonFinite);
            assert!(reason.contains("\"b\""), "{reason}");
            let mut e = event(1, "t");
            e.features.insert("not_in_model".into(), bad);
            assert_eq!(w.unscorable(&e), None, "the model never reads it");
        }
    }

    #[test]
    fn an_event_without_every_model_feature_is_unscorable() {
        let w = Windows::new(cfg(3, 1 << 20, 1000), "events");
        for (drop, keep) in [("a", "b"), ("b", "a")] {
            let mut e = event(1, "t");
            e.features.remove(drop);
            e.features.insert("c".into(), 1.0);
            let (class, reason) = w.unscorable(&e).expect("unscorable");
            assert_eq!(class, ErrorClass::MissingField);
            assert!(reason.contains(&format!("{drop:?}")), "{reason}");
            assert!(!reason.contains(&format!("{keep:?}")), "{reason}");
        }
        let mut e = event(1, "t");
        e.features = Features::default();
        assert!(w.unscorable(&e).is_some());
        // No entity: its prediction would have no cache key.
        let mut e = event(1, "t");
        e.entity_id.clear();
        assert_eq!(
            w.unscorable(&e).map(|u| u.0),
            Some(ErrorClass::MissingField)
        );
        // Ids the cache would refuse: refused before they are batched and scored.
        let mut e = event(1, "t");
        e.entity_id = "c".repeat(513);
        assert_eq!(w.unscorable(&e).map(|u| u.0), Some(ErrorClass::TooLarge));
        let mut e = event(1, "t");
        e.event_id = "e".repeat(1025);
        assert_eq!(w.unscorable(&e).map(|u| u.0), Some(ErrorClass::TooLarge));
    }

    #[tokio::test(start_paused = true)]
    async fn closes_on_count_with_columns_in_model_order() {
        let mut w = Windows::new(cfg(3, 1 << 20, 1000), "events");
        let t = Instant::now();
        assert!(w.push(0, 10, event(1, "t"), t, 5).is_empty());
        assert!(w.push(0, 11, event(2, "t"), t, 6).is_empty());
        let closed = w.push(0, 12, event(3, "t"), t, 7);
        assert_eq!(closed.len(), 1);
        let b = &closed[0].batch;
        assert_eq!(b.close_reason, CloseReason::Count);
        assert_eq!((b.first_offset, b.last_offset), (10, 12));
        assert_eq!(b.batch_id, "events-0-10-12");
        assert_eq!(b.features, vec![1.0, -1.0, 2.0, -2.0, 3.0, -3.0]);
        assert_eq!(b.event_ids, vec!["e1", "e2", "e3"]);
        assert_eq!(b.event_times, vec![1001, 1002, 1003]);
        assert_eq!(b.ingested_ats, vec![2001, 2002, 2003]);
        assert_eq!((b.opened_at, b.closed_at), (5, 7));
        assert_eq!(closed[0].offsets, vec![10, 11, 12]);
        assert_eq!(w.open_windows(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closes_on_delay_since_the_window_opened() {
        let mut w = Windows::new(cfg(100, 1 << 20, 20), "events");
        let t0 = Instant::now();
        w.push(1, 0, event(1, "t"), t0, 0);
        tokio::time::advance(Duration::from_millis(15)).await;
        w.push(1, 1, event(2, "t"), Instant::now(), 15);
        assert_eq!(w.next_deadline(), Some(t0 + Duration::from_millis(20)));
        assert!(w.expire(Instant::now(), 15).is_empty(), "not due yet");
        tokio::time::advance(Duration::from_millis(5)).await;
        let closed = w.expire(Instant::now(), 20);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].batch.close_reason, CloseReason::Delay);
        assert_eq!(closed[0].open_for, Duration::from_millis(20));
        assert_eq!(closed[0].offsets, vec![0, 1]);
        assert_eq!(w.next_deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_have_their_own_windows() {
        let mut w = Windows::new(cfg(2, 1 << 20, 50), "events");
        let t = Instant::now();
        w.push(0, 5, event(1, "t"), t, 0);
        w.push(1, 9, event(2, "t"), t, 0);
        assert_eq!(w.open_windows(), 2);
        let closed = w.push(1, 10, event(3, "t"), t, 0);
        assert_eq!(closed[0].batch.source_partition, 1);
        assert_eq!(closed[0].offsets, vec![9, 10]);
        assert_eq!(w.open_windows(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_never_exceeds_its_byte_budget() {
        let per_event = event_bytes(&event(1, "t"), 2);
        let base = base_bytes(&cfg(1, 1, 1).features, "events");
        let budget = base + 3 * per_event + per_event / 2;
        let mut w = Windows::new(cfg(1000, budget, 1000), "events");
        let t = Instant::now();
        let mut closed = Vec::new();
        for i in 0..7 {
            closed.extend(w.push(0, i, event(i, "t"), t, 0));
        }
        closed.extend(w.flush(None, t, 0));
        assert_eq!(
            closed.iter().map(|c| c.offsets.len()).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        assert_eq!(closed[0].batch.close_reason, CloseReason::Bytes);
        assert_eq!(closed[2].batch.close_reason, CloseReason::Flush);
        for c in &closed {
            assert!(base + c.offsets.len() * per_event <= budget);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_bounds_the_real_encoding() {
        use lanes_common::records::Record;
        let mut w = Windows::new(cfg(50, 1 << 20, 1000), "lanes.events");
        let t = Instant::now();
        let closed = (0..50)
            .flat_map(|i| {
                w.push(
                    3,
                    1_000_000 + i,
                    event(i, "transaction"),
                    t,
                    1_795_000_000_000,
                )
            })
            .next()
            .unwrap();
        let value = apache_avro::to_value(&closed.batch)
            .unwrap()
            .resolve(MicroBatch::schema())
            .unwrap();
        let encoded = apache_avro::writer::datum::GenericDatumWriter::builder(MicroBatch::schema())
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        let estimate = base_bytes(&closed.batch.feature_names, "lanes.events")
            + 50 * event_bytes(&event(49, "transaction"), 2);
        assert!(
            encoded.len() <= estimate,
            "encoded {} > estimate {estimate}",
            encoded.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn significant_events_close_their_window_at_once() {
        let mut w = Windows::new(cfg(100, 1 << 20, 1000), "events");
        let t = Instant::now();
        w.push(0, 1, event(1, "t"), t, 0);
        let closed = w.push(0, 2, event(2, "chargeback"), t, 0);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].batch.close_reason, CloseReason::Priority);
        assert_eq!(closed[0].offsets, vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn flush_closes_only_the_named_partitions() {
        let mut w = Windows::new(cfg(100, 1 << 20, 1000), "events");
        let t = Instant::now();
        w.push(0, 1, event(1, "t"), t, 0);
        w.push(1, 1, event(2, "t"), t, 0);
        w.push(2, 1, event(3, "t"), t, 0);
        let closed = w.flush(Some(&[0, 2, 7]), t, 0);
        let parts: Vec<i32> = closed.iter().map(|c| c.batch.source_partition).collect();
        assert_eq!(parts, vec![0, 2]);
        assert!(
            closed
                .iter()
                .all(|c| c.batch.close_reason == CloseReason::Flush)
        );
        assert_eq!(w.open_windows(), 1);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// One pass over the sorted map fills a row as a lookup per column would:
            /// names listed twice, names the event lacks, keys the model does not use.
            #[test]
            fn a_row_holds_what_a_lookup_per_column_finds(
                names in prop::collection::vec("[a-e]{0,3}", 0..12),
                features in prop::collection::btree_map("[a-e]{0,3}", -1e6f64..1e6, 0..12),
            ) {
                let mut cfg = cfg(8, 1 << 20, 10);
                cfg.features = names.clone();
                let w = Windows::new(cfg, "events");
                let features = Features::from(features);
                let mut row = vec![0.0f32; names.len()];
                fill_row(&mut row, &w.index, &features);
                let want: Vec<f32> = names
                    .iter()
                    .map(|n| features.get(n).copied().unwrap_or(0.0) as f32)
                    .collect();
                prop_assert_eq!(row, want);
            }
        }

        #[derive(Debug, Clone)]
        enum Step {
            Push { partition: i32, priority: bool },
            Wait(u64),
            Expire,
            Revoke(i32),
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                6 => (0i32..4, prop::bool::weighted(0.05))
                    .prop_map(|(partition, priority)| Step::Push { partition, priority }),
                2 => (0u64..40).prop_map(Step::Wait),
                1 => Just(Step::Expire),
                1 => (0i32..4).prop_map(Step::Revoke),
            ]
        }

        proptest! {
            /// Whatever the sizes, delays, priority events, expiries and revocations,
            /// every event pushed comes out in exactly one batch, in offset order within
            /// its partition, with its own columns, and no batch breaks its limits.
            #[test]
            fn every_event_comes_out_once_in_order(
                steps in prop::collection::vec(step(), 1..400),
                max_events in 1usize..20,
                max_bytes in 400usize..2000,
                delay_ms in 1u64..50,
            ) {
                let mut w = Windows::new(cfg(max_events, max_bytes, delay_ms), "events");
                let t0 = Instant::now();
                let mut elapsed = 0u64;
                let mut next_offset = [0i64; 4];
                let mut pushed: Vec<(i32, i64, String)> = Vec::new();
                let mut closed: Vec<Closed> = Vec::new();
                for s in steps {
                    let now = t0 + Duration::from_millis(elapsed);
                    let now_ms = elapsed as i64;
                    match s {
                        Step::Push { partition, priority } => {
                            let offset = next_offset[partition as usize];
                            next_offset[partition as usize] += 1;
                            let e = event(offset * 4 + i64::from(partition), if priority { "chargeback" } else { "t" });
                            pushed.push((partition, offset, e.event_id.clone()));
                            closed.extend(w.push(partition, offset, e, now, now_ms));
                        }
                        Step::Wait(ms) => elapsed += ms,
                        Step::Expire => closed.extend(w.expire(now, now_ms)),
                        Step::Revoke(p) => closed.extend(w.flush(Some(&[p]), now, now_ms)),
                    }
                }
                let end = t0 + Duration::from_millis(elapsed);
                closed.extend(w.flush(None, end, elapsed as i64));
                prop_assert_eq!(w.open_windows(), 0);

                let mut out: Vec<(i32, i64, String)> = Vec::new();
                for c in &closed {
                    let b = &c.batch;
                    let n = b.event_ids.len();
                    prop_assert!(n >= 1 && n <= max_events, "{} events in a batch of at most {}", n, max_events);
                    prop_assert_eq!(c.offsets.len(), n);
                    prop_assert_eq!(b.features.len(), n * b.feature_names.len());
                    prop_assert_eq!(b.entity_ids.len(), n);
                    prop_assert_eq!(b.event_times.len(), n);
                    prop_assert_eq!(b.first_offset, c.offsets[0]);
                    prop_assert_eq!(b.last_offset, c.offsets[n - 1]);
                    prop_assert!(c.offsets.windows(2).all(|p| p[0] < p[1]));
                    for (i, (o, id)) in c.offsets.iter().zip(&b.event_ids).enumerate() {
                        // Column values follow their event: feature a is the event number.
                        let number: i64 = id[1..].parse().unwrap();
                        prop_assert_eq!(b.features[i * 2], number as f32);
                        out.push((b.source_partition, *o, id.clone()));
                    }
                }
                let mut want = pushed.clone();
                want.sort();
                out.sort();
                prop_assert_eq!(out, want);
                // Within a partition, batches come out in offset order.
                for p in 0..4 {
                    let firsts: Vec<i64> = closed.iter().filter(|c| c.batch.source_partition == p).map(|c| c.batch.first_offset).collect();
                    prop_assert!(firsts.windows(2).all(|f| f[0] < f[1]), "partition {} batches out of order: {:?}", p, firsts);
                }
            }
        }
    }
}
