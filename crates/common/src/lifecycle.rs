//! Model versions and hot reload.
//!
//! Models live as `models/<name>/<version>/`. With `model.version = "latest"` a service
//! serves the highest version under `model.dir` and checks the folder every
//! `watch_interval_ms`: a higher version is loaded off the serving path, checked (its
//! graph against its `model.toml`, its name, version and features against the model
//! being served) and only then swapped in. Work already holding the old model finishes
//! on it, so each batch is scored by exactly one version. A version that fails to load
//! or check is refused, logged and counted, and the old one keeps serving; it is tried
//! again only when its files change. Removing the highest version rolls back to the
//! next one the same way.
//!
//! Deploy a version by copying it to a hidden folder (`models/fraud/.2`) and renaming
//! it into place: hidden folders are never loaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ModelConfig;
use crate::model::{Model, ModelError, ModelSpec};

/// `"latest"` in `model.version`.
pub const LATEST: &str = "latest";

/// The version folders under `root`, lowest first. Numeric names compare as numbers and
/// rank above other names; hidden folders are skipped.
pub fn versions(root: &Path) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.file_type()?.is_dir() {
            continue;
        }
        found.push(name);
    }
    found.sort_by(|a, b| version_key(a).cmp(&version_key(b)));
    Ok(found)
}

fn version_key(v: &str) -> (bool, u64, &str) {
    match v.parse::<u64>() {
        Ok(n) => (true, n, v),
        Err(_) => (false, 0, v),
    }
}

impl ModelConfig {
    /// `dir` itself when it holds a `model.toml` (a pinned version folder).
    fn pinned_folder(&self) -> Option<PathBuf> {
        if self.dir.join("model.toml").is_file() {
            Some(self.dir.clone())
        } else if self.version != LATEST {
            Some(self.dir.join(&self.version))
        } else {
            None
        }
    }

    /// Whether the served version follows the folder.
    pub fn follows_latest(&self) -> bool {
        self.pinned_folder().is_none()
    }

    /// The version folders to try, best first: the pinned one, or every version
    /// highest first that may stand beside the lowest readable one that names its own
    /// folder ([`check_spec`]). That one sets the deployment's model, so a version that changes the name or
    /// the features is refused at start as the watcher refuses it while serving:
    /// services restarted in any order read the same features. A version whose
    /// `model.toml` cannot be read stays, for loading to refuse with its reason.
    pub fn candidates(&self) -> Result<Vec<PathBuf>, ModelError> {
        if let Some(dir) = self.pinned_folder() {
            return Ok(vec![dir]);
        }
        let spec_err = |message: String| ModelError::Spec {
            path: self.dir.clone(),
            message,
        };
        let all = versions(&self.dir).map_err(|e| spec_err(e.to_string()))?;
        if all.is_empty() {
            return Err(spec_err("holds no model version folder".into()));
        }
        let found: Vec<(PathBuf, Option<ModelSpec>)> = all
            .iter()
            .rev()
            .map(|v| self.dir.join(v))
            .map(|dir| {
                let spec = ModelSpec::read(&dir).ok();
                (dir, spec)
            })
            .collect();
        // The base names its own folder: a copy left unrenamed (`fraud-2`, sorted below
        // the numbers) does not set the features.
        let Some(lowest) = found
            .iter()
            .rposition(|(dir, spec)| spec.as_ref().is_some_and(|s| check_folder(s, dir).is_ok()))
        else {
            return Ok(found.into_iter().map(|(dir, _)| dir).collect());
        };
        let base = found[lowest].1.clone().expect("readable");
        Ok(found
            .into_iter()
            .enumerate()
            .filter_map(|(i, (dir, spec))| match spec {
                Some(spec) if i != lowest => match check_spec(&base, &spec, &dir) {
                    Ok(()) => Some(dir),
                    Err(e) => {
                        tracing::error!(dir = %dir.display(), error = %e, base = %base.version, "model version refused");
                        None
                    }
                },
                _ => Some(dir),
            })
            .collect())
    }

    /// The folder whose `model.toml` is served: the highest version with a readable
    /// one (what services that only need the feature list read).
    pub fn resolve(&self) -> Result<PathBuf, ModelError> {
        let all = self.candidates()?;
        let mut first_err = None;
        for dir in all {
            match ModelSpec::read(&dir) {
                Ok(_) => return Ok(dir),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.expect("candidates are never empty"))
    }

    /// Loads the best version that loads: the highest, or the next one down when it is
    /// refused (a corrupt latest version must not keep a restarted service down).
    /// Returns the model and the versions refused on the way.
    pub fn load(&self) -> Result<(Model, Vec<(PathBuf, ModelError)>), ModelError> {
        let mut refused = Vec::new();
        for dir in self.candidates()? {
            match Model::load(&dir) {
                Ok(m) => return Ok((m, refused)),
                Err(e) => refused.push((dir, e)),
            }
        }
        Err(refused.swap_remove(0).1)
    }

    /// The shadow version's folder, when one is configured.
    pub fn shadow_folder(&self) -> Option<PathBuf> {
        if self.shadow_version.is_empty() {
            return None;
        }
        let root = if self.dir.join("model.toml").is_file() {
            self.dir.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            self.dir.clone()
        };
        Some(root.join(&self.shadow_version))
    }
}

/// Why `next` may not replace `current`, if it may not. Streams already carry columns in
/// the serving model's feature order, so a new version must keep it.
pub fn check_successor(current: &Model, next: &Model) -> Result<(), String> {
    check_spec(&current.spec, &next.spec, &next.dir)
}

/// Why the version in `dir`, whose `model.toml` is `next`, may not stand beside the one
/// whose `model.toml` is `base`: its version must name its folder, its name and its
/// features must be `base`'s.
pub fn check_spec(base: &ModelSpec, next: &ModelSpec, dir: &Path) -> Result<(), String> {
    check_folder(next, dir)?;
    if next.name != base.name {
        return Err(format!(
            "model.toml names {:?}, the served model is {:?}",
            next.name, base.name
        ));
    }
    if next.features != base.features {
        return Err(format!(
            "features {:?} differ from the served {:?}; a feature change needs a new deployment",
            next.features, base.features
        ));
    }
    Ok(())
}

/// Why `spec`, read from `dir`, does not name its folder as its version, if it does not.
fn check_folder(spec: &ModelSpec, dir: &Path) -> Result<(), String> {
    let folder = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if spec.version != folder {
        return Err(format!(
            "model.toml says version {:?} but the folder is {folder:?}",
            spec.version
        ));
    }
    Ok(())
}

/// Loads `dir` and checks it may stand beside (or replace) `current`.
pub fn load_successor(current: &Model, dir: &Path) -> Result<Model, String> {
    let next = Model::load(dir).map_err(|e| e.to_string())?;
    check_successor(current, &next)?;
    Ok(next)
}

/// Per-service model metrics: `<prefix>_model_info{name,version}`,
/// `<prefix>_model_reloads_total{outcome}` (loaded, refused).
#[derive(Clone)]
pub struct ModelMetrics {
    pub info: IntGaugeVec,
    pub reloads: IntCounterVec,
}

impl ModelMetrics {
    pub fn new(registry: &Registry, prefix: &str) -> prometheus::Result<Self> {
        let m = Self {
            info: IntGaugeVec::new(
                Opts::new(
                    format!("{prefix}_model_info"),
                    "The model version being served (1) by name and version.",
                ),
                &["name", "version"],
            )?,
            reloads: IntCounterVec::new(
                Opts::new(
                    format!("{prefix}_model_reloads_total"),
                    "New model versions seen, by outcome (loaded, refused: the old one keeps serving).",
                ),
                &["outcome"],
            )?,
        };
        crate::metrics::zeroed(&m.reloads, &["loaded", "refused"]);
        registry.register(Box::new(m.info.clone()))?;
        registry.register(Box::new(m.reloads.clone()))?;
        Ok(m)
    }

    fn serving(&self, model: &Model) {
        self.info.reset();
        self.info
            .with_label_values(&[&model.spec.name, &model.spec.version])
            .set(1);
    }
}

/// The model a service scores with now. Take [`ModelWatch::current`] once per unit of
/// work (a batch, a request) and use that one to the end.
#[derive(Clone)]
pub struct ModelWatch {
    rx: watch::Receiver<Arc<Model>>,
}

impl ModelWatch {
    pub fn current(&self) -> Arc<Model> {
        self.rx.borrow().clone()
    }
}

/// Loads the configured model and, when it follows the latest version, watches for new
/// ones until `stop`.
pub async fn serve(
    cfg: &ModelConfig,
    metrics: ModelMetrics,
    stop: CancellationToken,
) -> Result<ModelWatch, ModelError> {
    let loading = cfg.clone();
    let (model, refused) = tokio::task::spawn_blocking(move || loading.load())
        .await
        .map_err(|e| ModelError::Runtime(format!("model loading task: {e}")))??;
    for (dir, e) in &refused {
        tracing::error!(dir = %dir.display(), error = %e, "model version refused; serving an older one");
        metrics.reloads.with_label_values(&["refused"]).inc();
    }
    let model = Arc::new(model);
    metrics.serving(&model);
    let (tx, rx) = watch::channel(model);
    if cfg.follows_latest() && cfg.watch_interval_ms > 0 {
        let watcher = Watcher {
            root: cfg.dir.clone(),
            interval: Duration::from_millis(cfg.watch_interval_ms),
            tx,
            metrics,
            // The highest version, refused above, is tried again only once it changes.
            refused: refused.first().map(|(dir, _)| signature(dir)),
        };
        tokio::spawn(watcher.run(stop));
    }
    // Without a watcher the sender drops here and the receiver keeps its last value.
    Ok(ModelWatch { rx })
}

/// What a version folder's files look like, so a refused version is retried only once
/// it changed.
type Signature = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

fn signature(dir: &Path) -> Signature {
    ["model.toml", "model.onnx"]
        .iter()
        .map(|f| {
            let path = dir.join(f);
            let meta = std::fs::metadata(&path)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
            (path, meta)
        })
        .collect()
}

struct Watcher {
    root: PathBuf,
    interval: Duration,
    tx: watch::Sender<Arc<Model>>,
    metrics: ModelMetrics,
    refused: Option<Signature>,
}

impl Watcher {
    async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.check().await,
            }
        }
    }

    async fn check(&mut self) {
        let wanted = match versions(&self.root) {
            Ok(v) => match v.last() {
                Some(latest) => self.root.join(latest),
                None => return,
            },
            Err(e) => {
                tracing::warn!(root = %self.root.display(), error = %e, "cannot list model versions");
                return;
            }
        };
        let current = self.tx.borrow().clone();
        if wanted == current.dir {
            return;
        }
        let sig = signature(&wanted);
        if self.refused.as_ref() == Some(&sig) {
            return;
        }
        let dir = wanted.clone();
        let loaded = tokio::task::spawn_blocking({
            let current = current.clone();
            move || load_successor(&current, &dir)
        })
        .await
        .unwrap_or_else(|e| Err(format!("model loading task: {e}")));
        match loaded {
            Ok(next) => {
                tracing::info!(
                    from = %current.spec.version,
                    to = %next.spec.version,
                    dir = %wanted.display(),
                    "model version switched"
                );
                self.metrics.serving(&next);
                self.metrics.reloads.with_label_values(&["loaded"]).inc();
                self.refused = None;
                self.tx.send_replace(Arc::new(next));
            }
            Err(e) => {
                tracing::error!(
                    dir = %wanted.display(),
                    error = %e,
                    serving = %current.spec.version,
                    "new model version refused; the served one stays"
                );
                self.metrics.reloads.with_label_values(&["refused"]).inc();
                self.refused = Some(sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically_and_skip_hidden_folders() {
        let root = tempfile::tempdir().unwrap();
        for v in ["1", "10", "2", ".3", "candidate"] {
            std::fs::create_dir(root.path().join(v)).unwrap();
        }
        std::fs::write(root.path().join("README"), "not a version").unwrap();
        assert_eq!(
            versions(root.path()).unwrap(),
            ["candidate", "1", "2", "10"]
        );
    }

    #[test]
    fn latest_resolves_to_the_highest_version_and_a_version_folder_pins() {
        let root = tempfile::tempdir().unwrap();
        for v in ["1", "2", "3"] {
            let toml = format!(
                "name = \"m\"\nversion = \"{v}\"\nfeatures = [\"a\"]\ninput = \"x\"\noutput = \"y\"\n\
                 output_kind = \"score\"\npositive_label = \"p\"\nnegative_label = \"n\"\n"
            );
            std::fs::create_dir(root.path().join(v)).unwrap();
            // Version 3's model.toml is unreadable, so the feature list comes from 2.
            let toml = if v == "3" {
                "version = ".to_string()
            } else {
                toml
            };
            std::fs::write(root.path().join(v).join("model.toml"), toml).unwrap();
        }
        let mut cfg = ModelConfig {
            dir: root.path().to_path_buf(),
            version: LATEST.into(),
            watch_interval_ms: 1000,
            shadow_version: "1".into(),
        };
        assert!(cfg.follows_latest());
        assert_eq!(
            cfg.candidates().unwrap(),
            ["3", "2", "1"].map(|v| root.path().join(v))
        );
        assert_eq!(cfg.resolve().unwrap(), root.path().join("2"));
        assert_eq!(cfg.shadow_folder().unwrap(), root.path().join("1"));
        cfg.version = "1".into();
        assert!(!cfg.follows_latest());
        assert_eq!(cfg.resolve().unwrap(), root.path().join("1"));
        cfg.dir = root.path().join("2");
        cfg.version = LATEST.into();
        assert!(!cfg.follows_latest());
        assert_eq!(cfg.resolve().unwrap(), root.path().join("2"));
        assert_eq!(cfg.shadow_folder().unwrap(), root.path().join("1"));
        cfg.dir = root.path().join("missing");
        assert!(cfg.resolve().is_err());
    }

    #[test]
    fn versions_that_change_the_lowest_ones_features_are_not_candidates() {
        let root = tempfile::tempdir().unwrap();
        let write = |v: &str, name: &str, features: &str| {
            let dir = root.path().join(v);
            std::fs::create_dir(&dir).unwrap();
            let toml = format!(
                "name = \"{name}\"\nversion = \"{v}\"\nfeatures = [{features}]\ninput = \"x\"\n\
                 output = \"y\"\noutput_kind = \"score\"\npositive_label = \"p\"\nnegative_label = \"n\"\n"
            );
            std::fs::write(dir.join("model.toml"), toml).unwrap();
        };
        std::fs::create_dir(root.path().join("0")).unwrap(); // no model.toml: skipped as base
        // A copy left unrenamed (its model.toml says 3) sorts below the numbers.
        let copy = root.path().join("m-3");
        std::fs::create_dir(&copy).unwrap();
        write("1", "m", r#""a", "b""#);
        write("2", "m", r#""a", "b""#);
        write("3", "m", r#""a", "b", "c""#); // a feature added
        write("4", "m", r#""b", "a""#); // reordered
        write("5", "other", r#""a", "b""#);
        write("6", "m", r#""a", "b""#);
        std::fs::copy(root.path().join("3/model.toml"), copy.join("model.toml")).unwrap();
        let cfg = ModelConfig {
            dir: root.path().to_path_buf(),
            version: LATEST.into(),
            watch_interval_ms: 1000,
            shadow_version: String::new(),
        };
        assert_eq!(
            cfg.candidates().unwrap(),
            ["6", "2", "1", "0"].map(|v| root.path().join(v))
        );
        assert_eq!(cfg.resolve().unwrap(), root.path().join("6"));
        // Once the old versions are gone, the lowest left sets the features.
        for v in ["0", "1", "2"] {
            std::fs::remove_dir_all(root.path().join(v)).unwrap();
        }
        assert_eq!(cfg.resolve().unwrap(), root.path().join("3"));
    }

    #[test]
    fn a_changed_file_changes_the_signature() {
        let dir = tempfile::tempdir().unwrap();
        let before = signature(dir.path());
        std::fs::write(dir.path().join("model.onnx"), b"partial").unwrap();
        let after = signature(dir.path());
        assert_ne!(before, after);
        assert_eq!(after, signature(dir.path()));
    }
}
