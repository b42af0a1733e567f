//! Entity feature snapshots: CSV or Parquet files with one row per entity, an
//! `entity_id` column, an optional `event_time` column (when the features were true:
//! a timestamp, epoch milliseconds or RFC 3339 text) and one numeric column per model
//! feature. Other columns are ignored, so a wide feature-store export scores as is.
//!
//! [`Snapshot::open`] checks the columns against the model before any row is read, then
//! yields [`Chunk`]s of `batch_size` rows already laid out as the model's row-major
//! tensor.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, TimestampMillisecondType};
use arrow_array::{
    ArrayRef, Float64Array, RecordBatch, RecordBatchReader, StringArray, TimestampMillisecondArray,
};
use arrow_schema::{ArrowError, DataType, Field, Schema, TimeUnit};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub const ENTITY_COLUMN: &str = "entity_id";
pub const TIME_COLUMN: &str = "event_time";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Parquet,
}

impl Format {
    /// The format a file's extension names.
    pub fn of(path: &Path) -> Result<Self, SnapshotError> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => Ok(Self::Csv),
            Some("parquet" | "pq") => Ok(Self::Parquet),
            _ => Err(SnapshotError::UnknownFormat(path.to_path_buf())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}: cannot tell the format; name it .csv or .parquet, or pass --format")]
    UnknownFormat(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable {format:?} file: {message}")]
    Unreadable {
        path: PathBuf,
        format: Format,
        message: String,
    },
    #[error("{path}: missing column {column:?}{why}; it has {found:?}")]
    MissingColumn {
        path: PathBuf,
        column: String,
        why: String,
        found: Vec<String>,
    },
    #[error("{path}: column {column:?} is {found}, expected {expected}")]
    ColumnType {
        path: PathBuf,
        column: String,
        found: String,
        expected: &'static str,
    },
    #[error("{path}: row {row}: {message}")]
    BadRow {
        path: PathBuf,
        row: u64,
        message: String,
    },
}

/// Rows of a snapshot, ready to score.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chunk {
    /// Row number (from 1, after the header) of the chunk's first row.
    pub first_row: u64,
    pub entity_ids: Vec<String>,
    pub event_times: Vec<i64>,
    /// Row-major, `rows x features`, in the model's feature order.
    pub features: Vec<f32>,
}

impl Chunk {
    pub fn rows(&self) -> usize {
        self.entity_ids.len()
    }
}

type Batches = Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>> + Send>;

/// An open snapshot whose columns fit the model.
pub struct Snapshot {
    path: PathBuf,
    batches: Batches,
    /// Column indexes in the projected batches.
    entity: usize,
    time: Option<usize>,
    features: Vec<usize>,
    feature_names: Vec<String>,
    as_of: Option<i64>,
    next_row: u64,
    /// Rows in the file, when known up front (Parquet metadata; CSV by counting lines).
    pub total_rows: Option<u64>,
}

impl Snapshot {
    /// Opens `path` and checks it has `entity_id`, every one of `features` as a number,
    /// and `event_time` unless `as_of` gives one time for every row.
    pub fn open(
        path: &Path,
        format: Option<Format>,
        features: &[String],
        batch_size: usize,
        as_of: Option<i64>,
    ) -> Result<Self, SnapshotError> {
        let format = match format {
            Some(f) => f,
            None => Format::of(path)?,
        };
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let unreadable = |message: String| SnapshotError::Unreadable {
            path: path.to_path_buf(),
            format,
            message,
        };
        let batch_size = batch_size.max(1);
        let (columns, batches, total_rows): (Vec<Field>, Batches, Option<u64>) = match format {
            Format::Parquet => {
                let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| unreadable(e.to_string()))?;
                let total = builder.metadata().file_metadata().num_rows().max(0) as u64;
                let schema = builder.schema().clone();
                let wanted = Columns::find(path, &schema, features, as_of)?;
                let mask = ProjectionMask::roots(builder.parquet_schema(), wanted.indexes());
                let reader = builder
                    .with_projection(mask)
                    .with_batch_size(batch_size)
                    .build()
                    .map_err(|e| unreadable(e.to_string()))?;
                let fields = reader
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| (**f).clone())
                    .collect();
                (fields, Box::new(reader), Some(total))
            }
            Format::Csv => {
                let headers = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .from_path(path)
                    .and_then(|mut r| r.headers().cloned())
                    .map_err(|e| unreadable(e.to_string()))?;
                // Read features as numbers and everything else as text; only the
                // columns Lanes uses are parsed.
                let schema = Arc::new(Schema::new(
                    headers
                        .iter()
                        .map(|h| {
                            let ty = if features.iter().any(|f| f == h) {
                                DataType::Float64
                            } else {
                                DataType::Utf8
                            };
                            Field::new(h, ty, true)
                        })
                        .collect::<Vec<_>>(),
                ));
                let wanted = Columns::find(path, &schema, features, as_of)?;
                let total = count_lines(path).map_err(io)?.saturating_sub(1);
                let reader = arrow_csv::ReaderBuilder::new(schema.clone())
                    .with_header(true)
                    .with_batch_size(batch_size)
                    .with_projection(wanted.indexes())
                    .build(file)
                    .map_err(|e| unreadable(e.to_string()))?;
                let fields = wanted
                    .indexes()
                    .iter()
                    .map(|i| schema.field(*i).clone())
                    .collect();
                (fields, Box::new(reader), Some(total))
            }
        };
        // Positions in the projected batches, which keep the file's column order.
        let position = |name: &str| columns.iter().position(|f| f.name() == name);
        Ok(Self {
            path: path.to_path_buf(),
            batches,
            entity: position(ENTITY_COLUMN).expect("checked"),
            time: if as_of.is_some() {
                None
            } else {
                position(TIME_COLUMN)
            },
            features: features
                .iter()
                .map(|f| position(f).expect("checked"))
                .collect(),
            feature_names: features.to_vec(),
            as_of,
            next_row: 1,
            total_rows,
        })
    }

    fn bad_row(&self, row: u64, message: String) -> SnapshotError {
        SnapshotError::BadRow {
            path: self.path.clone(),
            row,
            message,
        }
    }

    fn chunk(&mut self, batch: RecordBatch) -> Result<Chunk, SnapshotError> {
        let rows = batch.num_rows();
        let first = self.next_row;
        self.next_row += rows as u64;
        let entities = arrow_cast::cast(batch.column(self.entity), &DataType::Utf8)
            .map_err(|e| self.bad_row(first, format!("{ENTITY_COLUMN}: {e}")))?;
        let entities: &StringArray = entities.as_string();
        let mut chunk = Chunk {
            first_row: first,
            entity_ids: Vec::with_capacity(rows),
            event_times: Vec::with_capacity(rows),
            features: vec![0.0; rows * self.features.len()],
        };
        for i in 0..rows {
            match entities.is_valid(i).then(|| entities.value(i)) {
                Some(e) if !e.is_empty() => chunk.entity_ids.push(e.to_string()),
                _ => {
                    return Err(self.bad_row(first + i as u64, format!("{ENTITY_COLUMN} is empty")));
                }
            }
        }
        match (self.as_of, self.time) {
            (Some(t), _) => chunk.event_times.resize(rows, t),
            (None, Some(col)) => {
                for (i, t) in event_times(batch.column(col))
                    .map_err(|e| self.bad_row(first, format!("{TIME_COLUMN}: {e}")))?
                    .into_iter()
                    .enumerate()
                {
                    match t {
                        Ok(t) => chunk.event_times.push(t),
                        Err(e) => {
                            return Err(
                                self.bad_row(first + i as u64, format!("{TIME_COLUMN}: {e}"))
                            );
                        }
                    }
                }
            }
            (None, None) => unreachable!("checked at open"),
        }
        let width = self.features.len();
        for (j, col) in self.features.iter().enumerate() {
            let values = arrow_cast::cast(batch.column(*col), &DataType::Float64)
                .map_err(|e| self.bad_row(first, format!("{}: {e}", self.feature_names[j])))?;
            let values: &Float64Array = values.as_primitive::<Float64Type>();
            for i in 0..rows {
                let v = values.is_valid(i).then(|| values.value(i));
                match v {
                    // The model takes 32-bit floats: 1e39 is finite only as f64.
                    Some(v) if (v as f32).is_finite() => chunk.features[i * width + j] = v as f32,
                    Some(v) => {
                        return Err(self.bad_row(
                            first + i as u64,
                            format!(
                                "feature {:?} is {v}, not a finite number",
                                self.feature_names[j]
                            ),
                        ));
                    }
                    None => {
                        return Err(self.bad_row(
                            first + i as u64,
                            format!("feature {:?} is empty", self.feature_names[j]),
                        ));
                    }
                }
            }
        }
        Ok(chunk)
    }
}

impl Iterator for Snapshot {
    type Item = Result<Chunk, SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = self.batches.next()?;
        Some(match batch {
            Ok(b) => self.chunk(b),
            Err(e) => Err(self.bad_row(self.next_row, e.to_string())),
        })
    }
}

/// Where the columns Lanes needs are in a file's schema.
struct Columns {
    entity: usize,
    time: Option<usize>,
    features: Vec<usize>,
}

impl Columns {
    fn find(
        path: &Path,
        schema: &Schema,
        features: &[String],
        as_of: Option<i64>,
    ) -> Result<Self, SnapshotError> {
        let found: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let missing = |column: &str, why: &str| SnapshotError::MissingColumn {
            path: path.to_path_buf(),
            column: column.to_string(),
            why: why.to_string(),
            found: found.clone(),
        };
        let index = |name: &str| schema.index_of(name).ok();
        let type_err = |column: &str, expected| SnapshotError::ColumnType {
            path: path.to_path_buf(),
            column: column.to_string(),
            found: schema
                .field_with_name(column)
                .map(|f| f.data_type().to_string())
                .unwrap_or_default(),
            expected,
        };
        let entity = index(ENTITY_COLUMN).ok_or_else(|| missing(ENTITY_COLUMN, ""))?;
        let entity_type = schema.field(entity).data_type();
        if !(matches!(
            entity_type,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) || entity_type.is_integer())
        {
            return Err(type_err(ENTITY_COLUMN, "text or an integer"));
        }
        let time = match (index(TIME_COLUMN), as_of) {
            (_, Some(_)) => None,
            (Some(i), None) => {
                let ty = schema.field(i).data_type();
                if !(matches!(
                    ty,
                    DataType::Timestamp(..)
                        | DataType::Int64
                        | DataType::Utf8
                        | DataType::LargeUtf8
                        | DataType::Utf8View
                )) {
                    return Err(type_err(
                        TIME_COLUMN,
                        "a timestamp, epoch milliseconds or RFC 3339 text",
                    ));
                }
                Some(i)
            }
            (None, None) => {
                return Err(missing(
                    TIME_COLUMN,
                    " (or pass --as-of to give every row one time)",
                ));
            }
        };
        let mut indexes = Vec::with_capacity(features.len());
        for f in features {
            let i = index(f).ok_or_else(|| missing(f, ", a feature of the model"))?;
            if !schema.field(i).data_type().is_numeric() {
                return Err(type_err(f, "a number"));
            }
            indexes.push(i);
        }
        Ok(Self {
            entity,
            time,
            features: indexes,
        })
    }

    /// Every column to read, in file order.
    fn indexes(&self) -> Vec<usize> {
        let mut all: Vec<usize> = std::iter::once(self.entity)
            .chain(self.time)
            .chain(self.features.iter().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// Epoch milliseconds from a timestamp, integer or RFC 3339 text column; one result per
/// row, so a bad value names its row.
fn event_times(col: &ArrayRef) -> Result<Vec<Result<i64, String>>, ArrowError> {
    let missing = || Err("is empty".to_string());
    Ok(match col.data_type() {
        DataType::Timestamp(..) => {
            let ms = arrow_cast::cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
            let ms = ms.as_primitive::<TimestampMillisecondType>();
            (0..ms.len())
                .map(|i| {
                    if ms.is_valid(i) {
                        Ok(ms.value(i))
                    } else {
                        missing()
                    }
                })
                .collect()
        }
        DataType::Int64 => {
            let v = col.as_primitive::<arrow_array::types::Int64Type>();
            (0..v.len())
                .map(|i| {
                    if v.is_valid(i) {
                        Ok(v.value(i))
                    } else {
                        missing()
                    }
                })
                .collect()
        }
        _ => {
            let text = arrow_cast::cast(col, &DataType::Utf8)?;
            let text: &StringArray = text.as_string();
            (0..text.len())
                .map(|i| {
                    if !text.is_valid(i) || text.value(i).is_empty() {
                        return missing();
                    }
                    parse_time(text.value(i))
                })
                .collect()
        }
    })
}

/// RFC 3339 text or epoch milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{s:?} is neither RFC 3339 nor epoch milliseconds ({e})"))
}

fn count_lines(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let (mut lines, mut last) = (0u64, b'\n');
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        last = buf[n - 1];
    }
    Ok(lines + u64::from(last != b'\n'))
}

/// Writes snapshots and scored rows.
pub mod write {
    use super::*;
    use parquet::arrow::ArrowWriter;
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::WriterProperties;

    /// A file of record batches, CSV or Parquet (zstd).
    pub enum Sink {
        Csv(arrow_csv::Writer<std::io::BufWriter<File>>),
        Parquet(ArrowWriter<File>),
    }

    impl Sink {
        pub fn create(path: &Path, format: Format, schema: Arc<Schema>) -> anyhow::Result<Self> {
            let file =
                File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Ok(match format {
                Format::Csv => Self::Csv(
                    arrow_csv::WriterBuilder::new()
                        .with_header(true)
                        .build(std::io::BufWriter::new(file)),
                ),
                Format::Parquet => {
                    let props = WriterProperties::builder()
                        .set_compression(Compression::ZSTD(ZstdLevel::default()))
                        .build();
                    Self::Parquet(ArrowWriter::try_new(file, schema, Some(props))?)
                }
            })
        }

        pub fn write(&mut self, batch: &RecordBatch) -> anyhow::Result<()> {
            match self {
                Self::Csv(w) => w.write(batch)?,
                Self::Parquet(w) => w.write(batch)?,
            }
            Ok(())
        }

        pub fn finish(self) -> anyhow::Result<()> {
            match self {
                Self::Csv(w) => {
                    use std::io::Write;
                    w.into_inner().flush()?;
                }
                Self::Parquet(w) => {
                    w.close()?;
                }
            }
            Ok(())
        }
    }

    /// The schema `lanes generate` writes: entity, time, then features.
    pub fn snapshot_schema(format: Format, features: &[String]) -> Arc<Schema> {
        let time = match format {
            // CSV keeps the time as RFC 3339 text, readable and unambiguous.
            Format::Csv => DataType::Utf8,
            Format::Parquet => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        };
        let mut fields = vec![
            Field::new(ENTITY_COLUMN, DataType::Utf8, false),
            Field::new(TIME_COLUMN, time, false),
        ];
        fields.extend(
            features
                .iter()
                .map(|f| Field::new(f, DataType::Float64, false)),
        );
        Arc::new(Schema::new(fields))
    }

    /// One batch of a snapshot: every row shares `event_time`.
    pub fn snapshot_batch(
        schema: &Arc<Schema>,
        entities: Vec<String>,
        event_time: i64,
        columns: Vec<Vec<f64>>,
    ) -> anyhow::Result<RecordBatch> {
        let rows = entities.len();
        let time: ArrayRef = match schema.field(1).data_type() {
            DataType::Utf8 => {
                let text = chrono::DateTime::from_timestamp_millis(event_time)
                    .ok_or_else(|| anyhow::anyhow!("event time {event_time} is out of range"))?
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                Arc::new(StringArray::from(vec![text; rows]))
            }
            _ => Arc::new(
                TimestampMillisecondArray::from(vec![event_time; rows]).with_timezone("UTC"),
            ),
        };
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(StringArray::from(entities)), time];
        arrays.extend(
            columns
                .into_iter()
                .map(|c| Arc::new(Float64Array::from(c)) as ArrayRef),
        );
        Ok(RecordBatch::try_new(schema.clone(), arrays)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn csv(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.csv");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn read(path: &Path, as_of: Option<i64>) -> Result<Vec<Chunk>, SnapshotError> {
        Snapshot::open(path, None, &features(), 2, as_of)?.collect()
    }

    #[test]
    fn csv_columns_are_found_by_name_in_the_models_order() {
        let (_d, path) = csv(
            "note,b,entity_id,a,event_time\nx,2,e1,1,2026-11-01T00:00:00Z\ny,4,e2,3,1000\nz,6.5,7,5,2000\n",
        );
        let mut snap = Snapshot::open(&path, None, &features(), 2, None).unwrap();
        assert_eq!(snap.total_rows, Some(3));
        let first = snap.next().unwrap().unwrap();
        assert_eq!(first.first_row, 1);
        assert_eq!(first.entity_ids, ["e1", "e2"]);
        assert_eq!(first.event_times, [1_793_491_200_000, 1000]);
        assert_eq!(first.features, [1.0, 2.0, 3.0, 4.0]);
        let second = snap.next().unwrap().unwrap();
        assert_eq!(
            (second.first_row, second.entity_ids.as_slice()),
            (3, &["7".to_string()][..])
        );
        assert_eq!(second.features, [5.0, 6.5]);
        assert!(snap.next().is_none());
    }

    #[test]
    fn as_of_stands_in_for_a_missing_time_column() {
        let (_d, path) = csv("entity_id,a,b\ne1,1,2\n");
        let err = read(&path, None).unwrap_err().to_string();
        assert!(
            err.contains("missing column \"event_time\"") && err.contains("--as-of"),
            "{err}"
        );
        let chunks = read(&path, Some(42)).unwrap();
        assert_eq!(chunks[0].event_times, [42]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let cases = [
            (
                "entity_id,event_time,a\ne1,1,1\n",
                "missing column \"b\", a feature of the model",
            ),
            (
                "id,event_time,a,b\ne1,1,1,2\n",
                "missing column \"entity_id\"",
            ),
            (
                "entity_id,event_time,a,b\ne1,1,1,x\n",
                "Error while parsing value",
            ),
            (
                "entity_id,event_time,a,b\ne1,1,1,\n",
                "row 1: feature \"b\" is empty",
            ),
            (
                "entity_id,event_time,a,b\ne1,1,1,2\n,1,1,2\n",
                "row 2: entity_id is empty",
            ),
            (
                "entity_id,event_time,a,b\ne1,1,1,2\ne2,1,1,2\ne3,yesterday,1,2\n",
                "row 3: event_time: \"yesterday\"",
            ),
            (
                "entity_id,event_time,a,b\ne1,1,1,inf\n",
                "not a finite number",
            ),
        ];
        for (text, expected) in cases {
            let (_d, path) = csv(text);
            let err = read(&path, None).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.contains("snap.csv"), "{err}");
        }
    }

    #[test]
    fn unknown_extensions_and_non_parquet_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("snap.txt");
        std::fs::write(&odd, "entity_id\n").unwrap();
        let err = read(&odd, None).unwrap_err().to_string();
        assert!(err.contains("cannot tell the format"), "{err}");
        let fake = dir.path().join("snap.parquet");
        std::fs::write(&fake, "entity_id,a,b\n").unwrap();
        let err = read(&fake, None).unwrap_err().to_string();
        assert!(err.contains("not a readable Parquet file"), "{err}");
        let err = read(&dir.path().join("gone.csv"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gone.csv") && err.contains("No such file"),
            "{err}"
        );
    }

    #[test]
    fn parquet_round_trips_and_types_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.parquet");
        let schema = write::snapshot_schema(Format::Parquet, &features());
        let mut sink = write::Sink::create(&path, Format::Parquet, schema.clone()).unwrap();
        let batch = write::snapshot_batch(
            &schema,
            vec!["e1".into(), "e2".into(), "e3".into()],
            7_000,
            vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]],
        )
        .unwrap();
        sink.write(&batch).unwrap();
        sink.finish().unwrap();
        let chunks = read(&path, None).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].features, [1.0, 4.0, 2.0, 5.0]);
        assert_eq!(chunks[1].event_times, [7_000]);

        // A feature stored as text is refused before any row is read.
        let text_schema = Arc::new(Schema::new(vec![
            Field::new(ENTITY_COLUMN, DataType::Utf8, false),
            Field::new(TIME_COLUMN, DataType::Int64, false),
            Field::new("a", DataType::Utf8, false),
            Field::new("b", DataType::Float64, false),
        ]));
        let bad = dir.path().join("bad.parquet");
        let mut sink = write::Sink::create(&bad, Format::Parquet, text_schema.clone()).unwrap();
        let batch = RecordBatch::try_new(
            text_schema,
            vec![
                Arc::new(StringArray::from(vec!["e1"])),
                Arc::new(arrow_array::Int64Array::from(vec![1])),
                Arc::new(StringArray::from(vec!["1.5"])),
                Arc::new(Float64Array::from(vec![2.0])),
            ],
        )
        .unwrap();
        sink.write(&batch).unwrap();
        sink.finish().unwrap();
        let err = read(&bad, None).err().unwrap().to_string();
        assert!(
            err.contains("column \"a\" is Utf8, expected a number"),
            "{err}"
        );
    }

    #[test]
    fn generated_csv_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.csv");
        let schema = write::snapshot_schema(Format::Csv, &features());
        let mut sink = write::Sink::create(&path, Format::Csv, schema.clone()).unwrap();
        let batch = write::snapshot_batch(
            &schema,
            vec!["e1".into()],
            1_793_491_200_123,
            vec![vec![0.25], vec![-1.0]],
        )
        .unwrap();
        sink.write(&batch).unwrap();
        sink.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("entity_id,event_time,a,b\ne1,2026-11-01T00:00:00.123Z,"),
            "{text}"
        );
        let chunks = read(&path, None).unwrap();
        assert_eq!(chunks[0].event_times, [1_793_491_200_123]);
        assert_eq!(chunks[0].features, [0.25, -1.0]);
    }
}
