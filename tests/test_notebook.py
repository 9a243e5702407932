import pytest
from conftest import ROOT

nbformat = pytest.importorskip(
    "nbformat", reason='needs the research extra: pip install -e ".[research]"'
)
nbclient = pytest.importorskip(
    "nbclient", reason='needs the research extra: pip install -e ".[research]"'
)

NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch):
    # The notebook's own switch to tiny sizes; everything it writes goes to tmp_path.
    monkeypatch.setenv("LUNGSEG_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("LUNGSEG_NOTEBOOK_DIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # as Jupyter starts it
    )
    client.execute()
    for arch in ("unet", "fcn", "segnet", "deeplab"):
        assert (tmp_path / arch / "metrics.json").is_file(), arch
    assert len(list((tmp_path / "predictions").glob("*_overlay.png"))) == 3
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # 3 figures and an overlay
    assert not [o for o in outputs if o.output_type == "error"]
