//! Registry state and its durable log.
//!
//! Why an append-only JSON-lines log: it is what Confluent's registry does with its
//! `_schemas` topic. Every change is one line, written and fsynced before it is applied,
//! and the state is rebuilt by replaying the lines at start, so ids never change across
//! restarts. Writes are rare (a service registers its schema once), reads are served from
//! memory, and the format needs no dependency and can be read with `cat`. A torn last
//! line (a crash mid-write) is skipped with a warning; it was never acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use crate::compat::{self, Level};
use crate::error::ApiError;

const LOG_FILE: &str = "schemas.log";

/// One durable change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Entry {
    Schema {
        id: u32,
        schema: String,
    },
    Version {
        subject: String,
        version: u32,
        id: u32,
    },
    DeleteVersion {
        subject: String,
        version: u32,
        permanent: bool,
    },
    Config {
        subject: Option<String>,
        level: Option<Level>,
    },
}

#[derive(Debug, Clone)]
struct VersionEntry {
    version: u32,
    id: u32,
    deleted: bool,
}

#[derive(Debug, Default)]
struct Subject {
    versions: Vec<VersionEntry>,
    level: Option<Level>,
}

impl Subject {
    fn live(&self) -> impl DoubleEndedIterator<Item = &VersionEntry> {
        self.versions.iter().filter(|v| !v.deleted)
    }
    fn visible(&self, deleted: bool) -> impl DoubleEndedIterator<Item = &VersionEntry> {
        self.versions.iter().filter(move |v| deleted || !v.deleted)
    }
}

#[derive(Debug)]
struct State {
    /// Canonical schema text by id; ids start at 1.
    schemas: BTreeMap<u32, (String, Schema)>,
    by_canonical: HashMap<String, u32>,
    subjects: BTreeMap<String, Subject>,
    level: Level,
}

impl State {
    fn new() -> Self {
        Self {
            schemas: BTreeMap::new(),
            by_canonical: HashMap::new(),
            subjects: BTreeMap::new(),
            level: Level::Backward,
        }
    }

    fn apply(&mut self, entry: Entry) -> Result<(), String> {
        match entry {
            Entry::Schema { id, schema } => {
                let parsed = Schema::parse_str(&schema).map_err(|e| e.to_string())?;
                self.by_canonical.insert(schema.clone(), id);
                self.schemas.insert(id, (schema, parsed));
            }
            Entry::Version {
                subject,
                version,
                id,
            } => {
                let s = self.subjects.entry(subject).or_default();
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

    fn subject(&self, name: &str) -> Result<&Subject, ApiError> {
        self.subjects
            .get(name)
            .filter(|s| !s.versions.is_empty())
            .ok_or_else(|| ApiError::subject_not_found(name))
    }

    fn schema_text(&self, id: u32) -> &str {
        &self.schemas[&id].0
    }
}

/// Cuts a partial last line (a crash mid-write) so the next append starts clean.
fn drop_torn_tail(path: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read(path)?;
    if bytes.last().is_some_and(|b| *b != b'\n') {
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        tracing::warn!(path = %path.display(), dropped = bytes.len() - keep, "dropping a torn last line");
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(keep as u64)?;
    }
    Ok(())
}

/// Which version a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSpec {
    Latest,
    Number(u32),
}

impl VersionSpec {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        if s == "latest" || s == "-1" {
            return Ok(VersionSpec::Latest);
        }
        match s.parse::<u32>() {
            Ok(n) if n >= 1 && n <= i32::MAX as u32 => Ok(VersionSpec::Number(n)),
            _ => Err(ApiError::invalid_version(s)),
        }
    }
}

/// One version of a subject, as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubjectVersion {
    pub subject: String,
    pub version: u32,
    pub id: u32,
    pub schema: String,
}

pub struct Store {
    state: Mutex<State>,
    log: Option<Mutex<File>>,
    path: Option<PathBuf>,
}

/// Parses and canonicalises a schema: the JSON form apache-avro writes, which keeps
/// defaults, docs and logical types but not whitespace or attribute order.
pub fn canonical(schema: &str) -> Result<(String, Schema), ApiError> {
    let parsed = Schema::parse_str(schema)
        .map_err(|e| ApiError::invalid_schema(format!("Invalid schema: {e}")))?;
    let text = serde_json::to_string(&parsed)
        .map_err(|e| ApiError::invalid_schema(format!("Invalid schema: {e}")))?;
    Ok((text, parsed))
}

impl Store {
    /// State kept in memory only.
    pub fn in_memory() -> Self {
        Self {
            state: Mutex::new(State::new()),
            log: None,
            path: None,
        }
    }

    /// Opens (or creates) the log in `dir` and replays it.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let mut state = State::new();
        let mut replayed = 0usize;
        if path.exists() {
            drop_torn_tail(&path)?;
            let reader = BufReader::new(File::open(&path)?);
            for (n, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Entry>(&line)
                    .map_err(|e| e.to_string())
                    .and_then(|e| state.apply(e))
                {
                    Ok(()) => replayed += 1,
                    Err(e) => {
                        tracing::warn!(line = n + 1, path = %path.display(), error = %e, "skipping unreadable log line")
                    }
                }
            }
        }
        tracing::info!(path = %path.display(), entries = replayed, schemas = state.schemas.len(), "registry log replayed");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self {
            state: Mutex::new(state),
            log: Some(Mutex::new(file)),
            path: Some(path),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes `entries` durably, then applies them. Runs under the state lock, so ids
    /// and versions are handed out in log order.
    fn commit(&self, state: &mut State, entries: Vec<Entry>) -> Result<(), ApiError> {
        if let Some(log) = &self.log {
            let mut text = String::new();
            for e in &entries {
                text.push_str(
                    &serde_json::to_string(e).map_err(|e| ApiError::store(e.to_string()))?,
                );
                text.push('\n');
            }
            let mut file = log.lock().expect("log lock");
            file.write_all(text.as_bytes())
                .and_then(|_| file.sync_data())
                .map_err(|e| ApiError::store(format!("Error while registering schema: {e}")))?;
        }
        for e in entries {
            state.apply(e).map_err(ApiError::store)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("registry state lock")
    }

    /// Registers `schema` under `subject`; the same schema twice yields the same id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, ApiError> {
        let (text, parsed) = canonical(schema)?;
        let mut state = self.lock();
        let existing_id = state.by_canonical.get(&text).copied();
        if let (Some(id), Some(s)) = (existing_id, state.subjects.get(subject))
            && s.live().any(|v| v.id == id)
        {
            return Ok(id);
        }
        let level = state
            .subjects
            .get(subject)
            .and_then(|s| s.level)
            .unwrap_or(state.level);
        if let Some(s) = state.subjects.get(subject) {
            let existing: Vec<(u32, &Schema)> = s
                .live()
                .rev()
                .map(|v| (v.version, &state.schemas[&v.id].1))
                .collect();
            let problems = compat::check(level, &parsed, &existing);
            if !problems.is_empty() {
                return Err(ApiError::incompatible(format!(
                    "Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]",
                    problems.join("; ")
                )));
            }
        }
        let mut entries = Vec::new();
        let id = match existing_id {
            Some(id) => id,
            None => {
                let id = state.schemas.keys().next_back().map_or(1, |m| m + 1);
                entries.push(Entry::Schema { id, schema: text });
                id
            }
        };
        let version = state
            .subjects
            .get(subject)
            .and_then(|s| s.versions.iter().map(|v| v.version).max())
            .map_or(1, |m| m + 1);
        entries.push(Entry::Version {
            subject: subject.to_string(),
            version,
            id,
        });
        self.commit(&mut state, entries)?;
        tracing::info!(%subject, version, id, "schema registered");
        Ok(id)
    }

    /// The live version of `subject` holding `schema`.
    pub fn lookup(
        &self,
        subject: &str,
        schema: &str,
        deleted: bool,
    ) -> Result<SubjectVersion, ApiError> {
        let (text, _) = canonical(schema)?;
        let state = self.lock();
        let s = state.subject(subject)?;
        let id = state
            .by_canonical
            .get(&text)
            .ok_or_else(ApiError::schema_not_found)?;
        let v = s
            .visible(deleted)
            .rev()
            .find(|v| v.id == *id)
            .ok_or_else(ApiError::schema_not_found)?;
        Ok(SubjectVersion {
            subject: subject.into(),
            version: v.version,
            id: v.id,
            schema: text,
        })
    }

    pub fn subjects(&self, deleted: bool) -> Vec<String> {
        let state = self.lock();
        state
            .subjects
            .iter()
            .filter(|(_, s)| s.visible(deleted).next().is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn versions(&self, subject: &str, deleted: bool) -> Result<Vec<u32>, ApiError> {
        let state = self.lock();
        let s = state.subject(subject)?;
        let versions: Vec<u32> = s.visible(deleted).map(|v| v.version).collect();
        if versions.is_empty() {
            return Err(ApiError::subject_not_found(subject));
        }
        Ok(versions)
    }

    pub fn version(
        &self,
        subject: &str,
        spec: VersionSpec,
        deleted: bool,
    ) -> Result<SubjectVersion, ApiError> {
        let state = self.lock();
        let s = state.subject(subject)?;
        let found = match spec {
            VersionSpec::Latest => s.visible(deleted).next_back(),
            VersionSpec::Number(n) => s.visible(deleted).find(|v| v.version == n),
        };
        let v = match (found, spec) {
            (Some(v), _) => v,
            (None, VersionSpec::Number(n)) => {
                return Err(ApiError::version_not_found(&n.to_string()));
            }
            (None, VersionSpec::Latest) => return Err(ApiError::subject_not_found(subject)),
        };
        Ok(SubjectVersion {
            subject: subject.into(),
            version: v.version,
            id: v.id,
            schema: state.schema_text(v.id).to_string(),
        })
    }

    pub fn schema_by_id(&self, id: u32) -> Result<String, ApiError> {
        let state = self.lock();
        state
            .schemas
            .get(&id)
            .map(|(t, _)| t.clone())
            .ok_or_else(ApiError::schema_not_found)
    }

    /// Subject/version pairs that use schema `id`.
    pub fn id_versions(&self, id: u32) -> Result<Vec<(String, u32)>, ApiError> {
        let state = self.lock();
        if !state.schemas.contains_key(&id) {
            return Err(ApiError::schema_not_found());
        }
        Ok(state
            .subjects
            .iter()
            .flat_map(|(name, s)| {
                s.live()
                    .filter(|v| v.id == id)
                    .map(|v| (name.clone(), v.version))
            })
            .collect())
    }

    /// Deletes every version of `subject`: soft first, permanently once soft-deleted.
    pub fn delete_subject(&self, subject: &str, permanent: bool) -> Result<Vec<u32>, ApiError> {
        let mut state = self.lock();
        let s = state.subject(subject)?;
        let targets: Vec<u32> = if permanent {
            if s.live().next().is_some() {
                return Err(ApiError::subject_not_soft_deleted(subject));
            }
            s.versions.iter().map(|v| v.version).collect()
        } else {
            let live: Vec<u32> = s.live().map(|v| v.version).collect();
            if live.is_empty() {
                return Err(ApiError::subject_not_found(subject));
            }
            live
        };
        let entries = targets
            .iter()
            .map(|&version| Entry::DeleteVersion {
                subject: subject.into(),
                version,
                permanent,
            })
            .collect();
        self.commit(&mut state, entries)?;
        tracing::info!(%subject, permanent, versions = ?targets, "subject deleted");
        Ok(targets)
    }

    pub fn delete_version(
        &self,
        subject: &str,
        spec: VersionSpec,
        permanent: bool,
    ) -> Result<u32, ApiError> {
        let mut state = self.lock();
        let s = state.subject(subject)?;
        let v = match spec {
            VersionSpec::Latest => s.live().next_back(),
            VersionSpec::Number(n) => s
                .versions
                .iter()
                .find(|v| v.version == n && (permanent || !v.deleted)),
        }
        .ok_or_else(|| ApiError::version_not_found(&format!("{spec:?}")))?;
        if permanent && !v.deleted {
            return Err(ApiError::version_not_soft_deleted(subject, v.version));
        }
        let version = v.version;
        self.commit(
            &mut state,
            vec![Entry::DeleteVersion {
                subject: subject.into(),
                version,
                permanent,
            }],
        )?;
        Ok(version)
    }

    /// The subject's own level (`None` when it has none), or the global one.
    pub fn level(&self, subject: Option<&str>) -> Option<Level> {
        let state = self.lock();
        match subject {
            None => Some(state.level),
            Some(s) => state.subjects.get(s).and_then(|s| s.level),
        }
    }

    pub fn set_level(&self, subject: Option<&str>, level: Option<Level>) -> Result<(), ApiError> {
        let mut state = self.lock();
        self.commit(
            &mut state,
            vec![Entry::Config {
                subject: subject.map(Into::into),
                level,
            }],
        )
    }

    /// Compatibility of `schema` with one version of `subject`, or with the versions the
    /// subject's level names when `spec` is `None`.
    pub fn check(
        &self,
        subject: &str,
        spec: Option<VersionSpec>,
        schema: &str,
    ) -> Result<Vec<String>, ApiError> {
        let (_, parsed) = canonical(schema)?;
        let state = self.lock();
        let level = state
            .subjects
            .get(subject)
            .and_then(|s| s.level)
            .unwrap_or(state.level);
        let Some(s) = state
            .subjects
            .get(subject)
            .filter(|s| s.live().next().is_some())
        else {
            return match spec {
                None => Ok(Vec::new()),
                Some(_) => Err(ApiError::subject_not_found(subject)),
            };
        };
        let existing: Vec<(u32, &Schema)> = match spec {
            None => s
                .live()
                .rev()
                .map(|v| (v.version, &state.schemas[&v.id].1))
                .collect(),
            Some(VersionSpec::Latest) => s
                .live()
                .next_back()
                .map(|v| (v.version, &state.schemas[&v.id].1))
                .into_iter()
                .collect(),
            Some(VersionSpec::Number(n)) => {
                let v = s
                    .live()
                    .find(|v| v.version == n)
                    .ok_or_else(|| ApiError::version_not_found(&n.to_string()))?;
                vec![(v.version, &state.schemas[&v.id].1)]
            }
        };
        Ok(compat::check(level, &parsed, &existing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"type":"record","name":"E","fields":[{"name":"a","type":"string"}]}"#;
    const V2: &str = r#"{"type":"record","name":"E","fields":[{"name":"a","type":"string"},{"name":"b","type":["null","long"],"default":null}]}"#;

    #[test]
    fn same_schema_same_id_across_subjects_and_whitespace() {
        let s = Store::in_memory();
        let id = s.register("t-value", V1).unwrap();
        assert_eq!(s.register("t-value", &V1.replace(',', " , ")).unwrap(), id);
        assert_eq!(s.register("u-value", V1).unwrap(), id, "ids are global");
        assert_eq!(s.versions("t-value", false).unwrap(), vec![1]);
        assert_eq!(s.register("t-value", V2).unwrap(), id + 1);
        assert_eq!(s.versions("t-value", false).unwrap(), vec![1, 2]);
    }

    #[test]
    fn soft_delete_hides_and_permanent_requires_soft_first() {
        let s = Store::in_memory();
        s.register("t", V1).unwrap();
        s.register("t", V2).unwrap();
        assert_eq!(
            s.delete_version("t", VersionSpec::Number(2), true)
                .unwrap_err()
                .code,
            40407
        );
        assert_eq!(
            s.delete_version("t", VersionSpec::Number(2), false)
                .unwrap(),
            2
        );
        assert_eq!(s.versions("t", false).unwrap(), vec![1]);
        assert_eq!(s.versions("t", true).unwrap(), vec![1, 2]);
        assert_eq!(
            s.version("t", VersionSpec::Latest, false).unwrap().version,
            1
        );
        assert_eq!(s.delete_subject("t", true).unwrap_err().code, 40405);
        assert_eq!(s.delete_subject("t", false).unwrap(), vec![1]);
        assert!(s.subjects(false).is_empty());
        assert_eq!(s.subjects(true), vec!["t".to_string()]);
        assert_eq!(s.delete_subject("t", true).unwrap(), vec![1, 2]);
        assert!(s.subjects(true).is_empty());
        assert_eq!(s.versions("t", true).unwrap_err().code, 40401);
        // The schema's id outlives its subjects.
        assert!(s.schema_by_id(1).is_ok());
    }

    #[test]
    fn log_replay_restores_ids_versions_deletes_and_config() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.register("t", V1).unwrap();
            s.register("t", V2).unwrap();
            s.delete_version("t", VersionSpec::Number(1), false)
                .unwrap();
            s.set_level(Some("t"), Some(Level::Full)).unwrap();
            s.set_level(None, Some(Level::Forward)).unwrap();
        }
        // A crash mid-write leaves a torn line; it is skipped.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .unwrap();
        f.write_all(b"{\"op\":\"schema\",\"id\":3,\"sch").unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.versions("t", false).unwrap(), vec![2]);
        let v3 = V2.replace("\"b\"", "\"c\"");
        assert_eq!(
            s.register("other", &v3).unwrap(),
            3,
            "the torn id is handed out again"
        );
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.schema_by_id(3).unwrap(), canonical(&v3).unwrap().0);
        assert_eq!(s.version("t", VersionSpec::Number(2), false).unwrap().id, 2);
        assert_eq!(s.level(Some("t")), Some(Level::Full));
        assert_eq!(s.level(None), Some(Level::Forward));
        assert_eq!(s.register("t", V2).unwrap(), 2);
    }
}
