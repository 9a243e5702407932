import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import OmegaConf

from lungseg import job_dirname
from lungseg.errors import LungsegError
from lungseg.sweep import SweepSummary, collect_runs, record_error, write_summary

SHARED = ["data.image_size=32", "trainer.max_epochs=1"]


def fake_run(
    sweep: Path,
    job: int,
    model: str,
    metrics: dict | None = None,
    overrides: tuple[str, ...] = (),
    hydra: dict | None = None,
) -> Path:
    """A job folder as Hydra and train() leave it: .hydra/ and, when given, metrics.json."""
    run = sweep / job_dirname(job, str(sweep), [f"model={model}", *overrides], [])
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save([f"model={model}", *overrides, *SHARED], run / ".hydra" / "overrides.yaml")
    settings = {"job": {"num": job}, "sweep": {"dir": str(sweep)}, **(hydra or {})}
    OmegaConf.save({"hydra": settings}, run / ".hydra" / "hydra.yaml")
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

    assert b"\r" not in (tmp_path / "summary.csv").read_bytes()
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
    assert table[0]["run"] == "2_model-segnet" and table[3]["test/dice"] == ""

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
        fake_run(tmp_path, fold, "unet", values, (f"data.fold={fold}",))
    record_error(fake_run(tmp_path, 3, "unet", None, ("data.fold=3",)), LungsegError("broken"))
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
    # one finished run (the others failed): no "0.8000 ± 0.0000" over it
    one = tmp_path / "one"
    fake_run(one, 0, "unet", metrics(0.8), ("data.fold=0",))
    record_error(fake_run(one, 1, "unet", None, ("data.fold=1",)), LungsegError("broken"))
    write_summary(one)
    markdown = (one / "summary.md").read_text()
    assert "One finished run: no mean ± std." in markdown and "± 0.0000" not in markdown


def test_fold_sweep_and_crossval_report(tmp_path):
    """A 2-fold cross-validation as the README runs it: the multirun, its mean ± std, and
    benchmarks/crossval.py choosing post-processing on the validation folds."""
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
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_data.fold-0", "1_data.fold-1"]
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
    # the demo's two foreground classes, each score their mean
    assert report.stdout.startswith("Scores: the mean over the foreground classes lung, tumour.")
    fold_rows = {line.split(" | ")[0][2:]: line for line in report.stdout.splitlines()}
    for fold in ("0", "1"):  # labelled by the run's data.fold
        assert fold_rows[fold].startswith(f"| {fold} | {fold}_data.fold-{fold} |")
    for row, cell in zip(grid_rows, chosen_by, strict=True):
        setting = ", ".join(part.strip("| ") for part in row[:3])
        for k in cell.split(", ") if cell else []:
            assert f" | {setting} | " in fold_rows[k]

    # A copy of the sweep, the original moved away: the copy's own checkpoints are scored.
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    sweep.rename(tmp_path / "moved")
    one = ("--min-sizes", "0", "--thresholds", "argmax", "--min-confidences", "0")
    command = [sys.executable, str(ROOT / "benchmarks" / "crossval.py"), str(copy), *one]
    report = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert len(list(copy.glob("*/crossval/test_targmax_min0_conf0/per_image.csv"))) == 2
    assert not list((tmp_path / "moved").glob("*/crossval/test_targmax_min0_conf0"))


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
    assert f"lungseg: error: {tmp_path / 'fold1'} trained without a val split" in result.stderr
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


PALETTE = (
    "data.palette={background:[0,0,0],left_lung:[255,0,0],right_lung:[0,255,0],heart:[0,0,255]}"
)


def parses_unquoted(path: Path) -> bool:
    """Whether ``ckpt_path=<path>`` is one plain override for Hydra, written without quotes."""
    try:
        (override,) = OverridesParser.create().parse_overrides([f"ckpt_path={path}"])
    except OverrideParseException:
        return False
    return not override.is_sweep_override() and override.value() == str(path)


def test_cli_sweep_names_each_job_by_its_swept_settings_in_command_line_order(tmp_path):
    """Were named by all their overrides, sorted, cut at 120 characters: the shared palette
    and group pattern filled the names and the swept settings were cut off; with '=', ',',
    quotes and brackets in them, a path into a job folder was no plain Hydra override. The
    jobs stop at the empty image folder: their folders are named before they run."""
    (tmp_path / "images").mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "model.width=4,8", "data.fold=0,1"]
        + [PALETTE, "data.group_pattern='^(PAT\\d+)_'", "data.num_folds=2"]
        + [f"data.image_dir={tmp_path}/images", f"data.mask_dir={tmp_path}/images"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "4 of 4 runs failed" in result.stderr, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train").glob("multirun_*")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [job.name for job in jobs] == [
        "0_model.width-4_data.fold-0",
        "1_model.width-4_data.fold-1",
        "2_model.width-8_data.fold-0",
        "3_model.width-8_data.fold-1",
    ]
    assert all(parses_unquoted(job / "checkpoints" / "last.ckpt") for job in jobs)
    assert PALETTE in OmegaConf.load(jobs[0] / ".hydra" / "overrides.yaml")
    assert "holds no image files" in (jobs[3] / "error.txt").read_text()


EXCLUDED = ["data.image_dir", "resume"]


def test_job_folder_names_fall_back_to_all_overrides_in_safe_characters(tmp_path):
    """Where multirun.yaml is missing, unreadable or sweeps nothing, every override but the
    excluded keys names the job; the names stay plain Hydra values and distinct."""
    overrides = ["model=unet", PALETTE, "data.image_dir=/data/x", "resume=true"]
    named = "0_model-unet_data.palette-_background_0_0_0_left_lung_255_0_0_right_lung_0_255_0_"
    assert job_dirname(0, str(tmp_path), overrides, EXCLUDED) == named + "heart_0_0_255_"
    (tmp_path / "multirun.yaml").write_text("hydra: [unclosed\n")
    assert job_dirname(0, str(tmp_path), overrides, EXCLUDED) == named + "heart_0_0_255_"
    OmegaConf.save({"hydra": {"overrides": {"task": ["seed=1"]}}}, tmp_path / "multirun.yaml")
    assert job_dirname(3, str(tmp_path), ["seed=1"], EXCLUDED) == "3_seed-1"
    assert parses_unquoted(tmp_path / (named + "heart_0_0_255_") / "last.ckpt")
    assert not parses_unquoted(tmp_path / "0_model=unet" / "last.ckpt")  # the old names

    # Long names are cut with a hash; the job number keeps the names of jobs alike distinct.
    long = [f"data.class_names=[{','.join(['x' * 20] * 12)}]"]
    names = {job_dirname(n, str(tmp_path / "none"), long, []) for n in range(12)}
    assert len(names) == 12 and all(len(name) <= 123 for name in names)


def test_job_folder_names_follow_the_sweep_saved_in_multirun_yaml(tmp_path):
    """The sweeper's params first, then the command line's sweeps, as Hydra's sweeper takes
    them; resume=true, excluded, leaves a job in the folder it had."""
    task = ["model=unet,fcn", PALETTE, "data.fold=range(0,2)", "+tag=choice(a)"]
    sweep = {"sweeper": {"params": {"seed": "1,2"}}, "overrides": {"task": task}}
    OmegaConf.save({"hydra": sweep}, tmp_path / "multirun.yaml")
    for extra in ([], ["resume=true"]):
        job = ["seed=2", "model=fcn", PALETTE, "data.fold=1", "+tag=a", *extra]
        name = "3_seed-2_model-fcn_data.fold-1_+tag-a"
        assert job_dirname(3, str(tmp_path), job, EXCLUDED) == name
    sweep["overrides"]["task"] = ["data.image_dir=a,b", PALETTE]  # only an excluded key
    sweep["sweeper"]["params"] = None
    OmegaConf.save({"hydra": sweep}, tmp_path / "multirun.yaml")
    assert job_dirname(1, str(tmp_path), ["data.image_dir=b", PALETTE], EXCLUDED) == "1"


def test_summary_shows_the_post_processed_test_scores_where_runs_have_them(tmp_path):
    """test_post/* (train.py's scores with the recipe's flips and min_size) get their columns
    and their mean ± std; a sweep without them gets neither."""
    for fold, dice in enumerate([0.78, 0.82]):
        post = {"test_post/dice_nonempty": dice, "test_post/fp_empty": 0.9}
        fake_run(tmp_path / "post", fold, "unet", {**metrics(dice), **post}, (f"data.fold={fold}",))
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


def test_a_job_that_finds_a_finished_run_in_its_folder_leaves_it_listed_as_finished(tmp_path):
    """Was error.txt ("already holds a run") written into the finished run's folder by a sweep
    run again into its folder, and the run listed as failed."""
    run = fake_run(tmp_path, 0, "unet", metrics(0.7))
    record_error(run, LungsegError(f"The run folder {run} already holds a run"))
    assert not (run / "error.txt").exists()
    assert [row["status"] for row in collect_runs(tmp_path)] == ["ok"]


def test_a_run_that_finished_after_it_failed_is_listed_as_finished(tmp_path):
    """error.txt of an earlier try is older than metrics.json: the run finished (a failed job
    run again into its folder); an error.txt newer than metrics.json: it failed."""
    retried, broken = fake_run(tmp_path, 0, "unet"), fake_run(tmp_path, 1, "fcn", metrics(0.6))
    record_error(retried, LungsegError("out of memory"))
    (retried / "metrics.json").write_text(json.dumps(metrics(0.7)))
    (broken / "error.txt").write_text("broken\n")
    os.utime(retried / "error.txt", (1_000_000, 1_000_000))
    os.utime(broken / "metrics.json", (1_000_000, 1_000_000))
    rows = collect_runs(tmp_path)
    assert [(row["job"], row["status"]) for row in rows] == [(0, "ok"), (1, "failed")]
    assert rows[0]["test/dice"] == pytest.approx(0.7) and rows[1]["error"] == "broken"


def test_cli_sweep_run_again_into_its_folder_keeps_its_finished_runs(tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "train.py"), "-m", "seed=1", f"hydra.sweep.dir={sweep}"]
    command += [f"data.demo_dir={tmp_path}/demo", *TINY]
    for _ in range(2):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "holds a finished run, which is kept as it was" in result.stdout + result.stderr
    # Nothing swept: the job is named by all its overrides but the paths, the same each time.
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert job.name.startswith("0_seed-1_data.demo_num_images-16_") and parses_unquoted(job)
    assert not list(sweep.glob("*/error.txt"))
    assert [row["status"] for row in collect_runs(sweep)] == ["ok"]
    assert "1 runs (0 failed or unfinished)" in (sweep / "summary.md").read_text()


def test_a_finished_run_of_other_settings_is_named_with_the_settings_that_differ(tmp_path, caplog):
    """A job folder is named by the swept settings alone: a sweep run again into its folder
    with another shared setting (model.width) meets the earlier runs, kept as they were. That
    is a warning naming the settings, not the INFO of a plain rerun."""
    from lungseg import hydra_files

    run = fake_run(tmp_path, 0, "unet", metrics(0.7), ("model.width=4",))
    earlier = ["model=unet", "model.width=4", *SHARED]
    refused = LungsegError("already holds a run")
    try:
        hydra_files.remember(run)  # as KeepHydraFiles does before Hydra writes the job's
        with caplog.at_level("INFO", logger="lungseg"):
            record_error(run, refused, [*earlier, "resume=true"])
            (same,) = caplog.records
            assert same.levelname == "INFO" and "finished run, which is kept" in same.message
            caplog.clear()
            record_error(run, refused, ["model=unet", "model.width=8", *SHARED, "seed=3"])
    finally:
        hydra_files.restore(run)
    (changed,) = caplog.records
    assert changed.levelname == "WARNING"
    assert (
        "holds a finished run of other settings than this job's (model.width: 4 -> 8; seed: "
        "(not given) -> 3)" in changed.getMessage()
    )
    assert "Give the sweep another hydra.sweep.dir" in changed.getMessage()
    assert "or add resume=true to continue its runs with them" in changed.getMessage()
    assert not (run / "error.txt").exists()


def test_python_m_lungseg_sweep_writes_the_summary_of_a_sweep_folder_again(tmp_path):
    sweep = tmp_path / "multirun"
    fake_run(sweep, 0, "unet", metrics(0.6))
    fake_run(sweep, 1, "fcn", metrics(0.8))

    def summarize(folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lungseg.sweep", str(folder)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    result = summarize(sweep)
    assert result.returncode == 0, result.stderr
    assert f"{sweep / 'summary.md'}: 2 runs, 0 failed or unfinished" in result.stdout
    assert "| 1 | model=fcn | ok |" in (sweep / "summary.md").read_text()
    with open(sweep / "summary.csv", newline="") as file:
        assert [row["job"] for row in csv.DictReader(file)] == ["1", "0"]
    for folder, message in [
        (tmp_path / "missing", "is not a folder"),
        (sweep / "0_model-unet", "is the folder of one run (it holds .hydra/), not of a sweep"),
        (tmp_path, f"holds no job folder itself, only in {sweep}"),
        (sweep / "0_model-unet" / "checkpoints", "holds no job of a multirun"),
    ]:
        if "missing" not in folder.name:
            folder.mkdir(exist_ok=True)
        result = summarize(folder)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"lungseg: error: {folder} {message}"), result.stderr
    assert not (tmp_path / "summary.md").exists()


def test_summary_gives_the_mean_and_std_per_setting_over_its_folds(tmp_path):
    """Was one mean ± std over every run of a sweep over data.fold=0,1 model.width=4,6."""
    dice = {(4, 0): 0.6, (4, 1): 0.8, (6, 0): 0.7, (6, 1): 0.9, (6, 2): 0.8}
    for job, ((width, fold), value) in enumerate(dice.items()):
        fake_run(
            tmp_path, job, "unet", metrics(value), (f"data.fold={fold}", f"model.width={width}")
        )
    fake_run(tmp_path, 9, "unet", metrics(0.1), ("data.fold=0", "model.width=8"))
    write_summary(tmp_path)
    markdown = (tmp_path / "summary.md").read_text()
    assert "over the 6 finished runs" not in markdown
    width4 = "Mean ± std (population) over the 2 finished runs of `model.width=4` (data.fold 0, 1):"
    width6 = "over the 3 finished runs of `model.width=6` (data.fold 0, 1, 2):"
    assert f"{width4}\n\n- test/dice: 0.7000 ± 0.1000\n" in markdown
    assert f"{width6}\n\n- test/dice: 0.8000 ± 0.0816\n" in markdown
    assert "1 of the 3 settings (overrides other than data.fold) have one finished run" in markdown


def test_summary_does_not_average_a_fold_trained_twice(tmp_path):
    """A sweep run again into its folder with its values in another order trained every
    fold again into new job folders, and the summary averaged 6 runs of 3 folds as if they
    were 6 (found by a tester)."""
    for job, fold in enumerate([0, 1, 2, 0, 1, 2]):
        fake_run(tmp_path, job, "unet", metrics(0.5 + job / 10), (f"data.fold={fold}",))
    fake_run(tmp_path, 6, "unet", metrics(0.9), ("data.fold=0", "model.width=8"))
    fake_run(tmp_path, 7, "unet", metrics(0.7), ("data.fold=1", "model.width=8"))
    write_summary(tmp_path)
    markdown = (tmp_path / "summary.md").read_text()
    assert (
        "No mean ± std over the 6 finished runs of `no other override`: they repeat data.fold "
        "0, 1, 2 (the same setting trained twice"
    ) in markdown
    assert "over the 2 finished runs of `model.width=8` (data.fold 0, 1):" in markdown


def test_summary_of_an_optuna_search_ranks_the_trials_by_the_objective(tmp_path):
    search = {"sweeper": {"_target_": "hydra_plugins.x.LungsegOptunaSweeper"}}
    search["sweeper"]["direction"] = "maximize"
    for job, (objective, dice) in enumerate([(0.5, 0.9), (0.8, 0.6), (0.7, 0.7)]):
        values = {**metrics(dice), "best_score": objective, "monitor": "val/dice"}
        fake_run(tmp_path, job, "unet", values, (f"optimizer.lr={job}",), search)
    fake_run(tmp_path, 3, "unet", None, ("optimizer.lr=3",), search)
    rows = write_summary(tmp_path)
    assert [row["job"] for row in rows] == [1, 2, 0, 3]
    markdown = (tmp_path / "summary.md").read_text()
    assert "best objective first. Optuna search: the objective, which it maximizes, is each " in (
        markdown
    )
    assert "trial's best val/dice" in markdown
    assert "| job | overrides | status | objective | best_epoch | test/dice |" in markdown
    assert "| 1 | optimizer.lr=1 | ok | 0.8000 | 3 | 0.6000 |" in markdown
    with open(tmp_path / "summary.csv", newline="") as file:
        assert next(csv.DictReader(file))["objective"] == "0.8"
    search["sweeper"]["direction"] = "minimize"
    for job in range(4):
        OmegaConf.save({"hydra": search}, next(tmp_path.glob(f"{job}_*")) / ".hydra/hydra.yaml")
    assert [row["run"][0] for row in collect_runs(tmp_path)] == ["0", "2", "1", "3"]


def crossval_run(root: Path, name: str, fold: int, *overrides: str, best: str = "") -> Path:
    """A finished fold run as train.py leaves it, as far as crossval.py reads it."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save({"data": {"fold": fold}}, run / ".hydra" / "config.yaml")
    OmegaConf.save([f"data.fold={fold}", *overrides], run / ".hydra" / "overrides.yaml")
    best = best or str(run / "checkpoints" / "best-epoch003.ckpt")
    (run / "metrics.json").write_text(json.dumps({"best_checkpoint": best, "best_epoch": 3}))
    return run


def test_crossval_orders_the_runs_by_their_data_fold_and_refuses_mixed_settings(tmp_path):
    """The rows were numbered by the position of the run in a sorted path list (10_ before
    2_), and runs of several settings or of one fold twice were pooled."""
    from benchmarks.crossval import check_one_setting

    runs = [
        crossval_run(tmp_path / "a", name, fold, "model.width=4")
        for name, fold in [("10_x", 2), ("2_x", 10), ("3_x", 0)]
    ]
    assert list(check_one_setting(sorted(runs), tmp_path / "a").values()) == [0, 2, 10]
    resumed = crossval_run(tmp_path / "a", "4_x", 1, "model.width=4", "resume=true")
    assert list(check_one_setting([*runs, resumed], tmp_path / "a").values()) == [0, 1, 2, 10]

    mixed = [
        crossval_run(tmp_path / "b", f"{k}", k % 2, f"model.width={4 + k // 2}") for k in (0, 1, 2)
    ]
    with pytest.raises(
        LungsegError,
        match=r"holds the runs of 2 settings .*`model.width=4`: 0, 1; `model.width=5`: 2\.",
    ):
        check_one_setting(mixed, tmp_path / "b")
    twice = [crossval_run(tmp_path / "c", name, 1, "model.width=4") for name in ("r1", "r2")]
    with pytest.raises(LungsegError, match=r"more than one run of a fold \(data.fold 1: r1, r2\)"):
        check_one_setting(twice, tmp_path / "c")


def test_crossval_scores_a_copied_run_with_its_own_checkpoint(tmp_path):
    """metrics.json's best_checkpoint is the absolute path the run saved it at: a copied sweep
    was scored with the original's checkpoints, or failed with a traceback once those moved."""
    from benchmarks.crossval import best_checkpoint

    original = crossval_run(tmp_path, "original", 0)
    (original / "checkpoints" / "best-epoch003.ckpt").write_bytes(b"original")
    shutil.copytree(original, tmp_path / "copy")
    copy = tmp_path / "copy"
    metrics = json.loads((copy / "metrics.json").read_text())
    assert best_checkpoint(copy, metrics) == str(copy / "checkpoints" / "best-epoch003.ckpt")
    assert best_checkpoint(original, metrics) == metrics["best_checkpoint"]
    (copy / "checkpoints" / "best-epoch003.ckpt").unlink()
    with pytest.raises(LungsegError, match=r"best checkpoint best-epoch003.ckpt is not in .*copy"):
        best_checkpoint(copy, metrics)  # not the original's, silently
    with pytest.raises(LungsegError, match="saved no best checkpoint"):
        best_checkpoint(copy, {"best_checkpoint": None})


def test_crossval_scores_are_the_mean_over_the_foreground_classes():
    """Was the first foreground class's alone (every Dice 0 where that class is background-like
    in a 3-class mask)."""
    from benchmarks.crossval import entry

    def cls(dice, nonempty, fp):
        return {"dice": {"mean": dice}, "dice_nonempty": {"mean": nonempty}, "fp_rate_empty": fp}

    summary = {"classes": {"lung": cls(0.0, 0.0, 0.5), "tumour": cls(0.8, None, 0.1)}}
    assert entry(summary, "dice") == pytest.approx(0.4)
    assert entry(summary, "dice_nonempty") == pytest.approx(0.0)  # tumour has none
    assert entry(summary, "fp_empty") == pytest.approx(0.3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--thresholds", "1.5"], "argument --thresholds: 1.5: give argmax or a probability"),
        (["--thresholds", "high"], "argument --thresholds: high: give argmax or a probability"),
        (["--min-confidences", "1"], "argument --min-confidences: 1: give a probability in [0, 1)"),
        (["--max-fp-rate", "2"], "argument --max-fp-rate: 2: give a share in [0, 1]"),
        (["--jobs", "0"], "argument --jobs: 0: give a number of 1 or more"),
    ],
)
def test_crossval_checks_its_options_before_scoring(tmp_path, args, message):
    command = [sys.executable, str(ROOT / "benchmarks" / "crossval.py"), str(tmp_path), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr


def test_crossval_reports_a_moved_checkpoint_in_one_line(tmp_path):
    crossval_run(tmp_path, "run", 0, best="/nowhere/checkpoints/best-epoch003.ckpt")
    (tmp_path / "run" / "split.csv").write_text("file,split\na,train\nb,val\nc,test\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "crossval.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(
        f"lungseg: error: {tmp_path / 'run'}'s best checkpoint best-epoch003.ckpt is not in "
    )


OPTUNA = 'needs the research extra: pip install -e ".[research]"'


def search_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python train.py hparams_search=optuna` with one tiny trial into tmp_path/sweep."""
    command = [sys.executable, str(ROOT / "train.py"), "hparams_search=optuna"]
    command += ["hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    command += [f"data.demo_dir={tmp_path}/demo", *TINY, *overrides]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_an_optuna_search_over_data_fold_is_refused_before_any_trial_trains(tmp_path):
    """Was a search that sampled the fold like a hyper-parameter: its best value was that of
    the easiest fold."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=OPTUNA)
    result = search_cli(tmp_path, "data.num_folds=2", "data.fold=0,1")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(
        "lungseg: error: data.fold=0,1 would make the Optuna search (hparams_search=optuna) "
        "sample data.fold like a hyper-parameter, but it changes which files the trials are "
        "validated and tested on"
    ), result.stderr
    assert "python train.py -m <the chosen values> data.fold=0,1" in result.stderr
    assert not list((tmp_path / "sweep").glob("*/.hydra"))  # no trial started


@pytest.mark.parametrize(
    ("params", "overrides", "given"),
    [
        ({}, ["data.seed=1,2"], "data.seed=1,2"),
        ({"data.split": "choice([0.6,0.2,0.2],[0.8,0.1,0.1])"}, [], "hydra.sweeper.params.data"),
        ({}, ["data.num_folds=choice(3,5)"], "data.num_folds=choice(3,5)"),
        ({}, ["data.split_file=a.csv,b.csv"], "data.split_file=a.csv,b.csv"),
        ({}, ["+data.group_pattern=choice(a,b)"], "+data.group_pattern=choice(a,b)"),
        ({}, ["seed=1,2,3"], "seed=1,2,3"),  # data.seed: ${seed} draws the split from it
    ],
)
def test_an_optuna_search_over_the_split_is_refused_like_one_over_data_fold(
    params, overrides, given
):
    """Was a search that sampled data.seed, data.split, data.num_folds, data.split_file,
    data.group_pattern or (through data.seed: ${seed}) seed: its best trial was the one
    tested on the easiest images."""
    from lungseg.sweep import check_split_not_searched

    with pytest.raises(LungsegError) as refused:
        check_split_not_searched(params, ["model.width=8", *overrides], "${seed}")
    message = str(refused.value)
    assert message.startswith(f"{given}") and "would make the Optuna search" in message
    assert "changes which files the trials are validated and tested on" in message
    assert "the easiest split, not of the best hyper-parameters" in message
    if given == "seed=1,2,3":
        assert "To search the training seed alone" in message and "add data.seed=42" in message
    # One value each is no search; the training seed alone, the split's fixed, is accepted.
    check_split_not_searched({}, ["data.num_folds=5", "data.seed=3", "data.fold=1"], "${seed}")
    check_split_not_searched({"seed": "choice(1, 2)"}, ["seed=1,2,3"], 42)


def test_cli_an_optuna_search_over_seed_needs_the_split_seed_fixed(tmp_path):
    """Was a search over seed that also drew a new split for every trial (data.seed:
    ${seed}); with data.seed given it searches the training seed alone."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=OPTUNA)
    result = search_cli(tmp_path, "seed=1,2")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith("lungseg: error: seed=1,2 would make the Optuna search")
    assert "add data.seed=42" in result.stderr
    assert not list((tmp_path / "sweep").glob("*/.hydra"))  # no trial started
    result = search_cli(tmp_path, "seed=1,2", "data.seed=42")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["status"] for row in collect_runs(tmp_path / "sweep")] == ["ok"]


def test_an_optuna_search_continued_into_its_folder_trains_its_new_trials_in_new_folders(
    tmp_path,
):
    """Was the new trial put into the folder of the first one, which holds a finished run:
    nothing trained, and the command ended with Optuna's traceback (or exited 0 where some
    other trial trained)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=OPTUNA)
    storage = f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}"
    for _ in range(2):
        result = search_cli(tmp_path, storage)
        assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1"]
    assert [row["status"] for row in collect_runs(sweep)] == ["ok", "ok"]
    assert "continues the search of the study in" in result.stdout + result.stderr
    # model.width, fixed by TINY, is no longer searched
    searched = "Searched by Optuna: `optimizer.lr`, `loss`, `augmentation` (each trial's values"
    assert searched in (sweep / "summary.md").read_text()


def test_a_continued_search_exits_by_its_own_trials_and_lists_earlier_unfinished_ones(tmp_path):
    """Was exit status 1 ("2 of 4 runs failed (job 1, 2)") for every later command of a
    search once a trial had been killed or had failed: a continued search trains new trials
    in new folders and never runs those again. A plain sweep runs its jobs again in their
    folders: any unfinished one still fails it."""
    sweep = tmp_path / "multirun"
    search = {"sweeper": {"_target_": "hydra_plugins.lungseg_optuna_sweeper.LungsegOptunaSweeper"}}
    fake_run(sweep, 0, "unet", metrics(0.6), hydra=search)
    killed = fake_run(sweep, 1, "unet", None, ("optimizer.lr=0.001", "resume=true"), search)
    record_error(fake_run(sweep, 2, "fcn", hydra=search), LungsegError("out of memory"))
    for run in sweep.iterdir():  # trials of the first command, then the continuation's
        os.utime(run / ".hydra" / "overrides.yaml", (1_000_000, 1_000_000))
    OmegaConf.save({"hydra": search}, sweep / "multirun.yaml")
    new = fake_run(sweep, 3, "fcn", metrics(0.7), hydra=search)
    callback = SweepSummary()

    callback.on_multirun_end(hydra_config(sweep, new))  # returns: exit status 0
    rows = {row["job"]: row for row in collect_runs(sweep)}
    assert [rows[job]["status"] for job in range(4)] == ["ok", "incomplete", "failed", "ok"]
    assert rows[1]["error"].startswith("stopped in an earlier command of the search")
    markdown = (sweep / "summary.md").read_text()
    assert "| 1 | model=unet optimizer.lr=0.001 resume=true | incomplete |" in markdown
    assert (
        "Trial 1 (incomplete), 2 (failed) of an earlier command of this search did not "
        "finish. A continued search trains new trials in new folders (also with resume=true) "
        "and does not run them again; its exit status counts only the trials it ran. To "
        "finish a stopped trial with its values, continue it on its own in its folder" in markdown
    )
    assert (
        f"    python train.py model=unet optimizer.lr=0.001 {' '.join(SHARED)} hydra.mode=RUN "
        f"hydra.run.dir={killed} hydra.sweep.dir={sweep} hydra.job.num=1 resume=true\n" in markdown
    )

    fake_run(sweep, 4, "fcn", hydra=search)  # this command's own: killed, or still running
    with pytest.raises(SystemExit, match=r"1 of 2 runs failed \(job 4\)"):
        callback.on_multirun_end(hydra_config(sweep, new))

    plain = tmp_path / "plain"
    unfinished = fake_run(plain, 0, "unet")
    os.utime(unfinished / ".hydra" / "overrides.yaml", (1_000_000, 1_000_000))
    OmegaConf.save({"hydra": {}}, plain / "multirun.yaml")
    with pytest.raises(SystemExit, match=r"1 of 2 runs failed \(job 0\)"):
        callback.on_multirun_end(hydra_config(plain, fake_run(plain, 1, "fcn", metrics(0.7))))
    assert "earlier command" not in (plain / "summary.md").read_text()


def test_cli_a_search_continued_after_a_killed_trial_exits_0_and_can_finish_it(tmp_path):
    """Was exit status 1 for the continuation ("1 of 2 runs failed (job 0)"), whose own
    trial had trained, and no way to finish the killed trial (resume=true gives the new
    trials resume=true, in new folders)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=OPTUNA)
    storage = f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}"
    sweep = tmp_path / "sweep"
    assert search_cli(tmp_path, storage).returncode == 0
    (sweep / "0" / "metrics.json").unlink()  # as if killed in its test: no record, no error
    result = search_cli(tmp_path, storage, "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 0 of an earlier command of this search did not finish" in result.stdout
    markdown = (sweep / "summary.md").read_text()
    assert "| 0 | " in markdown and "| incomplete |" in markdown
    (command,) = [line for line in markdown.splitlines() if line.startswith("    python ")]
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"]
    run = [sys.executable, str(ROOT / "train.py"), *words[2:]]
    result = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "lungseg.sweep", str(sweep)], cwd=ROOT, check=True)
    rows = collect_runs(sweep)
    assert sorted((row["job"], row["status"]) for row in rows) == [(0, "ok"), (1, "ok")]
    assert "earlier command" not in (sweep / "summary.md").read_text()


def test_an_optuna_search_in_memory_is_not_continued_into_a_folder_with_trials(tmp_path):
    """A study kept in memory is gone: a rerun into its folder would start another one, whose
    trials land in the folders of the first (the same values again, with the same seed)."""
    from lungseg.sweep import first_trial_number

    sweep = tmp_path / "sweep"
    assert first_trial_number(sweep, None) == 0  # no folder yet
    sweep.mkdir()
    assert first_trial_number(sweep, None) == 0
    fake_run(sweep, 0, "unet", metrics(0.6))
    fake_run(sweep, 3, "unet")  # killed
    (sweep / "7" / ".hydra").mkdir(parents=True)  # a trial folder Hydra had made
    for other in ("²", "12", "backup"):  # not trials: "²" passes str.isdigit, "12" holds no run
        (sweep / other).mkdir()
    assert first_trial_number(sweep, "sqlite:///optuna.db") == 8
    with pytest.raises(LungsegError) as refused:
        first_trial_number(sweep, None)
    message = str(refused.value)
    assert message.startswith(f"{sweep} already holds 3 trials (0, 3, 7) of an earlier search")
    assert "hydra.sweeper.storage=null" in message and "Give a new hydra.sweep.dir" in message
    assert "hydra.sweeper.storage=sqlite:///optuna.db" in message


def test_summary_of_an_optuna_search_lists_searched_values_as_searched(tmp_path):
    """Was "Overrides of every run: `loss=dice ...`" where every trial had drawn loss=dice,
    as if the loss had been fixed."""
    params = {"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "loss": "choice(dice_ce, dice)"}
    params["model.width"] = "choice(8, 16)"  # fixed on the command line: not searched
    search = {"sweeper": {"_target_": "hydra_plugins.x.LungsegOptunaSweeper", "params": params}}
    task = ["hparams_search=optuna", "model.width=8", "model.dropout=interval(0.0,0.5)"]
    OmegaConf.save({"hydra": {**search, "overrides": {"task": task}}}, tmp_path / "multirun.yaml")
    for job in range(2):
        values = {**metrics(0.5 + job / 10), "best_score": 0.5, "monitor": "val/dice"}
        drawn = (f"optimizer.lr={job + 1}e-3", "loss=dice", "model.dropout=0.1", "model.width=8")
        fake_run(tmp_path, job, "unet", values, drawn, search)
    write_summary(tmp_path)
    markdown = (tmp_path / "summary.md").read_text()
    assert (
        "Searched by Optuna: `optimizer.lr`, `loss`, `model.dropout` (each trial's values in "
        "its row)." in markdown
    )
    assert "Overrides of every run: `model=unet model.width=8 data.image_size=32" in markdown
    assert "| 1 | optimizer.lr=2e-3 loss=dice model.dropout=0.1 | ok |" in markdown


def test_summary_written_when_a_job_starts_lists_it_as_unfinished_until_it_ends(tmp_path):
    """Was summary.md as it stood after the last job that ended: a job stopped by SIGTERM or
    Ctrl-C (Hydra then calls no on_job_end) was missing from it, and it read as complete."""
    sweep = tmp_path / "multirun"
    fake_run(sweep, 0, "unet", metrics(0.7))
    running = fake_run(sweep, 1, "fcn")
    callback = SweepSummary()
    callback.on_job_start(hydra_config(sweep, running), task_function=None)
    markdown = (sweep / "summary.md").read_text()
    assert "2 runs (1 failed or unfinished)" in markdown and "| 1 | model=fcn | incomplete |" in (
        markdown
    )
    assert (
        f"Written when job 1_model-fcn started. A sweep stopped before its end (Ctrl-C, "
        f"SIGTERM, killed) leaves the summary as it stood then: `python -m lungseg.sweep "
        f"{sweep}` writes it again from the run folders." in markdown
    )
    assert [row["status"] for row in csv.DictReader((sweep / "summary.csv").open())] == [
        "ok",
        "incomplete",
    ]
    (running / "metrics.json").write_text(json.dumps(metrics(0.8)))
    callback.on_job_end(hydra_config(sweep, running), JobReturn(status=JobStatus.COMPLETED))
    markdown = (sweep / "summary.md").read_text()
    assert "Written when job" not in markdown and "2 runs (0 failed or unfinished)" in markdown


def test_summary_and_crossval_follow_symlinked_run_folders(tmp_path, monkeypatch, capsys):
    """A run folder linked into a sweep folder (as crossval.py's refusal of mixed settings
    suggests) was not found: "no finished run", or left out of summary.md."""
    from lungseg.sweep import summarize_folder

    elsewhere, sweep = tmp_path / "elsewhere", tmp_path / "sweep"
    fake_run(sweep, 0, "unet", metrics(0.6))
    linked = fake_run(elsewhere, 1, "fcn", metrics(0.8))
    (sweep / linked.name).symlink_to(linked, target_is_directory=True)
    (sweep / "again").mkdir()  # a run linked twice, and the sweep's own run: each once
    (sweep / "again" / "one").symlink_to(linked, target_is_directory=True)
    (sweep / "again" / "zero").symlink_to(sweep / "0_model-unet", target_is_directory=True)
    (sweep / "again" / "loop").symlink_to(sweep, target_is_directory=True)
    rows = summarize_folder(sweep)
    assert [(row["job"], row["run"]) for row in rows] == [(1, "1_model-fcn"), (0, "0_model-unet")]

    folds = tmp_path / "folds"
    folds.mkdir()
    for fold in (0, 1):
        run = crossval_run(tmp_path / "runs", f"{fold}_data.fold-{fold}", fold)
        (run / "checkpoints" / "best-epoch003.ckpt").write_bytes(b"")
        (folds / run.name).symlink_to(run, target_is_directory=True)
    out = crossval_report(folds, monkeypatch, capsys, {0: 1, 1: 1})
    assert "| 0 | 0_data.fold-0 | 3 |" in out and "| 1 | 1_data.fold-1 | 3 |" in out


def crossval_report(folds: Path, monkeypatch, capsys, lesions: dict[int, int]) -> str:
    """crossval.py's report on ``folds``, each fold's scoring replaced by fixed summaries of
    one class whose validation split holds ``lesions[fold]`` slices with it."""
    import argparse

    from benchmarks import crossval

    def summary(fold: int) -> dict:
        nonempty = 0.7 if lesions[fold] else None
        lesion = {"dice": {"mean": 0.8}, "dice_nonempty": {"mean": nonempty}}
        return {"classes": {"nodule": {**lesion, "fp_rate_empty": 0.2}}, "tta_flips": []}

    def scored(task, calls, jobs):
        fold_of = {run: int(run.name[0]) for run in folds.iterdir()}
        if task is crossval.score_validation:
            return [[summary(fold_of[run]) for _ in grid] for _, run, grid in calls]
        return [summary(fold_of[run]) for _, run, _ in calls]

    monkeypatch.setattr(crossval, "in_parallel", scored)
    args = argparse.Namespace(
        sweep=folds, thresholds=["argmax"], min_sizes=[0, 4], min_confidences=[0], jobs=1
    )
    args.max_fp_rate = None
    crossval.report(args)
    return capsys.readouterr().out


def test_crossval_warns_of_a_fold_whose_validation_split_holds_no_foreground(
    tmp_path, monkeypatch, capsys
):
    """Was a silent choice: with no lesion among the validation slices, every setting's Dice
    there is that of the empty slices, and the fold chose the setting that predicts least."""
    for fold in (0, 1, 2):
        run = crossval_run(tmp_path, f"{fold}_data.fold-{fold}", fold)
        (run / "checkpoints" / "best-epoch003.ckpt").write_bytes(b"")
    out = crossval_report(tmp_path, monkeypatch, capsys, {0: 3, 1: 0, 2: 1})
    assert (
        "Warning: the validation split of fold 1 (1_data.fold-1) holds no slice with "
        "foreground (nodule): its choice rests on the empty slices alone"
    ) in out
    assert "fold 0" not in out.split("Warning")[1] and "fold 2 " not in out
