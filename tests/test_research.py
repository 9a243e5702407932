"""The research workflow: Optuna search, DistributedDataParallel (2 CPU processes, gloo) and
the SLURM launcher's configuration."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
import pytorch_lightning as pl
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lungseg.module import SegmentationModule
from lungseg.train import accelerator_settings, build_datamodule

# 20 demo images split 12/4/4: val and test divide evenly between 2 processes, so
# DistributedSampler repeats no image and the DDP metrics can equal single-process ones.
# 17 images: 10 train, 4 val, 3 test: the test split does not divide between 2 processes.
DDP_DATA = {"data.demo_num_images": "17", "data.batch_size": "2"}
# Metric states are sums and concatenations gathered across processes: only the order of
# float32 additions differs from a single process.
TOLERANCE = 1e-5
RESEARCH = 'needs the research extra: pip install -e ".[research]"'


def run_cli(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python train.py *args` in its own process group: on a timeout the DDP ranks it started
    are killed with it (a rank left behind would wait for its peers for 30 minutes), after
    each process has printed where it was (faulthandler, on SIGABRT) into the failure."""
    command = [sys.executable, str(ROOT / "train.py"), *args]
    environment = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(
        command,
        cwd=cwd,
        stdout=PIPE,
        stderr=PIPE,
        text=True,
        start_new_session=True,
        env=environment,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGABRT)
            try:
                stdout, stderr = process.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                stdout, stderr = "", "(no stacks: the processes did not end on SIGABRT)"
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"timed out after {timeout} s: {command}\n{stderr[-20000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def with_overrides(base: list[str], changes: dict[str, str]) -> list[str]:
    """``base`` overrides with the values of ``changes`` replaced (or appended)."""
    kept = [o for o in base if o.split("=", 1)[0] not in changes]
    return kept + [f"{k}={v}" for k, v in changes.items()]


def test_optuna_search_writes_best_parameters_and_a_trial_table(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=RESEARCH)
    result = run_cli(
        ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"data.demo_dir={tmp_path}/d"]
        + TINY,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "train").iterdir())
    assert len(sweeps) == 1
    results = OmegaConf.load(sweeps[0] / "optimization_results.yaml")
    # model.width=4 on the command line (TINY) takes it out of the search space.
    assert set(results.best_params) == {"optimizer.lr", "loss", "augmentation"}
    assert 1e-4 <= results.best_params["optimizer.lr"] <= 1e-2
    assert results.best_params["loss"] in {"dice_ce", "ce", "dice"}
    # The objective is what train.py returns: the best val Dice of each trial.
    trials = sorted(p for p in sweeps[0].iterdir() if (p / "metrics.json").is_file())
    assert [p.name for p in trials] == ["0", "1"]
    scores = [json.loads((p / "metrics.json").read_text())["best_score"] for p in trials]
    assert results.best_value == pytest.approx(max(scores))
    with open(sweeps[0] / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["job"] for row in rows) == ["0", "1"]
    assert all(row["status"] == "ok" and "optimizer.lr=" in row["overrides"] for row in rows)


def test_optuna_search_whose_trials_all_fail_ends_with_a_lungseg_error(tmp_path):
    """Was Optuna's traceback "No trials are completed yet" from the sweeper."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=RESEARCH)
    sweep, missing = tmp_path / "sweep", tmp_path / "missing"
    result = run_cli(
        ["hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"]
        + [f"data.image_dir={missing}", f"data.mask_dir={missing}"],  # each fails before fitting
        tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "lungseg: error: All 2 trials of the search failed" in result.stderr
    assert f"error.txt in its folder under {sweep} and in {sweep / 'summary.md'}" in result.stderr
    assert f"(job 0): The image folder {missing} does not exist" in result.stderr
    with open(sweep / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted((row["job"], row["status"]) for row in rows) == [("0", "failed"), ("1", "failed")]
    assert (sweep / "summary.md").is_file() and (sweep / "1" / "error.txt").is_file()
    assert not (sweep / "optimization_results.yaml").exists()


def test_optuna_search_without_a_val_split_stops_each_trial_before_it_trains(tmp_path):
    """Was every trial trained to its end, then Optuna's traceback: a trial without a val
    split has no score to maximise."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=RESEARCH)
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"]
        + ["data.split=[0.8,0.0,0.2]", f"data.demo_dir={tmp_path}/d"],
        tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "(job 0): data.split [0.8, 0.0, 0.2] has no val split, but hparams_search=optuna" in (
        result.stderr
    )
    assert not list(sweep.glob("*/checkpoints"))  # nothing trained


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory) -> Path:
    """The sweep folder of a 2-job multirun, each job trained by 2 DDP processes on the CPU.
    Job 0's learning rate makes the loss NaN on both ranks (a LungsegError); job 1 trains.
    The loss comes from an experiment in a config folder of the user's (--config-dir), which
    rank 1 must be given too."""
    cwd = tmp_path_factory.mktemp("ddp")
    overrides = with_overrides(TINY, DDP_DATA)
    (cwd / "mine" / "experiment").mkdir(parents=True)
    (cwd / "mine" / "experiment" / "ce.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /loss: ce\n"
    )
    result = run_cli(
        ["-m", "--config-dir", str(cwd / "mine"), "trainer=ddp", "experiment=ce"]
        + ["optimizer=sgd", "optimizer.lr=1e12,1e-3"]
        + ["data.foreground_fraction=0.5"]  # each rank a shard of one oversampled stream
        # Job folders 0 and 1: a subdir given on the command line names them.
        + ["hydra.sweep.subdir=${hydra.job.num}", f"data.demo_dir={cwd}/demo", *overrides],
        cwd,
    )
    # Status 1: a job failed, and the sweep went on. Lightning ends every process when one of
    # the ranks it started exits with an error: had job 0's rank 1 done so, job 1 would be killed.
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 2 runs failed (job 0)" in result.stderr
    sweeps = list((cwd / "outputs" / "train").iterdir())
    # Rank 1 of each job ran that job alone, in its folder: no second sweep folder, no run folder.
    assert len(sweeps) == 1 and sweeps[0].name.startswith("multirun_")
    return sweeps[0]


def job_folders(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir())


def test_ddp_multirun_writes_one_folder_per_job_and_rank_zero_writes_the_record(ddp_sweep):
    failed, trained = job_folders(ddp_sweep)
    assert (failed.name, trained.name) == ("0", "1")
    assert (trained / "config.yaml").read_text().count("CrossEntropyLoss") == 1  # experiment=ce
    for name in ("metrics.json", "curves.png", "split.csv", "checkpoints/last.ckpt"):
        assert (trained / name).is_file(), name
    rank0, rank1 = ((trained / f).read_text() for f in ("train.log", "train_ddp_process_1.log"))
    assert "metrics written to" in rank0 and "training curves written" in rank0
    assert "metrics written to" not in rank1 and "curves written" not in rank1
    for rank, log in enumerate((rank0, rank1)):
        assert f"process {rank} of 2 takes one sample in 2 of a stream common" in log
    # Both ranks log the same synchronised validation metrics.
    epoch = [line.split(" - ", 1)[1] for line in rank0.splitlines() if "epoch 0:" in line]
    assert epoch and epoch[0] in rank1
    # ... already reduced: no advice to reduce them again (48 warnings in a 3-class run)
    assert "sync_dist" not in rank0 + rank1
    assert "loss became nan" in (failed / "error.txt").read_text()
    assert "rank 0 records the error" in (failed / "train_ddp_process_1.log").read_text()
    with open(ddp_sweep / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted((row["job"], row["status"]) for row in rows) == [("0", "failed"), ("1", "ok")]


def test_ddp_test_metrics_equal_a_single_process_test_of_the_same_checkpoint(ddp_sweep):
    job = job_folders(ddp_sweep)[1]
    ddp = json.loads((job / "metrics.json").read_text())
    cfg = OmegaConf.load(job / "config.yaml")  # the run's resolved config: same data and split
    datamodule = build_datamodule(cfg)
    module = SegmentationModule.load_from_checkpoint(ddp["best_checkpoint"], map_location="cpu")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    single = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    assert len(datamodule.test_dataset) == 3  # each image once: not padded with a repeat
    for key in (
        "test/loss",
        "test/acc",
        "test/dice",
        "test/iou",
        "test/dice_lung",
        "test/iou_lung",
    ):
        assert ddp[key] == pytest.approx(single[key], abs=TOLERANCE), key


def test_sync_batchnorm_is_turned_off_on_the_cpu():
    settings = accelerator_settings({"accelerator": "cpu", "devices": 2, "sync_batchnorm": True})
    assert settings["sync_batchnorm"] is False


def test_slurm_launcher_composes_with_tasks_and_gpus_matching_the_devices():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=RESEARCH)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "trainer=ddp",
                "trainer.devices=4",
                "trainer.num_nodes=2",
            ],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu"
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4
    assert launcher["nodes"] == 2
    assert launcher["timeout_min"] > 0 and launcher["mem_gb"] > 0
    assert launcher["submitit_folder"].startswith(cfg.hydra.sweep.dir)


@pytest.mark.parametrize("gpus, per_node", [("2", 2), ("[0,3,5]", 3)])
def test_slurm_jobs_get_the_gpus_that_trainer_gpus_asks_for(gpus, per_node):
    """trainer.gpus becomes accelerator/devices only when the run starts; the sbatch script is
    written before that, from the composed config."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=RESEARCH)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", f"trainer.gpus={gpus}"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == per_node


def test_ddp_processes_log_the_same_epoch_training_loss(tmp_path):
    """train/loss_epoch is the mean over every process's images (a metric summed across them),
    not each process's own: a plateau schedule watching it in a fit without validation stepped
    the processes' learning rates apart, and their weights with them."""
    overrides = with_overrides(TINY, {**DDP_DATA, "trainer.max_epochs": "2"})
    result = run_cli(
        ["trainer=ddp", "data.split=[0.8,0.0,0.2]", f"data.demo_dir={tmp_path}/demo"]
        + [f"hydra.run.dir={tmp_path}/run", *overrides],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [(tmp_path / "run" / f).read_text() for f in ("train.log", "train_ddp_process_1.log")]
    epochs = [
        [line.split(" - ", 1)[1] for line in log.splitlines() if "(no validation)" in line]
        for log in logs
    ]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1]


def slurm_launcher(*overrides: str) -> dict:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True
        )
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.parametrize(
    "overrides, tasks",
    [
        (["trainer=ddp", "trainer.devices=[0,1]"], 2),  # was an InterpolationValidationError
        (["trainer=ddp", "trainer.devices='0,1,2'"], 3),
        (["trainer=ddp"], 2),
        (["trainer.gpus=0"], 1),  # the CPU: one process
    ],
)
def test_slurm_tasks_per_node_count_the_devices(overrides, tasks):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=RESEARCH)
    assert slurm_launcher(*overrides)["tasks_per_node"] == tasks


def test_slurm_gpus_per_node_is_null_for_a_run_on_the_cpu():
    """Was 1 GPU for trainer.gpus=0. conf/hydra/launcher/slurm.yaml's gpus_per_node takes
    lungseg_gpus (the override below until it does)."""
    from lungseg import gpus_per_node

    assert gpus_per_node(0, 1) is None and gpus_per_node([], 1) is None
    assert gpus_per_node(None, 2, "cpu") is None and gpus_per_node(None, 2, "auto") == 2
    assert gpus_per_node(None, [0, 3]) == 2 and gpus_per_node(2, 1, "cpu") == 2
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=RESEARCH)
    resolver = (
        "${lungseg_gpus:${trainer.gpus},${trainer.devices},${oc.select:trainer.accelerator,auto}}"
    )
    gpus = f"hydra.launcher.gpus_per_node='{resolver}'"
    for overrides, expected in [
        (["trainer.gpus=0"], None),
        (["trainer=cpu"], None),
        (["trainer=ddp"], 2),
        (["trainer.gpus=[0,3,5]"], 3),
    ]:
        launcher = slurm_launcher(*overrides, gpus)
        assert launcher["gpus_per_node"] == expected, overrides
        assert launcher["tasks_per_node"] == (expected or 1), overrides


@pytest.mark.parametrize(
    "setting", ["trainer.devices=auto", "trainer.devices=-1", "trainer.gpus=-1"]
)
def test_slurm_launcher_refuses_a_device_count_known_only_on_the_node(tmp_path, setting):
    """Was Hydra's traceback of an InterpolationValidationError (auto) or of the ValueError
    (-1) raised while the launcher was built."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=RESEARCH)
    result = run_cli(
        ["hydra/launcher=slurm", "trainer=ddp", setting]
        + ["--cfg", "all", "--resolve", "--package", "hydra.launcher"],
        tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    key, value = setting.split("=")
    assert result.stderr.startswith(
        f"lungseg: error: {setting} cannot size a SLURM job: its tasks and GPUs per node are "
    ), result.stderr
    assert f"Give the number of GPUs per node, e.g. {key}=4" in result.stderr


def test_the_composed_slurm_launcher_prints_resolved(tmp_path):
    """The command the README gives to check the launcher before submitting."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=RESEARCH)
    result = run_cli(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp"]
        + ["trainer.devices=[0,1,2]", "--cfg", "all", "--resolve", "--package", "hydra.launcher"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = OmegaConf.create(result.stdout)
    assert launcher.tasks_per_node == launcher.gpus_per_node == 3
    assert launcher.partition == "gpu" and "${" not in result.stdout


@pytest.mark.parametrize("experiment", [None, "article", "lung_ct", "lidc_nodules"])
def test_every_loss_the_optuna_search_samples_takes_the_recipes_loss_settings(experiment):
    """With experiment=lidc_nodules every trial that sampled loss=ce failed: the recipe's
    loss.per_image and loss.skip_empty are no settings of CrossEntropyLoss."""
    from lungseg.checks import check_keys

    recipe = [] if experiment is None else [f"experiment={experiment}"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        search = compose(
            "config",
            [*recipe, "hparams_search=optuna"],
            return_hydra_config=True,
        )
        choices = str(search.hydra.sweeper.params.loss)
        assert choices.startswith("choice(")
        for loss in choices.removeprefix("choice(").removesuffix(")").split(","):
            check_keys(compose("config", [*recipe, f"loss={loss.strip()}"]))
