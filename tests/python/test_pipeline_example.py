"""examples/python/pipeline.py run as a user runs it: the test models `tokens` and `classifier`
(scripts/make_models.py) served by two TorchScript workers behind a sidecar, the example's
answers compared with torch running the same models here."""

import os
import pathlib
import re
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch

from conftest import Worker
from test_sdk_client import wait_until_routed
from test_sidecar import Sidecar

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_models.py"), str(out)], check=True)
    return out


def test_the_pipeline_example_classifies_through_the_sidecar_as_torch_does(models):
    sidecar = Sidecar([("placeholder", 1, "node-b")], "--hold-timeout", "30s")
    workers = []
    try:
        for name in ["tokens", "classifier"]:
            workers.append(Worker(str(models / name / "model.pt"), "--broker", sidecar.dir.name))
        with open(os.path.join(sidecar.dir.name, "workers.yaml"), "w") as file:
            for name, worker in zip(["tokens", "classifier"], workers):
                file.write(f"- {{model: {name}, address: '127.0.0.1:{worker.port}', node: node-a}}\n")
        wait_until_routed(sidecar, "tokens", "classifier")
        env = dict(os.environ, REMOTEMEDIA_SIDECAR=f"unix://{sidecar.dir.name}")
        run = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "python" / "pipeline.py"),
             "--seed", "11", "--show", "8"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()

        token_ids = np.random.default_rng(11).integers(0, 1000, (8, 2048), dtype=np.int64)
        with torch.no_grad():
            embedder = torch.jit.load(str(models / "tokens" / "model.pt"))
            classifier = torch.jit.load(str(models / "classifier" / "model.pt"))
            expected = classifier(embedder(torch.from_numpy(token_ids))).numpy()
        classes = expected.argmax(axis=1)
        for i, line in enumerate(lines[:8]):
            match = re.fullmatch(r"sequence (\d+): class (\d+) \(p=([0-9.]+)\)", line)
            assert match, line
            assert int(match[1]) == i and int(match[2]) == classes[i], line
            assert abs(float(match[3]) - expected[i, classes[i]]) < 1e-5, line
        counts = " ".join(map(str, np.bincount(classes, minlength=3)))
        assert lines[8] == f"classified 8 sequences: {counts}"

        # The 128 KiB batch of token ids went by reference to the colocated worker.
        url = f"http://127.0.0.1:{sidecar.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            metrics = response.read().decode()
        assert 'requests_total{path="shm_local",outcome="ok"} 1' in metrics, metrics
    finally:
        for worker in workers:
            worker.stop()
        sidecar.stop()
