import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from lungseg.errors import LungsegError
from lungseg.sweep import SweepSummary, collect_runs, record_error, write_summary

SHARED = ["data.image_size=32", "trainer.max_epochs=1"]


def fake_run(sweep: Path, job: int, model: str, metrics: dict | None = None) -> Path:
    """A job folder as Hydra and train() leave it: .hydra/ and, when given, metrics.json."""
    run = sweep / f"{job}_model={model}"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save([f"model={model}", *SHARED], run / ".hydra" / "overrides.yaml")
    OmegaConf.save({"hydra": {"job": {"num": job}}}, run / ".hydra" / "hydra.yaml")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def metrics(dice: float) -> dict:
    return {
        "best_epoch": 3,
        "test/dice": dice,
        "test/iou": dice / 2,
        "test/acc": 0.9,
        "test/dice_lung": dice + 0.1,
        "test/dice_tumour": dice - 0.1,
        "test/loss": 0.5,
        "train_minutes": 1.5,
    }


def test_summary_lists_runs_best_dice_first_and_failed_runs_with_their_error(tmp_path):
    fake_run(tmp_path, 0, "unet", metrics(0.6))
    record_error(fake_run(tmp_path, 1, "fcn"), LungsegError("model.width is -1.\nSecond line."))
    fake_run(tmp_path, 2, "segnet", metrics(0.8))
    fake_run(tmp_path, 3, "deeplab")  # still running: no metrics.json, no error.txt
    fake_run(tmp_path, 10, "unet", metrics(0.6))  # ties keep the job order: 0 before 10

    rows = write_summary(tmp_path)
    assert [row["job"] for row in rows] == [2, 0, 10, 1, 3]
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "failed", "incomplete"]
    assert rows[3]["error"] == "model.width is -1."

    with open(tmp_path / "summary.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert list(table[0]) == [
        "job",
        "overrides",
        "status",
        "best_epoch",
        "test/dice",
        "test/iou",
        "test/acc",
        "test/dice_lung",
        "test/dice_tumour",
        "minutes",
        "error",
        "run",
    ]
    assert table[0]["overrides"] == "model=segnet data.image_size=32 trainer.max_epochs=1"
    assert float(table[0]["test/dice_lung"]) == pytest.approx(0.9)
    assert table[0]["run"] == "2_model=segnet" and table[3]["test/dice"] == ""

    markdown = (tmp_path / "summary.md").read_text()
    assert "5 runs (2 failed or unfinished)" in markdown
    assert "Overrides of every run: `data.image_size=32 trainer.max_epochs=1`" in markdown
    assert "| 2 | model=segnet | ok | 3 | 0.8000 | 0.4000 | 0.9000 | 0.9000 | 0.7000 |" in markdown
    assert "| 1 | model=fcn | failed |" in markdown and "model.width is -1. |" in markdown


def hydra_config(sweep: Path, run: Path, mode: RunMode = RunMode.MULTIRUN):
    runtime = {"cwd": str(sweep.parent), "output_dir": str(run)}
    return OmegaConf.create(
        {"hydra": {"mode": mode, "runtime": runtime, "sweep": {"dir": sweep.name}}}
    )


def test_callback_records_crashes_and_fails_the_sweep(tmp_path):
    sweep = tmp_path / "multirun"
    ok, crashed = fake_run(sweep, 0, "unet", metrics(0.7)), fake_run(sweep, 1, "fcn")
    job = JobReturn(status=JobStatus.FAILED, overrides=["model=fcn"])
    try:
        try:
            raise RuntimeError("CUDA out of memory")
        except RuntimeError as cause:
            raise ValueError("Error in call to target 'Trainer':") from cause  # like instantiate
    except ValueError as error:
        job.return_value = error
    callback = SweepSummary()

    callback.on_job_end(hydra_config(sweep, crashed, RunMode.RUN), job)  # single runs: no-op
    assert not (crashed / "error.txt").exists() and not (sweep / "summary.csv").exists()

    callback.on_job_end(hydra_config(sweep, crashed), job)
    error = (crashed / "error.txt").read_text()
    assert error.startswith("RuntimeError: CUDA out of memory\n") and "Traceback" in error
    assert [row["status"] for row in collect_runs(sweep)] == ["ok", "failed"]
    assert (sweep / "summary.md").is_file()

    with pytest.raises(SystemExit, match=r"1 of 2 runs failed \(job 1\)"):
        callback.on_multirun_end(hydra_config(sweep, ok))
    (crashed / "error.txt").unlink()
    (crashed / "metrics.json").write_text(json.dumps(metrics(0.5)))
    callback.on_multirun_end(hydra_config(sweep, ok))  # all ok: returns, exit status 0


def test_cli_multirun_with_a_failing_job_runs_the_others_and_summarises(tmp_path):
    # Job 1 gives 2 class weights for the demo's 3 classes: a LungsegError inside train().
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "loss.class_weights=[1,2],null",
            f"data.demo_dir={tmp_path}/demo",
            *TINY,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "lungseg: error: 1 of 2 runs failed (job 0)" in result.stderr
    (sweep,) = (tmp_path / "outputs" / "train").glob("multirun_*")
    with open(sweep / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["job"], row["status"]) for row in rows] == [("1", "ok"), ("0", "failed")]
    assert float(rows[0]["test/dice"]) >= 0 and rows[0]["test/dice_tumour"] != ""
    assert rows[1]["error"].startswith("loss.class_weights has 2 values but the data has 3")
    assert "loss.class_weights=null" in rows[0]["overrides"]
    assert (sweep / rows[1]["run"] / "error.txt").is_file()
    assert (sweep / rows[0]["run"] / "curves.png").is_file()
    assert "| 1 | loss.class_weights=null | ok |" in (sweep / "summary.md").read_text()


def test_record_error_shows_the_lungseg_error_inside_hydras_wrapper(tmp_path):
    try:
        try:
            raise LungsegError("data.normalize is 'bogus'; choose one of dataset, image, none.")
        except LungsegError as cause:
            raise RuntimeError("Error in call to target 'SegDataModule':") from cause
    except RuntimeError as error:
        record_error(tmp_path, error)
    assert (tmp_path / "error.txt").read_text() == (
        "data.normalize is 'bogus'; choose one of dataset, image, none.\n"
    )


def test_summary_ends_with_mean_and_std_over_finished_runs(tmp_path):
    for fold, dice in enumerate([0.7, 0.8, 0.9]):
        values = {**metrics(dice), "test/dice_nonempty": dice - 0.05, "test/fp_empty": 0.1}
        if fold:  # post-processed in two runs; NaN: no test image without a lesion there
            values["test_post/fp_empty"] = 0.2 if fold == 1 else float("nan")
        fake_run(tmp_path, fold, f"unet_fold{fold}", values)
    record_error(fake_run(tmp_path, 3, "fcn"), LungsegError("broken"))
    write_summary(tmp_path)
    markdown = (tmp_path / "summary.md").read_text()
    assert "Mean ± std (population) over the 3 finished runs:" in markdown
    assert "- test/dice: 0.8000 ± 0.0816" in markdown
    assert "- test/dice_nonempty: 0.7500 ± 0.0816" in markdown
    assert "- test/fp_empty: 0.1000 ± 0.0000\n" in markdown
    assert "- test_post/fp_empty: 0.2000 ± 0.0000 (over 1 of them)" in markdown
    with open(tmp_path / "summary.csv", newline="") as file:
        header = next(csv.reader(file))
    assert header[4:9] == [
        "test/dice",
        "test/iou",
        "test/acc",
        "test/dice_nonempty",
        "test/fp_empty",
    ]


def test_fold_sweep_and_crossval_report(tmp_path):
    """A 2-fold cross-validation as the README runs it: the multirun, its mean ± std, and
    benchmarks/crossval.py choosing post-processing on the validation folds (the run folders'
    names hold '=' and ',', which Hydra overrides must quote)."""
    folds = ["data.num_folds=2", "data.fold=0,1", "data.split=[0.5,0.5,0.0]"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *folds, f"data.demo_dir={tmp_path}/demo"]
        + [*TINY, "data.demo_num_images=12"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train").glob("multirun_*")
    assert "Mean ± std (population) over the 2 finished runs:" in (sweep / "summary.md").read_text()
    reports = [
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "crossval.py"),
                str(sweep),
                *("--min-sizes", "0", "4"),
                *("--thresholds", "argmax", "0.7"),
                *("--min-confidences", "0", "0.9"),
                *("--jobs", jobs),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        for jobs in ("1", "2")
    ]
    for report in reports:
        assert report.returncode == 0, report.stderr[-3000:]
    report = reports[0]
    assert reports[1].stdout == report.stdout  # the folds scored in two processes: the same
    assert "| mean ± std | 2 folds |" in report.stdout
    assert "on validation and test: none\n" in report.stdout  # the default recipe has none
    grid_rows = [
        line.split(" | ")
        for line in report.stdout.splitlines()
        if line.startswith(("| argmax |", "| 0.7 |"))
    ]
    assert len(grid_rows) == 2 * 2 * 2
    # Each fold chose one setting on its own validation split, named in its test row.
    chosen_by = [row[-1].strip(" |") for row in grid_rows]
    assert sorted(k for cell in chosen_by if cell for k in cell.split(", ")) == ["0", "1"]
    fold_rows = {line.split(" | ")[0][2:]: line for line in report.stdout.splitlines()}
    for row, cell in zip(grid_rows, chosen_by, strict=True):
        setting = ", ".join(part.strip("| ") for part in row[:3])
        for k in cell.split(", ") if cell else []:
            assert f" | {setting} | " in fold_rows[k]


def test_crossval_refuses_runs_trained_without_a_val_split(tmp_path):
    """A fold run with data.split's val fraction at 0 has no split to choose post-processing
    on: crossval.py says so and where its test scores are, instead of failing in eval."""
    for fold, splits in enumerate([("train", "val", "test"), ("train", "test", "test")]):
        run = tmp_path / f"fold{fold}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "metrics.json").write_text(
            json.dumps({"best_checkpoint": str(run / "checkpoints" / "last.ckpt")})
        )
        rows = "".join(f"s{i},{split}\n" for i, split in enumerate(splits))
        (run / "split.csv").write_text("file,split\n" + rows)
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "crossval.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"crossval: {tmp_path / 'fold1'} trained without a val split" in result.stderr
    assert "fold0" not in result.stderr


def test_crossval_chooses_on_validation_dice_or_under_a_false_positive_budget():
    from benchmarks.crossval import choose

    dice = [0.70, 0.72, 0.72, 0.60]
    nonempty = [0.80, 0.78, 0.79, 0.74]
    fp_rate = [0.60, 0.40, 0.30, 0.10]
    assert choose(dice, nonempty, fp_rate, None) == 1  # best over all slices; tie: the earliest
    assert choose(dice, nonempty, fp_rate, 0.35) == 2  # best non-empty Dice with FP <= 0.35
    assert choose(dice, nonempty, fp_rate, 0.2) == 3
    assert choose(dice, nonempty, fp_rate, 0.05) == 3  # none qualifies: the lowest FP rate
    # no empty slices (FP rate None) pass any budget; no non-empty ones count as the worst
    assert choose(dice, [None, 0.5, None, None], [None, None, 0.9, 0.9], 0.35) == 1


def test_long_override_lists_give_short_distinct_folder_names():
    from lungseg import short_dirname

    assert short_dirname("model=unet") == "model=unet"
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(short_dirname(long_a)) == 120 and short_dirname(long_a) != short_dirname(long_b)


def test_summary_shows_the_post_processed_test_scores_where_runs_have_them(tmp_path):
    """test_post/* (train.py's scores with the recipe's flips and min_size) get their columns
    and their mean ± std; a sweep without them gets neither."""
    for fold, dice in enumerate([0.78, 0.82]):
        post = {"test_post/dice_nonempty": dice, "test_post/fp_empty": 0.9}
        fake_run(tmp_path / "post", fold, f"unet_fold{fold}", {**metrics(dice), **post})
    write_summary(tmp_path / "post")
    markdown = (tmp_path / "post" / "summary.md").read_text()
    assert "- test_post/dice_nonempty: 0.8000 ± 0.0200" in markdown
    assert "- test_post/fp_empty: 0.9000 ± 0.0000" in markdown
    header = markdown.splitlines()[5]
    assert "test_post/dice_nonempty | test_post/fp_empty" in header
    assert "test_post/dice |" not in header  # a column only for a score the runs have

    fake_run(tmp_path / "plain", 0, "unet", metrics(0.8))
    write_summary(tmp_path / "plain")
    assert "test_post" not in (tmp_path / "plain" / "summary.md").read_text()
