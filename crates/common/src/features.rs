//! A model's feature names indexed by name, for the services that match an event's
//! named features to the model's columns (ingest, the micro-batcher).

use std::cmp::Ordering;

/// A model's feature names in column order, and the distinct names sorted, each with
/// the columns it fills (a name the model lists twice fills both).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureIndex {
    columns: Vec<String>,
    sorted: Vec<(String, Vec<usize>)>,
    /// Each column's place in `sorted`.
    entry: Vec<usize>,
}

/// Where [`FeatureIndex::find`] last found a name, in column order and in name order.
/// Publishers write features in one of the two, so the next name is tried first at
/// the place after it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    column: Option<usize>,
    entry: Option<usize>,
}

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
        let next_column = cursor.column.map_or(0, |c| c + 1);
        let next_entry = cursor.entry.map_or(0, |e| e + 1);
        let at = if self.columns.get(next_column).is_some_and(|c| c == name) {
            self.entry[next_column]
        } else if self.sorted.get(next_entry).is_some_and(|(n, _)| n == name) {
            next_entry
        } else {
            self.position(name)?
        };
        let columns = &self.sorted[at].1;
        cursor.entry = Some(at);
        cursor.column = columns.last().copied();
        Some(columns)
    }

    /// Writes each named value into its columns of `row`, in one pass: `named` must come
    /// in name order (a `BTreeMap`'s), as `sorted` does. Columns whose name is not
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
    }
}
