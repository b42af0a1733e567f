#!/usr/bin/env python3
"""Train the default fraud model on the project's own generator and export it to ONNX.

    .venv/bin/python scripts/train_model.py [--seed 7] [--rows 120000] [--out models/fraud/1]

Data comes from `lanes sample` (the Rust generator demo traffic also uses), so training
and serving share one feature definition. The same seed gives the same data, model and
metrics. Writes model.onnx, model.toml and metrics.json into --out and prints held-out
AUC.
"""

import argparse
import io
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import average_precision_score, roc_auc_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lanes_bin():
    if os.environ.get("LANES_BIN"):
        return os.environ["LANES_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    path = os.path.join(target, "debug", "lanes")
    if not os.path.exists(path):
        subprocess.run(["cargo", "build", "--quiet", "-p", "lanes-cli"], cwd=ROOT, check=True)
    return path


def sample(rows, seed, cards):
    out = subprocess.run(
        [lanes_bin(), "sample", "--count", str(rows), "--seed", str(seed), "--cards", str(cards)],
        check=True, capture_output=True, text=True,
    ).stdout
    header = out.split("\n", 1)[0].split(",")
    data = np.loadtxt(io.StringIO(out), delimiter=",", skiprows=1, dtype=np.float64)
    return header[:-1], data[:, :-1].astype(np.float32), data[:, -1].astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rows", type=int, default=120_000)
    ap.add_argument("--cards", type=int, default=5_000)
    ap.add_argument("--trees", type=int, default=60)
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "fraud", "1"))
    args = ap.parse_args()

    features, x, y = sample(args.rows, args.seed, args.cards)
    split = int(len(y) * 0.75)
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]

    model = GradientBoostingClassifier(
        n_estimators=args.trees, max_depth=3, learning_rate=0.1, subsample=0.8, random_state=args.seed
    )
    model.fit(x_train, y_train)
    proba = model.predict_proba(x_test)[:, 1]
    metrics = {
        "seed": args.seed,
        "rows": args.rows,
        "fraud_rate": float(y.mean()),
        "test_auc": round(float(roc_auc_score(y_test, proba)), 6),
        "test_average_precision": round(float(average_precision_score(y_test, proba)), 6),
        "trees": args.trees,
    }

    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, len(features)]))],
        options={id(model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "model.onnx")
    with open(onnx_path, "wb") as f:
        f.write(onx.SerializeToString())

    # The exported graph must agree with scikit-learn before it is committed.
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    onnx_proba = session.run(["probabilities"], {"input": x_test[:2000]})[0][:, 1]
    drift = float(np.max(np.abs(onnx_proba - proba[:2000])))
    if drift > 1e-4:
        sys.exit(f"ONNX export disagrees with scikit-learn by {drift}")
    metrics["onnx_max_abs_diff"] = drift

    version = os.path.basename(os.path.normpath(args.out))
    name = os.path.basename(os.path.dirname(os.path.normpath(args.out)))
    with open(os.path.join(args.out, "model.toml"), "w") as f:
        f.write(f'# Written by scripts/train_model.py --seed {args.seed} --rows {args.rows}\n')
        f.write(f'name = "{name}"\nversion = "{version}"\n')
        f.write("features = [" + ", ".join(f'"{n}"' for n in features) + "]\n")
        f.write('input = "input"\noutput = "probabilities"\noutput_kind = "probabilities"\n')
        f.write('positive_class = 1\nthreshold = 0.5\npositive_label = "fraud"\nnegative_label = "legit"\n')
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
