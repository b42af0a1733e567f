//! The training script is reproducible: the same seed gives the same model metrics, and
//! the committed model is the one `model.toml` describes.

use std::process::Command;

use lanes_tests::*;

fn train(seed: u64, out: &std::path::Path) -> serde_json::Value {
    let status = Command::new(python())
        .arg(root().join("scripts/train_model.py"))
        .args([
            "--seed",
            &seed.to_string(),
            "--rows",
            "8000",
            "--trees",
            "10",
            "--cards",
            "500",
            "--out",
        ])
        .arg(out)
        .env("LANES_BIN", bin("lanes"))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("python runs");
    assert!(status.success());
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

#[test]
fn the_same_seed_reproduces_the_same_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("m/1"),
        dir.path().join("m/2"),
        dir.path().join("m/3"),
    );
    let first = train(3, &a);
    assert_eq!(train(3, &b), first);
    assert_ne!(
        train(4, &c)["test_auc"],
        first["test_auc"],
        "another seed, other data"
    );
    let auc = first["test_auc"].as_f64().unwrap();
    assert!(auc > 0.6, "the label depends on the features: AUC {auc}");
    // The exported model loads and passes Lanes' own checks.
    lanes_common::model::Model::load(&a).unwrap();
}

#[test]
fn the_committed_model_has_its_metrics() {
    let dir = root().join("models/fraud/1");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["test_auc"].as_f64().unwrap() > 0.8);
    let spec = lanes_common::model::ModelSpec::read(&dir).unwrap();
    assert_eq!(spec.features, lanes_common::generator::FEATURES.to_vec());
    assert_eq!((spec.name.as_str(), spec.version.as_str()), ("fraud", "1"));
}
