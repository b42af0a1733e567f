//! A deterministic generator of card-transaction events with a fraud label.
//!
//! One feature definition feeds model training (`lanes sample`, read by
//! `scripts/train_model.py`) and demo traffic (`lanes publish --sample N`), so the model
//! always sees the features it was trained on. The random source is a hand-written
//! SplitMix64 so a seed gives the same events on every platform and crate version.
//!
//! The label is drawn from a logistic model with interactions (foreign online
//! purchases at risky merchants, night-time bursts, spend far above the card's normal),
//! plus label noise, so a classifier reaches a realistic, not perfect, AUC.

use std::collections::BTreeMap;

/// Feature names in the model's column order.
pub const FEATURES: [&str; 10] = [
    "amount",
    "hour",
    "merchant_risk",
    "distance_km",
    "txn_count_1h",
    "avg_amount_30d",
    "amount_ratio",
    "card_age_days",
    "is_foreign",
    "is_online",
];

/// Event kinds; `chargeback` is rare and meant to be treated as significant.
pub const KINDS: [&str; 3] = ["transaction", "login", "chargeback"];

/// The first event time: 2026-11-01T00:00:00Z.
pub const START_MS: i64 = 1_793_491_200_000;

#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }
}

#[derive(Debug, Clone)]
struct Card {
    avg_amount: f64,
    age_days: f64,
    travels: f64,
    night_owl: bool,
}

/// One generated event with its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub event_id: String,
    pub entity_id: String,
    pub kind: String,
    pub event_time: i64,
    /// Values in [`FEATURES`] order.
    pub features: [f64; FEATURES.len()],
    pub fraud: bool,
}

impl Sample {
    pub fn feature_map(&self) -> BTreeMap<String, f64> {
        FEATURES
            .iter()
            .map(|f| f.to_string())
            .zip(self.features)
            .collect()
    }

    /// The raw JSON event publishers write to `lanes.events.raw`.
    pub fn raw_json(&self) -> String {
        let mut event = self.untimed();
        event["event_time"] = self.event_time.into();
        event.to_string()
    }

    /// The raw event without `event_time`: ingest then takes the record's Kafka
    /// timestamp, its publish time, as for a live publisher that sends none.
    pub fn raw_json_untimed(&self) -> String {
        self.untimed().to_string()
    }

    fn untimed(&self) -> serde_json::Value {
        serde_json::json!({
            "event_id": self.event_id,
            "entity_id": self.entity_id,
            "kind": self.kind,
            "features": self.feature_map(),
        })
    }
}

/// Yields samples forever; the same `seed` and `cards` give the same sequence.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: SplitMix64,
    cards: Vec<Card>,
    seed: u64,
    seq: u64,
}

impl Generator {
    pub fn new(seed: u64, cards: usize) -> Self {
        let mut rng = SplitMix64(seed);
        let cards = (0..cards.max(1))
            .map(|_| Card {
                avg_amount: (3.4 + 0.8 * rng.normal()).exp().clamp(3.0, 3000.0),
                age_days: 10.0 + rng.uniform() * 3000.0,
                travels: rng.uniform().powi(3),
                night_owl: rng.chance(0.1),
            })
            .collect();
        Self {
            rng,
            cards,
            seed,
            seq: 0,
        }
    }

    fn features(&mut self, card: &Card) -> [f64; FEATURES.len()] {
        let r = &mut self.rng;
        let hour = if card.night_owl || r.chance(0.08) {
            r.below(6) as f64
        } else {
            (7 + r.below(16)) as f64
        };
        let spike = if r.chance(0.05) {
            3.0 + 10.0 * r.uniform()
        } else {
            1.0
        };
        let amount = (card.avg_amount * (0.5 * r.normal()).exp() * spike * 100.0).round() / 100.0;
        let merchant_risk = r.uniform().powf(2.5);
        let is_foreign = if r.chance(0.03 + 0.4 * card.travels) {
            1.0
        } else {
            0.0
        };
        let distance_km = if is_foreign > 0.0 {
            500.0 + 4000.0 * r.uniform()
        } else {
            (-(1.0 - r.uniform()).ln() * 12.0).min(800.0)
        };
        let txn_count_1h = (-(1.0 - r.uniform()).ln() * 1.2).floor().min(30.0);
        let is_online = if r.chance(0.45) { 1.0 } else { 0.0 };
        let avg = (card.avg_amount * 100.0).round() / 100.0;
        [
            amount,
            hour,
            merchant_risk,
            distance_km,
            txn_count_1h,
            avg,
            amount / avg,
            card.age_days.floor(),
            is_foreign,
            is_online,
        ]
    }

    fn fraud(&mut self, f: &[f64; FEATURES.len()]) -> bool {
        let [
            _,
            hour,
            risk,
            distance,
            count,
            _,
            ratio,
            age,
            foreign,
            online,
        ] = *f;
        let night = if hour < 6.0 { 1.0 } else { 0.0 };
        let logit = -6.2
            + 1.1 * ratio.max(0.05).ln()
            + 2.8 * risk
            + 1.6 * foreign * online * risk
            + 0.35 * count
            + 0.9 * night * (count >= 2.0) as u8 as f64
            + 0.25 * (1.0 + distance).ln()
            - 0.35 * (age / 30.0).max(0.1).ln()
            + 0.6 * online;
        let p = 1.0 / (1.0 + (-logit).exp());
        // 0.2% of labels flip: chargebacks and disputes are noisy ground truth.
        self.rng.chance(p) != self.rng.chance(0.002)
    }

    pub fn next_sample(&mut self) -> Sample {
        let index = self.rng.below(self.cards.len() as u64) as usize;
        let card = self.cards[index].clone();
        let features = self.features(&card);
        let fraud = self.fraud(&features);
        let kind = match self.rng.uniform() {
            x if x < 0.002 => KINDS[2],
            x if x < 0.05 => KINDS[1],
            _ => KINDS[0],
        };
        let seq = self.seq;
        self.seq += 1;
        Sample {
            event_id: format!("gen-{:x}-{seq}", self.seed),
            entity_id: format!("card-{index}"),
            kind: kind.to_string(),
            event_time: START_MS + seq as i64 * 250,
            features,
            fraud,
        }
    }
}

impl Generator {
    /// Feature rows for the first `n` cards (`card-0` ..), one each: an entity snapshot
    /// as a feature store would export it for batch scoring. Same seed, same rows.
    pub fn snapshot(seed: u64, n: usize) -> impl Iterator<Item = (String, [f64; FEATURES.len()])> {
        let mut g = Generator::new(seed, n);
        (0..n).map(move |i| {
            let card = g.cards[i].clone();
            (format!("card-{i}"), g.features(&card))
        })
    }
}

impl Iterator for Generator {
    type Item = Sample;
    fn next(&mut self) -> Option<Sample> {
        Some(self.next_sample())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_events() {
        let a: Vec<Sample> = Generator::new(7, 100).take(500).collect();
        let b: Vec<Sample> = Generator::new(7, 100).take(500).collect();
        assert_eq!(a, b);
        let c: Vec<Sample> = Generator::new(8, 100).take(500).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn features_are_finite_and_the_label_is_informative() {
        let samples: Vec<Sample> = Generator::new(1, 1000).take(50_000).collect();
        assert!(
            samples
                .iter()
                .all(|s| s.features.iter().all(|v| v.is_finite()))
        );
        let fraud: Vec<&Sample> = samples.iter().filter(|s| s.fraud).collect();
        let rate = fraud.len() as f64 / samples.len() as f64;
        assert!((0.01..0.15).contains(&rate), "fraud rate {rate}");
        // Risky merchants are over-represented among frauds.
        let mean_risk =
            |v: &[&Sample]| v.iter().map(|s| s.features[2]).sum::<f64>() / v.len() as f64;
        let legit: Vec<&Sample> = samples.iter().filter(|s| !s.fraud).collect();
        assert!(mean_risk(&fraud) > 1.5 * mean_risk(&legit));
    }

    #[test]
    fn snapshots_have_one_row_per_entity_and_repeat() {
        let a: Vec<_> = Generator::snapshot(5, 300).collect();
        assert_eq!(a.len(), 300);
        assert_eq!(a[0].0, "card-0");
        assert_eq!(a[299].0, "card-299");
        let b: Vec<_> = Generator::snapshot(5, 300).collect();
        assert_eq!(a, b);
        assert_ne!(a, Generator::snapshot(6, 300).collect::<Vec<_>>());
    }

    #[test]
    fn raw_json_has_the_design_shape() {
        let s = Generator::new(3, 5).next_sample();
        let v: serde_json::Value = serde_json::from_str(&s.raw_json()).unwrap();
        assert_eq!(v["entity_id"], s.entity_id.as_str());
        assert_eq!(v["features"].as_object().unwrap().len(), FEATURES.len());
        assert_eq!(v["event_time"], s.event_time);
        let untimed: serde_json::Value = serde_json::from_str(&s.raw_json_untimed()).unwrap();
        assert!(untimed.get("event_time").is_none(), "{untimed}");
        let mut timed = v;
        timed.as_object_mut().unwrap().remove("event_time");
        assert_eq!(timed, untimed);
    }
}
