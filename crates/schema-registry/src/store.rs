//! Registry operations: what each API call reads or changes, under one lock.
//!
//! A change is written to the durable [`Log`] and fsynced before it is applied to the
//! in-memory [`State`], while the lock is held, so ids and versions are handed out in
//! log order and an acknowledged change survives a crash. Reads are served from memory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use apache_avro::Schema;
use serde::Serialize;

use crate::compat::{self, Level};
use crate::error::ApiError;
use crate::log::{Entry, Log, LogError};
use crate::state::{MAX_ID, Show, State};

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
    log: Option<Mutex<Log>>,
    path: Option<PathBuf>,
}

/// Parses and canonicalises a schema: the JSON form apache-avro writes, which keeps
/// defaults, docs and logical types but not whitespace or attribute order.
pub fn canonical(schema: &str) -> Result<(String, Schema), ApiError> {
    let parsed = Schema::parse_str(schema)
        .map_err(|e| ApiError::invalid_schema(format!("Invalid schema: {e}")))?;
    let text = serde_json::to_string(&parsed)
        .map_err(|e| ApiError::invalid_schema(format!("Invalid schema: {e}")))?;
    // The log stores this text and replay parses it; a text that did not parse back
    // would stop the next start, so it is refused now instead.
    Schema::parse_str(&text).map_err(|e| {
        ApiError::invalid_schema(format!(
            "Invalid schema: its canonical form does not parse: {e}"
        ))
    })?;
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

    /// Opens (or creates) the log in `dir` and replays it. Fails, naming the line, when
    /// a line is corrupt or contradicts the ones before it.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        let (log, entries) = Log::open(dir)?;
        let mut state = State::new();
        let replayed = entries.len();
        for (line, entry) in entries {
            state.apply(entry).map_err(|reason| LogError::Corrupt {
                path: log.path().to_path_buf(),
                line,
                reason,
            })?;
        }
        let path = log.path().to_path_buf();
        tracing::info!(path = %path.display(), entries = replayed, schemas = state.schemas.len(), "registry log replayed");
        Ok(Self {
            state: Mutex::new(state),
            log: Some(Mutex::new(log)),
            path: Some(path),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes `entries` durably, then applies them. Runs under the state lock, so ids
    /// and versions are handed out in log order. Callers build only entries that apply
    /// (a parsing schema, the next id and version), since replay refuses any that do not.
    fn commit(&self, state: &mut State, entries: Vec<Entry>) -> Result<(), ApiError> {
        if let Some(log) = &self.log {
            log.lock()
                .expect("log lock")
                .append(&entries)
                .map_err(|e| {
                    ApiError::store(format!("Error while writing the registry log: {e}"))
                })?;
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
        if let Some(s) = state.subjects.get(subject) {
            let existing = state.parsed(s.live())?;
            let problems = compat::check(state.level_for(subject), &parsed, &existing);
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
                if id > MAX_ID {
                    return Err(ApiError::store("No schema ids left"));
                }
                entries.push(Entry::Schema { id, schema: text });
                id
            }
        };
        let version = state
            .subjects
            .get(subject)
            .and_then(|s| s.versions.last())
            .map_or(1, |v| v.version + 1);
        if version > MAX_ID {
            return Err(ApiError::store(format!(
                "No versions left in subject {subject:?}"
            )));
        }
        entries.push(Entry::Version {
            subject: subject.to_string(),
            version,
            id,
        });
        self.commit(&mut state, entries)?;
        tracing::info!(%subject, version, id, "schema registered");
        Ok(id)
    }

    /// The version of `subject` holding `schema`, the newest if several do.
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
            .visible(Show::from_flags(deleted, false))
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

    /// Subject names in order, those starting with `prefix` when one is given.
    pub fn subjects(&self, show: Show, prefix: Option<&str>) -> Vec<String> {
        let state = self.lock();
        state
            .subjects
            .iter()
            .filter(|(name, s)| s.listed(show) && prefix.is_none_or(|p| name.starts_with(p)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn versions(&self, subject: &str, show: Show) -> Result<Vec<u32>, ApiError> {
        let state = self.lock();
        let s = state.subject(subject)?;
        let versions: Vec<u32> = s.visible(show).map(|v| v.version).collect();
        if versions.is_empty() && show != Show::DeletedOnly {
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
        let show = Show::from_flags(deleted, false);
        let found = match spec {
            VersionSpec::Latest => s.visible(show).next_back(),
            VersionSpec::Number(n) => s.visible(show).find(|v| v.version == n),
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
            schema: state.schema(v.id)?.0.clone(),
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

    /// Subject/version pairs that use schema `id`, of `subject` only when one is given.
    pub fn id_versions(
        &self,
        id: u32,
        subject: Option<&str>,
        deleted: bool,
    ) -> Result<Vec<(String, u32)>, ApiError> {
        let state = self.lock();
        if !state.schemas.contains_key(&id) {
            return Err(ApiError::schema_not_found());
        }
        let show = Show::from_flags(deleted, false);
        Ok(state
            .subjects
            .iter()
            .filter(|(name, _)| subject.is_none_or(|s| s == name.as_str()))
            .flat_map(|(name, s)| {
                s.visible(show)
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

    /// Schema ids that reference `subject`'s version. Always none, since references are
    /// refused at registration; the version must exist all the same.
    pub fn referenced_by(&self, subject: &str, spec: VersionSpec) -> Result<Vec<u32>, ApiError> {
        self.version(subject, spec, false)?;
        Ok(Vec::new())
    }

    /// The subject's own level (`None` when it has none), or the global one.
    pub fn level(&self, subject: Option<&str>) -> Option<Level> {
        let state = self.lock();
        match subject {
            None => Some(state.level),
            Some(s) => state.subjects.get(s).and_then(|s| s.level),
        }
    }

    /// Sets (or with `None` clears) the subject's level, or the global one; clearing the
    /// global level restores the default, BACKWARD.
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
        let level = state.level_for(subject);
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
        let existing = match spec {
            None => state.parsed(s.live())?,
            Some(VersionSpec::Latest) => state.parsed(s.live().next_back().into_iter())?,
            Some(VersionSpec::Number(n)) => {
                let v = s
                    .live()
                    .find(|v| v.version == n)
                    .ok_or_else(|| ApiError::version_not_found(&n.to_string()))?;
                state.parsed(std::iter::once(v))?
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
        assert_eq!(s.versions("t-value", Show::Live).unwrap(), vec![1]);
        assert_eq!(s.register("t-value", V2).unwrap(), id + 1);
        assert_eq!(s.versions("t-value", Show::Live).unwrap(), vec![1, 2]);
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
        assert_eq!(s.versions("t", Show::Live).unwrap(), vec![1]);
        assert_eq!(s.versions("t", Show::All).unwrap(), vec![1, 2]);
        assert_eq!(
            s.version("t", VersionSpec::Latest, false).unwrap().version,
            1
        );
        assert_eq!(s.delete_subject("t", true).unwrap_err().code, 40405);
        assert_eq!(s.delete_subject("t", false).unwrap(), vec![1]);
        assert!(s.subjects(Show::Live, None).is_empty());
        assert_eq!(s.subjects(Show::All, None), vec!["t".to_string()]);
        assert_eq!(s.delete_subject("t", true).unwrap(), vec![1, 2]);
        assert!(s.subjects(Show::All, None).is_empty());
        assert_eq!(s.versions("t", Show::All).unwrap_err().code, 40401);
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
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("schemas.log"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"op\":\"schema\",\"id\":3,\"sch").unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.versions("t", Show::Live).unwrap(), vec![2]);
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

    #[test]
    fn a_log_line_that_contradicts_earlier_ones_stops_the_replay_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.register("t", V1).unwrap();
        }
        let file = dir.path().join("schemas.log");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("{\"op\":\"version\",\"subject\":\"u\",\"version\":1,\"id\":9}\n");
        std::fs::write(&file, text).unwrap();
        let err = Store::open(dir.path()).err().expect("replay refuses");
        assert!(matches!(err, LogError::Corrupt { line: 3, .. }), "{err}");
        assert!(err.to_string().contains("unknown schema id 9"), "{err}");
    }

    #[test]
    fn listings_filter_by_deleted_only_prefix_and_subject() {
        let s = Store::in_memory();
        let id = s.register("a-value", V1).unwrap();
        s.register("a-value", V2).unwrap();
        s.register("b-value", V1).unwrap();
        s.register("gone", V1).unwrap();
        s.delete_subject("gone", false).unwrap();
        s.delete_version("a-value", VersionSpec::Number(1), false)
            .unwrap();

        assert_eq!(s.subjects(Show::Live, None), vec!["a-value", "b-value"]);
        assert_eq!(s.subjects(Show::DeletedOnly, None), vec!["gone"]);
        assert_eq!(s.subjects(Show::All, Some("b")), vec!["b-value"]);
        assert_eq!(s.versions("a-value", Show::DeletedOnly).unwrap(), vec![1]);
        assert_eq!(
            s.id_versions(id, None, false).unwrap(),
            vec![("b-value".to_string(), 1)]
        );
        assert_eq!(
            s.id_versions(id, Some("a-value"), true).unwrap(),
            vec![("a-value".to_string(), 1)]
        );
        assert_eq!(
            s.referenced_by("a-value", VersionSpec::Latest).unwrap(),
            Vec::<u32>::new()
        );
        assert_eq!(
            s.referenced_by("a-value", VersionSpec::Number(1))
                .unwrap_err()
                .code,
            40402
        );
    }
}
