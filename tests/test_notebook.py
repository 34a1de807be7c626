"""notebooks/eval.ipynb executes on a tiny set of runs and produces the plot."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.evaluation.test_report import make_runs

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "eval.ipynb"


def test_eval_notebook_executes(tmp_path, monkeypatch):
    sft, rl = make_runs(tmp_path)
    monkeypatch.setenv("SFTRL_RUNS", f"{sft}:{rl}")
    monkeypatch.setenv("SFTRL_REPORT_OUT", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("| gp-l | ood-rule |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert os.path.exists(tmp_path / "out" / "curves.png")
