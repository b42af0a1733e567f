//! Model loading and scoring with ONNX Runtime (`ort`, loaded at run time from the
//! library `ORT_DYLIB_PATH` names).
//!
//! A model is a folder `models/<name>/<version>/` with `model.onnx` beside `model.toml`,
//! which names the model, its ordered features, its input and output tensors and how to
//! read the output. At load the declared tensors are checked against the graph's real
//! inputs and outputs, so a mismatch fails at start with a clear message, never as
//! wrong scores later.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};
use serde::Deserialize;

use crate::features::FeatureIndex;

/// What `model.toml` says.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub version: String,
    /// Feature names in the input tensor's column order.
    pub features: Vec<String>,
    /// Name of the float32 `[rows, features]` input.
    pub input: String,
    /// Name of the output holding the score.
    pub output: String,
    pub output_kind: OutputKind,
    /// Column of the positive class when `output_kind = "probabilities"`.
    #[serde(default = "one")]
    pub positive_class: usize,
    /// Score at or above which the label is `positive_label`.
    #[serde(default = "half")]
    pub threshold: f64,
    pub positive_label: String,
    pub negative_label: String,
}

fn one() -> usize {
    1
}
fn half() -> f64 {
    0.5
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// `[rows, classes]` class probabilities; the score is the positive class's.
    Probabilities,
    /// `[rows]` or `[rows, 1]` scores.
    Score,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("ONNX Runtime library: {0}")]
    Runtime(String),
    #[error("{path}: {message}")]
    Spec { path: PathBuf, message: String },
    #[error("model {name} v{version} does not match model.toml: {message}")]
    Mismatch {
        name: String,
        version: String,
        message: String,
    },
    #[error("inference failed: {0}")]
    Inference(String),
}

static RUNTIME: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Loads the ONNX Runtime library and builds the process's one environment.
pub fn init_runtime() -> Result<&'static Environment, ModelError> {
    RUNTIME
        .get_or_init(|| {
            let path = std::env::var("ORT_DYLIB_PATH").map_err(|_| {
                "ORT_DYLIB_PATH is not set: point it at libonnxruntime.so (scripts/setup.sh writes it to .lanes/env)"
                    .to_string()
            })?;
            if !Path::new(&path).exists() {
                return Err(format!("ORT_DYLIB_PATH={path} does not exist"));
            }
            ort::init_from(&path)
                .map_err(|e| format!("{path}: {e}"))?
                .with_name("lanes")
                .build()
                .map_err(|e| format!("{path}: {e}"))
        })
        .as_ref()
        .map_err(|e| ModelError::Runtime(e.clone()))
}

/// A loaded, checked model. ONNX Runtime runs need the session exclusively, so runs on
/// one model take turns; share it as `Arc<Model>`.
pub struct Model {
    pub spec: ModelSpec,
    pub dir: PathBuf,
    /// `spec.features`, searchable: a request's names are checked against it.
    index: FeatureIndex,
    session: Mutex<Session>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("spec", &self.spec)
            .field("dir", &self.dir)
            .finish()
    }
}

impl ModelSpec {
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("model.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Spec {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let spec: ModelSpec = toml::from_str(&text).map_err(|e| ModelError::Spec {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if spec.features.is_empty() {
            return Err(ModelError::Spec {
                path,
                message: "features must not be empty".into(),
            });
        }
        if let Some(message) = crate::cache::overlong([
            ("name", spec.name.as_str()),
            ("version", &spec.version),
            ("positive_label", &spec.positive_label),
            ("negative_label", &spec.negative_label),
        ]) {
            return Err(ModelError::Spec { path, message });
        }
        Ok(spec)
    }
}

impl Model {
    /// Reads `dir/model.toml`, loads `dir/model.onnx` and checks one against the other.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let env = init_runtime()?;
        let spec = ModelSpec::read(dir)?;
        let onnx = dir.join("model.onnx");
        let spec_err = |message: String| ModelError::Spec {
            path: onnx.clone(),
            message,
        };
        // One intra-op thread: a second did not help on small batches, and scorers scale
        // by replicas and partitions instead.
        let session = Session::builder(env)
            .map_err(|e| spec_err(e.to_string()))?
            .with_intra_threads(1)
            .map_err(|e| spec_err(e.to_string()))?
            .commit_from_file(&onnx)
            .map_err(|e| spec_err(e.to_string()))?;
        let model = Self {
            index: FeatureIndex::new(spec.features.clone()),
            spec,
            dir: dir.to_path_buf(),
            session: Mutex::new(session),
        };
        model.check()?;
        tracing::info!(name = %model.spec.name, version = %model.spec.version, dir = %dir.display(), "model loaded");
        Ok(model)
    }

    /// The model's feature names, searchable.
    pub fn index(&self) -> &FeatureIndex {
        &self.index
    }

    fn mismatch(&self, message: String) -> ModelError {
        ModelError::Mismatch {
            name: self.spec.name.clone(),
            version: self.spec.version.clone(),
            message,
        }
    }

    fn check(&self) -> Result<(), ModelError> {
        let n = self.spec.features.len() as i64;
        let session = self.session.lock().expect("session lock");
        let input = session
            .inputs()
            .iter()
            .find(|i| i.name() == self.spec.input)
            .ok_or_else(|| {
                self.mismatch(format!(
                    "no input named {:?}; the graph has {:?}",
                    self.spec.input,
                    names(session.inputs())
                ))
            })?;
        match input.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                if *ty != TensorElementType::Float32 {
                    return Err(self.mismatch(format!(
                        "input {:?} is {ty:?}, Lanes feeds float32",
                        self.spec.input
                    )));
                }
                let dims: Vec<i64> = shape.iter().copied().collect();
                if dims.len() != 2 || (dims[1] != n && dims[1] >= 0) {
                    return Err(self.mismatch(format!(
                        "input {:?} has shape {dims:?}; model.toml lists {n} features",
                        self.spec.input
                    )));
                }
            }
            other => {
                return Err(self.mismatch(format!(
                    "input {:?} is not a tensor: {other:?}",
                    self.spec.input
                )));
            }
        }
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == self.spec.output)
            .ok_or_else(|| {
                self.mismatch(format!(
                    "no output named {:?}; the graph has {:?}",
                    self.spec.output,
                    names(session.outputs())
                ))
            })?;
        self.check_output(output.dtype())
    }

    /// The output must be a float32 tensor of the shape `output_kind` reads: a zipmap
    /// export (a sequence of maps) or a float64 tensor would fail on every batch.
    fn check_output(&self, dtype: &ValueType) -> Result<(), ModelError> {
        let out = &self.spec.output;
        let ValueType::Tensor { ty, shape, .. } = dtype else {
            return Err(self.mismatch(format!(
                "output {out:?} is not a tensor but {dtype:?} (a skl2onnx export needs zipmap=False)"
            )));
        };
        if *ty != TensorElementType::Float32 {
            return Err(self.mismatch(format!("output {out:?} is {ty:?}; Lanes reads float32")));
        }
        let dims: Vec<i64> = shape.iter().copied().collect();
        let fits = match self.spec.output_kind {
            OutputKind::Probabilities => {
                dims.len() == 2 && (dims[1] < 0 || dims[1] > self.spec.positive_class as i64)
            }
            OutputKind::Score => dims.len() == 1 || (dims.len() == 2 && dims[1] == 1),
        };
        if !fits {
            return Err(self.mismatch(format!(
                "output {out:?} has shape {dims:?}, which output_kind {:?} (positive_class {}) cannot read",
                self.spec.output_kind, self.spec.positive_class
            )));
        }
        Ok(())
    }

    /// One score per row; a score that is not finite fails the whole call, so it is
    /// never cached or answered.
    pub fn score(&self, features: &[f32], rows: usize) -> Result<Vec<f64>, ModelError> {
        let scores = self.score_raw(features, rows)?;
        if let Some((row, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(ModelError::Inference(format!(
                "model {} v{} gave a non-finite score ({s}) for row {row}",
                self.spec.name, self.spec.version
            )));
        }
        Ok(scores)
    }

    fn score_raw(&self, features: &[f32], rows: usize) -> Result<Vec<f64>, ModelError> {
        let width = self.spec.features.len();
        if features.len() != rows * width {
            return Err(ModelError::Inference(format!(
                "{} values are not {rows} rows of {width} features",
                features.len()
            )));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let tensor = TensorRef::from_array_view(([rows, width], features))
            .map_err(|e| ModelError::Inference(e.to_string()))?;
        let mut session = self.session.lock().expect("session lock");
        let outputs = session
            .run(ort::inputs![self.spec.input.as_str() => tensor])
            .map_err(|e| ModelError::Inference(e.to_string()))?;
        let (shape, values) = outputs[self.spec.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| ModelError::Inference(format!("output {:?}: {e}", self.spec.output)))?;
        let dims: Vec<i64> = shape.iter().copied().collect();
        match self.spec.output_kind {
            OutputKind::Probabilities => {
                let classes = *dims.get(1).unwrap_or(&0) as usize;
                if dims.len() != 2
                    || dims[0] as usize != rows
                    || self.spec.positive_class >= classes
                {
                    return Err(ModelError::Inference(format!(
                        "output shape {dims:?} is not [{rows}, classes]"
                    )));
                }
                Ok(values
                    .chunks(classes)
                    .map(|r| r[self.spec.positive_class] as f64)
                    .collect())
            }
            OutputKind::Score => {
                if values.len() != rows {
                    return Err(ModelError::Inference(format!(
                        "output shape {dims:?} is not [{rows}]"
                    )));
                }
                Ok(values.iter().map(|v| *v as f64).collect())
            }
        }
    }

    /// The label for a score.
    pub fn label(&self, score: f64) -> &str {
        if score >= self.spec.threshold {
            &self.spec.positive_label
        } else {
            &self.spec.negative_label
        }
    }
}

fn names(outlets: &[ort::value::Outlet]) -> Vec<&str> {
    outlets.iter().map(|o| o.name()).collect()
}
