"""Scores rows with onnxruntime's Python API (used by tests/tests/streaming.rs).

stdin: {"model": PATH, "rows": [[f, ...], ...]}; stdout: [score, ...], the positive
class probability of each row, computed from float32 features as Lanes feeds them.
"""

import json
import sys

import numpy as np
import onnxruntime as ort

request = json.load(sys.stdin)
session = ort.InferenceSession(request["model"], providers=["CPUExecutionProvider"])
rows = np.asarray(request["rows"], dtype=np.float32)
probabilities = session.run(["probabilities"], {"input": rows})[0]
print(json.dumps([float(p) for p in probabilities[:, 1]]))
