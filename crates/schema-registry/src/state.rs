//! The registry's state in memory, built by applying log entries in order.
//!
//! Entries come from a file an operator can edit, so applying one checks that it fits
//! the state before it (a version names a known schema id, ids and versions are never
//! handed out twice) and says why not, instead of leaving a state that would panic or
//! answer wrongly later.

use std::collections::{BTreeMap, HashMap};

use apache_avro::Schema;

use crate::compat::Level;
use crate::error::ApiError;
use crate::log::Entry;

/// Highest schema id and version: Confluent's are Java `int`s. Bounding what the log
/// may hold also keeps the next one (`+ 1`) from overflowing.
pub const MAX_ID: u32 = i32::MAX as u32;

#[derive(Debug, Clone)]
pub(crate) struct VersionEntry {
    pub version: u32,
    pub id: u32,
    pub deleted: bool,
}

/// Which versions (or subjects) a read shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// Live ones only (the default).
    Live,
    /// Live and soft-deleted (`deleted=true`).
    All,
    /// Soft-deleted only (`deletedOnly=true`).
    DeletedOnly,
}

impl Show {
    pub fn from_flags(deleted: bool, deleted_only: bool) -> Self {
        match (deleted, deleted_only) {
            (_, true) => Show::DeletedOnly,
            (true, false) => Show::All,
            (false, false) => Show::Live,
        }
    }

    fn shows(self, v: &VersionEntry) -> bool {
        match self {
            Show::Live => !v.deleted,
            Show::All => true,
            Show::DeletedOnly => v.deleted,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Subject {
    /// In ascending version order: entries only ever add a higher version.
    pub versions: Vec<VersionEntry>,
    pub level: Option<Level>,
}

impl Subject {
    pub fn live(&self) -> impl DoubleEndedIterator<Item = &VersionEntry> {
        self.versions.iter().filter(|v| !v.deleted)
    }

    pub fn visible(&self, show: Show) -> impl DoubleEndedIterator<Item = &VersionEntry> {
        self.versions.iter().filter(move |v| show.shows(v))
    }

    /// Whether a subject listing shows this subject: a soft-deleted subject is one with
    /// versions, none of them live.
    pub fn listed(&self, show: Show) -> bool {
        let live = self.live().next().is_some();
        match show {
            Show::Live => live,
            Show::All => !self.versions.is_empty(),
            Show::DeletedOnly => !live && !self.versions.is_empty(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct State {
    /// Canonical schema text and its parsed form by id; ids start at 1.
    pub schemas: BTreeMap<u32, (String, Schema)>,
    pub by_canonical: HashMap<String, u32>,
    pub subjects: BTreeMap<String, Subject>,
    pub level: Level,
}

impl State {
    pub fn new() -> Self {
        Self {
            schemas: BTreeMap::new(),
            by_canonical: HashMap::new(),
            subjects: BTreeMap::new(),
            level: Level::Backward,
        }
    }

    /// Applies one change, or says why it does not fit the state.
    pub fn apply(&mut self, entry: Entry) -> Result<(), String> {
        match entry {
            Entry::Schema { id, schema } => {
                if !(1..=MAX_ID).contains(&id) || self.schemas.contains_key(&id) {
                    return Err(format!("schema id {id} is out of range or defined twice"));
                }
                let parsed = Schema::parse_str(&schema).map_err(|e| e.to_string())?;
                self.by_canonical.insert(schema.clone(), id);
                self.schemas.insert(id, (schema, parsed));
            }
            Entry::Version {
                subject,
                version,
                id,
            } => {
                if !self.schemas.contains_key(&id) {
                    return Err(format!(
                        "subject {subject:?} version {version} names unknown schema id {id}"
                    ));
                }
                let s = self.subjects.entry(subject).or_default();
                let last = s.versions.last().map_or(0, |v| v.version);
                if version <= last || version > MAX_ID {
                    return Err(format!(
                        "version {version} does not follow version {last} of its subject"
                    ));
                }
                s.versions.push(VersionEntry {
                    version,
                    id,
                    deleted: false,
                });
            }
            Entry::DeleteVersion {
                subject,
                version,
                permanent,
            } => {
                if let Some(s) = self.subjects.get_mut(&subject) {
                    if permanent {
                        s.versions.retain(|v| v.version != version);
                    } else if let Some(v) = s.versions.iter_mut().find(|v| v.version == version) {
                        v.deleted = true;
                    }
                    if s.versions.is_empty() && s.level.is_none() {
                        self.subjects.remove(&subject);
                    }
                }
            }
            Entry::Config {
                subject: None,
                level,
            } => self.level = level.unwrap_or(Level::Backward),
            Entry::Config {
                subject: Some(subject),
                level,
            } => {
                self.subjects.entry(subject).or_default().level = level;
            }
        }
        Ok(())
    }

    /// A subject that has versions (live or soft-deleted).
    pub fn subject(&self, name: &str) -> Result<&Subject, ApiError> {
        self.subjects
            .get(name)
            .filter(|s| !s.versions.is_empty())
            .ok_or_else(|| ApiError::subject_not_found(name))
    }

    /// The schema with `id`; every version names one, as [`State::apply`] checks.
    pub fn schema(&self, id: u32) -> Result<&(String, Schema), ApiError> {
        self.schemas
            .get(&id)
            .ok_or_else(|| ApiError::store(format!("schema id {id} is missing from the log")))
    }

    /// The level that governs `subject`: its own, else the global one.
    pub fn level_for(&self, subject: &str) -> Level {
        self.subjects
            .get(subject)
            .and_then(|s| s.level)
            .unwrap_or(self.level)
    }

    /// `(version, schema)` of `versions`, newest first, for compatibility checks.
    pub fn parsed<'a>(
        &'a self,
        versions: impl DoubleEndedIterator<Item = &'a VersionEntry>,
    ) -> Result<Vec<(u32, &'a Schema)>, ApiError> {
        versions
            .rev()
            .map(|v| self.schema(v.id).map(|(_, s)| (v.version, s)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_that_contradict_the_state_are_refused() {
        let mut s = State::new();
        let schema = |id| Entry::Schema {
            id,
            schema: r#""string""#.into(),
        };
        let version = |version, id| Entry::Version {
            subject: "t".into(),
            version,
            id,
        };
        assert!(s.apply(version(1, 1)).unwrap_err().contains("unknown"));
        s.apply(schema(1)).unwrap();
        assert!(s.apply(schema(1)).unwrap_err().contains("twice"));
        assert!(s.apply(schema(0)).is_err());
        assert!(s.apply(schema(MAX_ID + 1)).is_err());
        assert!(s.apply(version(MAX_ID + 1, 1)).is_err());
        s.apply(version(1, 1)).unwrap();
        assert!(s.apply(version(1, 1)).unwrap_err().contains("follow"));
        assert!(
            s.apply(Entry::Schema {
                id: 2,
                schema: "{".into()
            })
            .is_err()
        );
    }
}
