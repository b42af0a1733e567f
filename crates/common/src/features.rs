//! Features by name: an event's values ([`Features`]), and a model's names indexed for
//! matching them to its columns ([`FeatureIndex`]).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An event's features: each name once, in name order. A sorted `Vec` rather than a
/// `BTreeMap`: every event's map is built once, read in order once or twice and
/// dropped, and a tree's nodes cost more to build, walk and free than a slice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Features(Vec<(String, f64)>);

impl Features {
    pub fn get(&self, name: &str) -> Option<&f64> {
        self.position(name).ok().map(|i| &self.0[i].1)
    }

    /// Sets `name` to `value`, returning the value it replaces.
    pub fn insert(&mut self, name: String, value: f64) -> Option<f64> {
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<f64> {
        self.position(name).ok().map(|i| self.0.remove(i).1)
    }

    /// Keeps the entries whose name `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|(name, _)| keep(name));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Name and value, in name order.
    pub fn iter(&self) -> <&Self as IntoIterator>::IntoIter {
        self.into_iter()
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator + Clone {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &f64> + ExactSizeIterator + Clone {
        self.0.iter().map(|(_, v)| v)
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(name))
    }
}

impl FromIterator<(String, f64)> for Features {
    /// Sorted stably, then deduplicated keeping the last value: a repeated name ends as
    /// it would by inserts into a map.
    fn from_iter<I: IntoIterator<Item = (String, f64)>>(entries: I) -> Self {
        let mut entries: Vec<(String, f64)> = entries.into_iter().collect();
        if !entries.is_sorted_by(|a, b| a.0 < b.0) {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries.dedup_by(|later, kept| {
                let same = later.0 == kept.0;
                if same {
                    kept.1 = later.1;
                }
                same
            });
        }
        Self(entries)
    }
}

impl<const N: usize> From<[(String, f64); N]> for Features {
    fn from(entries: [(String, f64); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl From<BTreeMap<String, f64>> for Features {
    fn from(map: BTreeMap<String, f64>) -> Self {
        Self(map.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Features {
    type Item = (&'a String, &'a f64);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, f64)>,
        fn(&'a (String, f64)) -> (&'a String, &'a f64),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl Serialize for Features {
    /// As a map: Avro's `map<double>`, a JSON object.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Features {
    /// From a map, collected then sorted only if it was not (every Lanes writer writes
    /// name order).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;

        impl<'de> Visitor<'de> for Entries {
            type Value = Features;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of features")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Features, A::Error> {
                // The hint comes off the wire: a capacity, not a promise.
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(entry) = map.next_entry::<String, f64>()? {
                    entries.push(entry);
                }
                Ok(entries.into_iter().collect())
            }
        }

        d.deserialize_map(Entries)
    }
}

/// A model's feature names in column order, and the distinct names sorted, each with
/// the columns it fills (a name the model lists twice fills both).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureIndex {
    columns: Vec<String>,
    sorted: Vec<(String, Vec<usize>)>,
    /// Each column's place in `sorted`.
    entry: Vec<usize>,
}

/// Where [`FeatureIndex::find`] last found a name: its place in name order (and so its
/// last column). Publishers write features in column order or in name order, so the
/// next name is tried first after it in both.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor(Option<usize>);

impl FeatureIndex {
    pub fn new(columns: Vec<String>) -> Self {
        let mut sorted: Vec<(String, Vec<usize>)> = Vec::with_capacity(columns.len());
        for (column, name) in columns.iter().enumerate() {
            match sorted.binary_search_by(|(n, _)| n.cmp(name)) {
                Ok(i) => sorted[i].1.push(column),
                Err(i) => sorted.insert(i, (name.clone(), vec![column])),
            }
        }
        let mut entry = vec![0; columns.len()];
        for (i, (_, cols)) in sorted.iter().enumerate() {
            for &c in cols {
                entry[c] = i;
            }
        }
        Self {
            columns,
            sorted,
            entry,
        }
    }

    /// The names in column order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The distinct names in name order, each with its columns.
    pub fn sorted(&self) -> &[(String, Vec<usize>)] {
        &self.sorted
    }

    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.sorted
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
    }

    /// The columns of `name`: the column after the cursor's, then the name after the
    /// cursor's, then a binary search. Each is compared with `name`, so the cursor
    /// only saves comparisons.
    pub fn find(&self, name: &str, cursor: &mut Cursor) -> Option<&[usize]> {
        let (next_column, next_entry) = match cursor.0 {
            // Every sorted name has at least one column; the last is the one to follow.
            Some(e) => {
                let columns = &self.sorted[e].1;
                (columns[columns.len() - 1] + 1, e + 1)
            }
            None => (0, 0),
        };
        let at = if self.columns.get(next_column).is_some_and(|c| c == name) {
            self.entry[next_column]
        } else if self.sorted.get(next_entry).is_some_and(|(n, _)| n == name) {
            next_entry
        } else {
            self.position(name)?
        };
        cursor.0 = Some(at);
        Some(&self.sorted[at].1)
    }

    /// An event's features from its values in column order, built in name order from
    /// the index rather than sorted. A name listed twice takes its first column's value.
    pub fn features(&self, values: &[f64]) -> Features {
        Features(
            self.sorted
                .iter()
                .map(|(name, columns)| (name.clone(), values[columns[0]]))
                .collect(),
        )
    }

    /// The first name of the model (in name order) that `names`, in name order as
    /// [`Features`] iterates, does not hold: one pass, as [`FeatureIndex::fill`].
    pub fn first_missing<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<&str> {
        let mut names = names.into_iter().peekable();
        'model: for (name, _) in &self.sorted {
            while let Some(given) = names.peek() {
                match (*given).cmp(name.as_str()) {
                    Ordering::Less => {
                        names.next();
                    }
                    Ordering::Equal => {
                        names.next();
                        continue 'model;
                    }
                    Ordering::Greater => break,
                }
            }
            return Some(name);
        }
        None
    }

    /// Writes each named value into its columns of `row`, in one pass: `named` must come
    /// in name order (as [`Features`] iterates), as `sorted` does. Columns whose name is not
    /// given keep what they hold; names the model does not take are skipped.
    pub fn fill<'a, T: Copy>(&self, row: &mut [T], named: impl IntoIterator<Item = (&'a str, T)>) {
        let mut names = self.sorted.iter().peekable();
        for (key, value) in named {
            while let Some((name, columns)) = names.peek() {
                match name.as_str().cmp(key) {
                    Ordering::Less => {
                        names.next();
                    }
                    Ordering::Equal => {
                        for &c in columns {
                            row[c] = value;
                        }
                        names.next();
                        break;
                    }
                    Ordering::Greater => break,
                }
            }
            if names.peek().is_none() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(names: &[&str]) -> FeatureIndex {
        FeatureIndex::new(names.iter().map(|n| n.to_string()).collect())
    }

    /// The columns a scan of every name finds.
    fn scan(index: &FeatureIndex, key: &str) -> Vec<usize> {
        (0..index.columns().len())
            .filter(|&c| index.columns()[c] == key)
            .collect()
    }

    #[test]
    fn the_first_missing_name_is_found_in_one_pass() {
        let idx = index(&["hour", "amount", "zeta", "amount"]);
        let missing = |given: &[&str]| idx.first_missing(given.iter().copied()).map(str::to_string);
        assert_eq!(missing(&["amount", "hour", "zeta"]), None);
        assert_eq!(
            missing(&["a", "amount", "b", "hour", "x", "zeta", "zz"]),
            None
        );
        assert_eq!(missing(&["amount", "zeta"]), Some("hour".into()));
        assert_eq!(missing(&["hour", "zeta"]), Some("amount".into()));
        assert_eq!(missing(&["amount", "hour"]), Some("zeta".into()));
        assert_eq!(missing(&["zz"]), Some("amount".into()));
        assert_eq!(missing(&[]), Some("amount".into()));
        assert_eq!(index(&[]).first_missing(["a"]), None);
    }

    #[test]
    fn a_name_listed_twice_is_one_entry_with_both_columns() {
        let i = index(&["b", "a", "b", "c"]);
        let sorted: Vec<(&str, &[usize])> = i
            .sorted()
            .iter()
            .map(|(n, c)| (n.as_str(), c.as_slice()))
            .collect();
        assert_eq!(sorted, [("a", &[1][..]), ("b", &[0, 2]), ("c", &[3])]);
        assert!(i.contains("b") && !i.contains("d") && !i.contains(""));
    }

    #[test]
    fn find_agrees_with_a_scan_in_any_order_of_keys() {
        let models: [&[&str]; 5] = [
            &["amount", "hour", "merchant", "velocity"],
            &["zeta", "alpha", "mid", "beta"],
            &["b", "a", "b", "c"],
            &["x"],
            &[],
        ];
        for names in models {
            let i = index(names);
            let mut sorted: Vec<&str> = names.to_vec();
            sorted.sort();
            let mut reversed = names.to_vec();
            reversed.reverse();
            let orders: Vec<Vec<&str>> = vec![
                names.to_vec(),
                sorted.clone(),
                reversed,
                [names, &["unknown", "", "zz"][..], names].concat(),
                sorted.iter().rev().copied().collect(),
                vec!["a", "a", "b", "nope", "b"],
            ];
            for keys in orders {
                let mut cursor = Cursor::default();
                for key in &keys {
                    let found = i.find(key, &mut cursor).map(<[usize]>::to_vec);
                    let want = Some(scan(&i, key)).filter(|c| !c.is_empty());
                    assert_eq!(found, want, "{key:?} of {keys:?} in {names:?}");
                }
            }
        }
    }

    #[test]
    fn fill_writes_every_column_of_a_name_and_skips_unknown_names() {
        let i = index(&["b", "a", "b", "d"]);
        let mut row = [-1.0_f32; 4];
        i.fill(&mut row, [("a", 1.0), ("b", 2.0), ("c", 3.0), ("e", 5.0)]);
        assert_eq!(row, [2.0, 1.0, 2.0, -1.0]);
        // And back: the values of the columns under their names, in name order.
        assert_eq!(
            i.features(&[2.0, 1.0, 2.0, 4.0]),
            Features::from([("a".into(), 1.0), ("b".into(), 2.0), ("d".into(), 4.0)])
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Whatever the order and repeats, features read as a map built by inserts:
            /// collected, read back by name, in order, changed, and through Avro's
            /// `map<double>` and JSON.
            #[test]
            fn features_behave_as_a_map_built_by_inserts(
                entries in prop::collection::vec(("[a-d]{0,2}", -1e6f64..1e6), 0..12),
                changes in prop::collection::vec(("[a-d]{0,2}", prop::option::of(-1e6f64..1e6)), 0..6),
            ) {
                let mut map = BTreeMap::new();
                for (k, v) in &entries {
                    map.insert(k.clone(), *v);
                }
                let mut features: Features = entries.iter().cloned().collect();
                prop_assert_eq!(&features, &Features::from(map.clone()));
                prop_assert!(features.iter().eq(map.iter()));
                for (name, value) in changes {
                    match value {
                        Some(v) => prop_assert_eq!(
                            features.insert(name.clone(), v),
                            map.insert(name, v)
                        ),
                        None => prop_assert_eq!(features.remove(&name), map.remove(&name)),
                    }
                }
                prop_assert_eq!(features.len(), map.len());
                for k in ["", "a", "ab", "d", "zz"] {
                    prop_assert_eq!(features.get(k), map.get(k));
                }
                prop_assert_eq!(serde_json::to_string(&features).unwrap(), serde_json::to_string(&map).unwrap());
                // serde_json's float parsing is not exact: compared with a map it read.
                let json = serde_json::to_string(&map).unwrap();
                let back: Features = serde_json::from_str(&json).unwrap();
                let map_back: BTreeMap<String, f64> = serde_json::from_str(&json).unwrap();
                prop_assert_eq!(back, Features::from(map_back));
            }
        }
    }
}
