//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and any crash inputs
//! kept as regressions (`fuzz/regressions/<target>/`) through the fuzz targets: zero
//! panics, and every target has a corpus.

use std::path::Path;

#[test]
fn every_committed_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    for (name, target) in lanes_fuzz_targets::TARGETS {
        let mut inputs = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("corpus entry").path();
                let data = std::fs::read(&path).expect("corpus file");
                let run = std::panic::catch_unwind(|| target(&data));
                assert!(run.is_ok(), "{name} panicked on {}", path.display());
                inputs += 1;
            }
        }
        assert!(inputs >= 10, "{name} has only {inputs} corpus inputs");
    }
}
