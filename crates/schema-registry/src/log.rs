//! The registry's durable log: one JSON line per change in `<data_dir>/schemas.log`.
//!
//! Why an append-only JSON-lines log: it is what Confluent's registry does with its
//! `_schemas` topic. Writes are rare (a service registers its schema once), the state is
//! rebuilt by replaying the lines at start so ids never change across restarts, and the
//! format needs no dependency and can be read with `cat`.
//!
//! What each failure leaves behind, and what opening or appending does about it:
//! - An append is one write of whole lines, then `fdatasync`, and only then is the
//!   change applied and acknowledged.
//! - A crash mid-append leaves a torn last line (no trailing newline). It was never
//!   acknowledged, so opening the log cuts it off before anything else is appended.
//! - An append that fails (disk full, I/O error) is cut back the same way at once, and
//!   again before the next append if that cut failed too: appending after half a line
//!   would turn a harmless torn tail into corruption in the middle of the log.
//! - Creating the file fsyncs its folder, so the new directory entry survives a power
//!   loss along with the lines fsynced into the file.
//! - A line that does not parse anywhere but the tail is damage no crash causes (a
//!   hand edit, a bad disk). Opening then fails, naming the line, rather than serve a
//!   registry that silently forgot schemas and would hand their ids out again.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compat::Level;

const LOG_FILE: &str = "schemas.log";

/// One durable change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Entry {
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

/// Why the log cannot be opened or appended to.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file system refused; an append may succeed when it recovers (disk space).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A complete line is unreadable or contradicts the lines before it. Fatal: an
    /// operator must repair or restore the file.
    #[error("{}, line {line}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl LogError {
    fn io(path: &Path, source: io::Error) -> Self {
        LogError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What the log writes to: a file, or a fake in tests that fails on demand.
pub(crate) trait Sink {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

impl Sink for File {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        Write::write_all(self, bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// The open log, positioned after its last complete line.
pub(crate) struct Log<S: Sink = File> {
    sink: S,
    path: PathBuf,
    /// Bytes of complete, fsynced lines: where the next append must start.
    len: u64,
    /// An append failed and cutting it back failed too: cut before appending again.
    dirty: bool,
}

/// Fsyncs a folder, so entries created in it survive a power loss.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Log {
    /// Opens the log in `dir`, creating the folder and file when missing, and returns
    /// it with its entries, each with its line number.
    pub fn open(dir: &Path) -> Result<(Self, Vec<(usize, Entry)>), LogError> {
        Self::open_with(dir, sync_dir)
    }

    /// [`Log::open`] with the folder fsync passed in, so tests can see it happen.
    pub(crate) fn open_with(
        dir: &Path,
        sync_dir: fn(&Path) -> io::Result<()>,
    ) -> Result<(Self, Vec<(usize, Entry)>), LogError> {
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        let path = dir.join(LOG_FILE);
        let mut file = match OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => {
                sync_dir(dir).map_err(|e| LogError::io(dir, e))?;
                if created_dir {
                    // The folder's own entry lives in its parent.
                    let parent = dir
                        .parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new("."));
                    sync_dir(parent).map_err(|e| LogError::io(parent, e))?;
                }
                file
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .map_err(|e| LogError::io(&path, e))?,
            Err(e) => return Err(LogError::io(&path, e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| LogError::io(&path, e))?;
        // Everything up to the last newline was written whole; anything after it is a
        // torn append.
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let (complete, torn) = bytes.split_at(keep);
        // Parse before cutting, so a corrupt log is left exactly as it was found.
        let entries = parse(complete).map_err(|(line, reason)| LogError::Corrupt {
            path: path.clone(),
            line,
            reason,
        })?;
        let mut log = Log {
            sink: file,
            path,
            len: keep as u64,
            dirty: false,
        };
        if !torn.is_empty() {
            tracing::warn!(path = %log.path.display(), dropped_bytes = torn.len(), "cutting a torn last line (a crash mid-append); it was never acknowledged");
            log.cut()?;
        }
        Ok((log, entries))
    }
}

/// The entries of complete lines, with 1-based line numbers; blank lines are skipped.
fn parse(complete: &[u8]) -> Result<Vec<(usize, Entry)>, (usize, String)> {
    let mut entries = Vec::new();
    for (i, line) in complete.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let entry = serde_json::from_slice::<Entry>(line).map_err(|e| (i + 1, e.to_string()))?;
        entries.push((i + 1, entry));
    }
    Ok(entries)
}

impl<S: Sink> Log<S> {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `entries` as whole lines and fsyncs them; on error nothing of them stays.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        if self.dirty {
            self.cut()?;
        }
        let mut text = Vec::new();
        for e in entries {
            serde_json::to_writer(&mut text, e)
                .map_err(|e| LogError::io(&self.path, io::Error::other(e)))?;
            text.push(b'\n');
        }
        let written = self.sink.write_all(&text).and_then(|()| self.sink.sync());
        match written {
            Ok(()) => {
                self.len += text.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of the lines may have reached the file, and after a failed fsync
                // even whole lines may not be durable: take them all back.
                self.dirty = true;
                if let Err(cut) = self.cut() {
                    tracing::error!(path = %self.path.display(), error = %cut, "cannot cut back a failed append; retrying before the next one");
                }
                Err(LogError::io(&self.path, e))
            }
        }
    }

    /// Truncates the file to its complete lines.
    fn cut(&mut self) -> Result<(), LogError> {
        self.sink
            .truncate(self.len)
            .and_then(|()| self.sink.sync())
            .map_err(|e| LogError::io(&self.path, e))?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn schema(id: u32) -> Entry {
        Entry::Schema {
            id,
            schema: r#""string""#.into(),
        }
    }

    fn line(e: &Entry) -> String {
        format!("{}\n", serde_json::to_string(e).unwrap())
    }

    #[test]
    fn a_torn_tail_is_cut_before_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(LOG_FILE);
        let whole = format!("{}{}", line(&schema(1)), line(&schema(2)));
        std::fs::write(&file, format!("{whole}{{\"op\":\"schema\",\"id\":3,\"sch")).unwrap();

        let (mut log, entries) = Log::open(dir.path()).unwrap();
        assert_eq!(entries, vec![(1, schema(1)), (2, schema(2))]);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            whole,
            "cut at open"
        );
        log.append(&[schema(3)]).unwrap();
        drop(log);
        let (_, entries) = Log::open(dir.path()).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2], (3, schema(3)));
    }

    #[test]
    fn a_log_that_is_all_torn_tail_opens_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOG_FILE), "{\"op\":\"sch").unwrap();
        let (_, entries) = Log::open(dir.path()).unwrap();
        assert!(entries.is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len(),
            0
        );
    }

    #[test]
    fn a_corrupt_middle_line_refuses_to_open_naming_the_line_and_leaves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(LOG_FILE);
        let text = format!(
            "{}\n{{\"op\":\"schema\",\"id\":2,\"sch\n{}",
            line(&schema(1)),
            line(&schema(3))
        );
        std::fs::write(&file, &text).unwrap();
        let err = match Log::open(dir.path()) {
            Err(e) => e,
            Ok(_) => panic!("a corrupt log opened"),
        };
        assert!(matches!(err, LogError::Corrupt { line: 3, .. }), "{err}");
        assert!(err.to_string().contains("line 3"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), text);

        // Not even UTF-8: still an error, never a panic.
        std::fs::write(&file, b"\xff\xfe\n").unwrap();
        assert!(matches!(
            Log::open(dir.path()),
            Err(LogError::Corrupt { line: 1, .. })
        ));
    }

    static SYNCED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    fn record(dir: &Path) -> io::Result<()> {
        SYNCED.lock().unwrap().push(dir.to_path_buf());
        sync_dir(dir)
    }

    #[test]
    fn creating_the_log_fsyncs_its_folder_and_a_new_folder_its_parent() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("registry");
        Log::open_with(&dir, record).unwrap();
        let synced: Vec<PathBuf> = std::mem::take(&mut *SYNCED.lock().unwrap());
        assert!(synced.contains(&dir), "{synced:?}");
        assert!(synced.contains(&root.path().to_path_buf()), "{synced:?}");

        // Opening an existing log creates no entry, so syncs no folder.
        Log::open_with(&dir, record).unwrap();
        let again: Vec<PathBuf> = std::mem::take(&mut *SYNCED.lock().unwrap());
        assert!(!again.contains(&dir), "{again:?}");
    }

    /// A file in memory whose writes fail after `room` bytes, like a full disk.
    #[derive(Default)]
    struct Fake {
        bytes: Vec<u8>,
        room: Option<usize>,
        truncate_fails: bool,
    }

    impl Sink for Fake {
        fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
            let fits = self.room.map_or(bytes.len(), |r| r.min(bytes.len()));
            self.bytes.extend_from_slice(&bytes[..fits]);
            if let Some(r) = &mut self.room {
                *r -= fits;
            }
            if fits < bytes.len() {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            if self.truncate_fails {
                return Err(io::Error::other("truncate failed"));
            }
            self.bytes.truncate(len as usize);
            Ok(())
        }
    }

    fn fake_log(fake: Fake) -> Log<Fake> {
        Log {
            sink: fake,
            path: PathBuf::from("fake.log"),
            len: 0,
            dirty: false,
        }
    }

    #[test]
    fn a_failed_append_leaves_no_partial_line_behind() {
        let mut log = fake_log(Fake::default());
        log.append(&[schema(1)]).unwrap();
        let first = log.sink.bytes.clone();
        log.sink.room = Some(10);
        assert!(matches!(
            log.append(&[schema(2), schema(3)]),
            Err(LogError::Io { .. })
        ));
        assert_eq!(log.sink.bytes, first, "the partial append was cut");
        log.sink.room = None;
        log.append(&[schema(2)]).unwrap();
        assert_eq!(parse(&log.sink.bytes).unwrap().len(), 2);
    }

    #[test]
    fn when_the_cut_fails_too_the_next_append_cuts_first() {
        let mut log = fake_log(Fake::default());
        log.append(&[schema(1)]).unwrap();
        log.sink.room = Some(10);
        log.sink.truncate_fails = true;
        assert!(log.append(&[schema(2)]).is_err());
        assert_ne!(log.sink.bytes.last(), Some(&b'\n'), "a torn line remains");
        // Still failing: the append is refused rather than written after the torn line.
        log.sink.room = None;
        assert!(log.append(&[schema(3)]).is_err());
        assert_ne!(log.sink.bytes.last(), Some(&b'\n'));
        // Recovered: the torn line goes first.
        log.sink.truncate_fails = false;
        log.append(&[schema(3)]).unwrap();
        let entries: Vec<Entry> = parse(&log.sink.bytes)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(entries, vec![schema(1), schema(3)]);
    }
}
