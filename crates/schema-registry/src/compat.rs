//! Compatibility levels as Confluent defines them, checked with apache-avro's schema
//! resolution rules.
//!
//! BACKWARD: the new schema reads data written with the old one. FORWARD: the old schema
//! reads data written with the new one. FULL: both. Plain levels compare with the latest
//! live version only; `_TRANSITIVE` levels with every live version.

use std::fmt;
use std::str::FromStr;

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Level {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Level::Backward | Level::BackwardTransitive | Level::Full | Level::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Level::Forward | Level::ForwardTransitive | Level::Full | Level::FullTransitive
        )
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Level::None,
            Level::Backward,
            Level::BackwardTransitive,
            Level::Forward,
            Level::ForwardTransitive,
            Level::Full,
            Level::FullTransitive,
        ]
        .into_iter()
        .find(|l| l.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("Invalid compatibility level. Valid values are none, backward, forward, full, backward_transitive, forward_transitive, and full_transitive (got {s:?})"))
    }
}

/// Whether `reader` can read everything `writer` wrote. A partial match (an enum symbol
/// the reader lacks) fails as Confluent's checker does.
fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => {
            Err("the reader cannot read every value of the writer".into())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Messages explaining why `new` is incompatible with `existing` (newest first) under
/// `level`; empty when compatible.
pub fn check(level: Level, new: &Schema, existing: &[(u32, &Schema)]) -> Vec<String> {
    let against = if level.transitive() {
        existing
    } else {
        &existing[..existing.len().min(1)]
    };
    let mut messages = Vec::new();
    for (version, old) in against {
        if level.backward()
            && let Err(e) = can_read(old, new)
        {
            messages.push(format!(
                "{level}: new schema cannot read data written by version {version}: {e}"
            ));
        }
        if level.forward()
            && let Err(e) = can_read(new, old)
        {
            messages.push(format!(
                "{level}: version {version} cannot read data written by the new schema: {e}"
            ));
        }
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"R","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn levels_parse_any_case() {
        assert_eq!(
            "full_transitive".parse::<Level>(),
            Ok(Level::FullTransitive)
        );
        assert_eq!("BACKWARD".parse::<Level>(), Ok(Level::Backward));
        assert!("SIDEWAYS".parse::<Level>().is_err());
    }

    #[test]
    fn backward_allows_an_optional_field_and_refuses_a_required_one() {
        let v1 = record(r#"{"name":"a","type":"string"}"#);
        let optional = record(
            r#"{"name":"a","type":"string"},{"name":"b","type":["null","long"],"default":null}"#,
        );
        let required = record(r#"{"name":"a","type":"string"},{"name":"b","type":"long"}"#);
        assert!(check(Level::Backward, &optional, &[(1, &v1)]).is_empty());
        assert!(!check(Level::Backward, &required, &[(1, &v1)]).is_empty());
        // Forward: old readers ignore an added field, required or not.
        assert!(check(Level::Forward, &required, &[(1, &v1)]).is_empty());
        assert!(!check(Level::Full, &required, &[(1, &v1)]).is_empty());
        assert!(check(Level::None, &required, &[(1, &v1)]).is_empty());
    }

    #[test]
    fn forward_refuses_removing_a_field_without_default() {
        let v1 = record(r#"{"name":"a","type":"string"},{"name":"b","type":"long"}"#);
        let v2 = record(r#"{"name":"a","type":"string"}"#);
        assert!(check(Level::Backward, &v2, &[(1, &v1)]).is_empty());
        assert!(!check(Level::Forward, &v2, &[(1, &v1)]).is_empty());
    }

    #[test]
    fn transitive_checks_every_version() {
        let v1 = record(r#"{"name":"a","type":"string"}"#);
        let v2 = record(r#"{"name":"a","type":"string"},{"name":"b","type":"long","default":0}"#);
        // v3 drops the default: fine against v2 (which has b), not against v1.
        let v3 = record(r#"{"name":"a","type":"string"},{"name":"b","type":"long"}"#);
        let existing = [(2, &v2), (1, &v1)];
        assert!(check(Level::Backward, &v3, &existing).is_empty());
        let msgs = check(Level::BackwardTransitive, &v3, &existing);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].contains("version 1"));
    }
}
