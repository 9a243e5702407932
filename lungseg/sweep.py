"""The summary of a multirun (`python train.py -m model=unet,fcn,segnet,deeplab`):
``summary.csv`` and ``summary.md`` in the sweep folder list every run's overrides, best epoch
and test metrics, best test Dice first (an Optuna search: best objective first), and the error
of each failed run; ``summary.md`` ends with the mean ± std of each metric over the finished
runs that differ only in ``data.fold`` (the cross-validation result of a sweep over
``data.fold``), one per setting of the other overrides.

Both are written when each job starts (the job listed as incomplete, and summary.md saying
so) and after it ends. ``python -m lungseg.sweep <sweep folder>`` writes both again from the
run folders (a sweep re-run in place, copied, or whose command was killed); run folders linked
into the sweep folder count as its runs."""

import argparse
import csv
import io
import json
import logging
import os
import re
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from lungseg import hydra_files
from lungseg.errors import LungsegError, counted, run_cli
from lungseg.files import replace_whole

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"
# Then test/dice_<class> for every class. test_post/*: eval.py's per-image scores of the test
# split with the recipe's post-processing and flips (train.py, where the recipe has them).
METRICS = (
    "test/dice",
    "test/iou",
    "test/acc",
    "test/dice_nonempty",
    "test/fp_empty",
    "test_post/dice",
    "test_post/dice_nonempty",
    "test_post/fp_empty",
)


FOLD_KEY = "data.fold"
# Settings that change which files a run is validated and tested on (and ``seed`` while
# data.seed follows it): an Optuna search over one would pick the easiest split.
SPLIT_KEYS = (
    FOLD_KEY,
    "data.seed",
    "data.split",
    "data.num_folds",
    "data.split_file",
    "data.group_pattern",
)
# Overrides that leave a run's setting as it was: a run continued with resume=true.
NOT_A_SETTING = ("resume",)


def record_error(
    run_dir: str | Path, error: BaseException, overrides: list[str] | None = None
) -> None:
    """Write a failed run's error into ``<run_dir>/error.txt`` and log it.

    The first line, which the summary shows, is the message of the innermost cause (Hydra's
    instantiate wraps errors raised while building an object). A LungsegError says what to
    fix; anything else gets the traceback after its message. A folder that holds a finished
    run (metrics.json; e.g. a sweep run again into its folder, which refuses to write over it)
    keeps its record: the error is only logged, as a warning naming the settings that differ
    where the job's ``overrides`` are not the run's (its folder name gives only the swept
    ones)."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").is_file():
        changed = _changed_settings(run_dir, overrides) if overrides is not None else []
        if changed:
            log.warning(
                "%s holds a finished run of other settings than this job's (%s), which is kept "
                "as it was: this job's settings were not trained. Give the sweep another "
                "hydra.sweep.dir to train them, or add resume=true to continue its runs with "
                "them where a run may continue so (more epochs, optimiser and schedule "
                "settings; README, 'Resume').",
                run_dir,
                "; ".join(changed[:5]) + (f"; ... ({len(changed)} in all)" * (len(changed) > 5)),
            )
            return
        log.info("%s holds a finished run, which is kept as it was; this job: %s", run_dir, cause)
        return
    text = str(cause)
    if not isinstance(cause, LungsegError):
        text = f"{type(cause).__name__}: {text}\n\n{''.join(traceback.format_exception(error))}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(text + "\n")
    log.error("run failed, error written to %s: %s", run_dir / ERROR_FILE, cause)


def _changed_settings(run_dir: Path, overrides: list[str]) -> list[str]:
    """``key: run's -> job's`` for each override (but resume) where the job's ``overrides``
    differ from the run's own, its ``.hydra/overrides.yaml`` before this command (remembered
    by lungseg.hydra_files; none where it was not, as under SLURM)."""
    saved = hydra_files.remembered(run_dir, "overrides.yaml")
    try:
        earlier = [str(o) for o in OmegaConf.create(saved.decode())] if saved else []
    except Exception:  # not a list of overrides: nothing to compare
        earlier = []
    if not earlier:
        return []

    def values(given: list[str]) -> dict[str, str]:
        return {
            override_key(o): o.partition("=")[2]
            for o in given
            if override_key(o) not in NOT_A_SETTING
        }

    run, job = values(earlier), values(overrides)
    return [
        f"{key}: {run.get(key, '(not given)')} -> {job.get(key, '(not given)')}"
        for key in dict.fromkeys([*run, *job])
        if run.get(key) != job.get(key)
    ]


def _finished(run: Path) -> bool:
    """metrics.json, and no error.txt written after it (a run that failed, then finished when
    the sweep was run again, keeps its old error.txt)."""
    metrics, error = run / "metrics.json", run / ERROR_FILE
    return metrics.is_file() and (
        not error.is_file() or metrics.stat().st_mtime >= error.stat().st_mtime
    )


def run_overrides(run: Path) -> list[str]:
    """A run folder's Hydra overrides (``.hydra/overrides.yaml``; none where it has none)."""
    path = Path(run) / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def override_key(override: str) -> str:
    """The key of a Hydra override: ``+data.fold=1`` -> ``data.fold``."""
    return override.split("=", 1)[0].lstrip("~+")


def setting(overrides: list[str]) -> tuple[str, ...]:
    """A run's overrides but data.fold (and resume): runs with the same setting are the folds
    of one cross-validation."""
    return tuple(o for o in overrides if override_key(o) not in (FOLD_KEY, *NOT_A_SETTING))


def fold_of(overrides: list[str]) -> int | str | None:
    """data.fold among the overrides (a number where it is one), else None."""
    for override in overrides:
        if override_key(override) == FOLD_KEY and "=" in override:
            value = override.split("=", 1)[1]
            return int(value) if value.lstrip("-").isdigit() else value
    return None


def fold_order(fold: int | str | None) -> tuple:
    """Sort key: numbered folds by number (2 before 10), then any others by name."""
    return (0, fold, "") if isinstance(fold, int) else (1, 0, str(fold))


def run_folders(root: str | Path, marker: str) -> list[Path]:
    """The folders under ``root`` (itself included) that hold the file ``marker``
    (``metrics.json``, ``.hydra/overrides.yaml``), sorted, following linked folders: a run
    folder linked into a sweep folder is one of its runs. A folder reached twice (a link to a
    run that also lies in the tree, a link back up) is taken once: under its own path where it
    lies in the tree, else under the first link to it (in sorted order)."""
    root, base = Path(root), os.path.realpath(root)
    found: dict[str, Path] = {}
    for folder, subfolders, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in found:  # a loop, or a tree already walked through another path
            subfolders.clear()
            continue
        subfolders.sort()
        found[real] = Path(folder)
    runs = [
        root / os.path.relpath(real, base) if real.startswith(base + os.sep) else path
        for real, path in found.items()
        if (path / marker).is_file()
    ]
    return sorted(runs)


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run folder of a sweep (a folder with ``.hydra/overrides.yaml``): best test
    Dice first (an Optuna search's trials: best objective first, the value the search
    optimises), then runs without one (failed, unfinished), each group in job order.

    status: "ok" (metrics.json), "failed" (error.txt, not older than any metrics.json; error =
    its first line) or "incomplete" (neither: still running, or killed). An Optuna search's
    trials also get ``earlier``: True for those started by an earlier command of the search
    (one continued from its storage), which the latest command did not run."""
    sweep_dir = Path(sweep_dir)
    rows = []
    direction, searched = None, []  # of an Optuna search: what it optimises, what it samples
    for run in run_folders(sweep_dir, ".hydra/overrides.yaml"):
        hydra_yaml = run / ".hydra" / "hydra.yaml"
        # Not resolved: Hydra leaves interpolations (${now:...}) in it.
        saved = OmegaConf.load(hydra_yaml) if hydra_yaml.is_file() else {}
        hydra_cfg = _dict(OmegaConf.to_container(saved, resolve=False) if saved else {}, "hydra")
        sweeper = _dict(hydra_cfg, "sweeper")
        if "optuna" in str(sweeper.get("_target_", "")).lower() and direction is None:
            direction = sweeper.get("direction", "maximize")
            searched = _searched_in(sweep_dir, sweeper)
        override_list = run_overrides(run)
        row: dict[str, Any] = {
            # None for a run started on its own (hydra.job.num is only set in a multirun).
            "job": _dict(hydra_cfg, "job").get("num"),
            "run": run.relative_to(sweep_dir).as_posix(),
            "overrides": " ".join(override_list),
            "override_list": override_list,
            "sweep_dir": _dict(hydra_cfg, "sweep").get("dir"),
            "status": "incomplete",
        }
        if (run / ERROR_FILE).is_file() and not _finished(run):
            lines = (run / ERROR_FILE).read_text().strip().splitlines()
            row.update(status="failed", error=lines[0] if lines else "")
        elif (run / "metrics.json").is_file():
            metrics = json.loads((run / "metrics.json").read_text())
            per_class = [
                key
                for key in metrics
                if key.startswith("test/dice_") and not key.startswith("test/dice_nonempty")
            ]
            row.update(status="ok", best_epoch=metrics.get("best_epoch"))
            row.update(objective=metrics.get("best_score"), monitor=metrics.get("monitor"))
            row.update({key: metrics.get(key) for key in [*METRICS, *per_class] if key in metrics})
            row["minutes"] = metrics.get("train_minutes")
        rows.append(row)
    if direction is None:
        for row in rows:
            row.pop("objective", None)
        return sorted(rows, key=_rank)
    if not isinstance(direction, str):  # a multi-objective search: the first objective
        direction = next(iter(direction), "maximize")
    # lungseg's sweeper saves multirun.yaml when each command of the search starts, and a
    # continued search never enters an earlier trial's folder: one Hydra made before it ran
    # in an earlier command, and stays as that command left it.
    latest = sweep_dir / "multirun.yaml"
    started = latest.stat().st_mtime if latest.is_file() else None
    for row in rows:
        row.update(direction=direction, searched=searched)
        made = (sweep_dir / row["run"] / ".hydra" / "overrides.yaml").stat().st_mtime
        row["earlier"] = started is not None and made < started
        if row["earlier"] and row["status"] == "incomplete":
            row["error"] = "stopped in an earlier command of the search (see below the table)"
    return sorted(rows, key=lambda row: _rank(row, "objective", direction == "minimize"))


def searched_keys(params: Any, overrides: list[str]) -> list[str]:
    """The keys an Optuna search samples, in its order: those of ``params``
    (hydra.sweeper.params) and of the command line's ``overrides`` that are given as a sweep
    (``choice()``, ``interval()``, ``a,b``), less any also given one value, which the sweeper
    takes out of the search."""
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(overrides)
    parsed = OverridesParser.create().parse_overrides(lines)
    fixed = {o.key_or_group for o in parsed if not o.is_sweep_override()}
    swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return [key for key in dict.fromkeys(swept) if key not in fixed]


def _searched_in(sweep_dir: Path, sweeper: dict) -> list[str]:
    """The keys the Optuna search of ``sweep_dir`` sampled: from the multirun.yaml that
    lungseg's sweeper saves there (its params and command line); without it (a search of
    earlier code), those of the best trial in optimization_results.yaml, else the sweeper's
    params (some may have been fixed on the command line)."""
    params, task = sweeper.get("params"), []
    multirun, results = sweep_dir / "multirun.yaml", sweep_dir / "optimization_results.yaml"
    try:
        if multirun.is_file():
            saved = OmegaConf.to_container(OmegaConf.load(multirun), resolve=False)
            params = _dict(_dict(saved, "hydra"), "sweeper").get("params")
            task = _dict(_dict(saved, "hydra"), "overrides").get("task") or []
        elif results.is_file():
            return list(_dict(OmegaConf.to_container(OmegaConf.load(results)), "best_params"))
        return searched_keys(params if isinstance(params, dict) else {}, task)
    except (OSError, YAMLError, OmegaConfBaseException, HydraException):
        return []  # not as Hydra writes it: the trials' overrides are listed as they are


def check_split_not_searched(params: Any, overrides: list[str], data_seed: Any = None) -> None:
    """LungsegError where an Optuna search would sample a setting that changes which files its
    trials are validated and tested on (SPLIT_KEYS; ``seed`` too while ``data_seed``, the
    unresolved data.seed, follows it): its trials would be scored on different images, and
    the best would be the easiest split's. ``params``: hydra.sweeper.params."""
    searched = searched_keys(params, overrides)
    split_keys = [*SPLIT_KEYS, "seed"] if "${seed}" in str(data_seed) else SPLIT_KEYS
    key = next((key for key in searched if key in split_keys), None)
    if key is None:
        return
    given = next((o for o in overrides if override_key(o) == key), None)
    if given is None:
        given = f"hydra.sweeper.params.{key}={params[key]}"
    if key == FOLD_KEY:
        fix = (
            f"Search on one fold ({FOLD_KEY}=0), then train the values it chose on every fold "
            f"with a plain multirun, without hparams_search: `python train.py -m <the chosen "
            f"values> {FOLD_KEY}=0,1,2,3,4` (one value for each fold of data.num_folds); its "
            f"summary.md gives the mean ± std over the folds, and benchmarks/crossval.py "
            f"chooses the post-processing on their validation splits."
        )
    elif key == "seed":
        fix = (
            "The split follows seed (data.seed: ${seed}, conf/data/folders.yaml). To search "
            "the training seed alone (first weights, shuffle order, augmentation), fix the "
            "split's: add data.seed=42."
        )
    else:
        fix = (
            f"Give {key} one value for the whole search (or leave it out), so that every "
            f"trial is scored on the same images; to compare splits, train the values it "
            f"chose with a plain multirun, without hparams_search: `python train.py -m <the "
            f"chosen values> {key}=<a,b>`."
        )
    raise LungsegError(
        f"{given} would make the Optuna search (hparams_search=optuna) sample {key} like a "
        f"hyper-parameter, but it changes which files the trials are validated and tested "
        f"on: they would be scored on different images, and the study's best value would be "
        f"that of the easiest split, not of the best hyper-parameters. {fix}"
    )


def first_trial_number(sweep_dir: str | Path, storage: str | None) -> int:
    """The number of the first trial of an Optuna search into ``sweep_dir`` (its folder's
    name): after the jobs already there, which the search's study continues from its
    ``storage``. LungsegError where there are some and the study was kept in memory
    (storage None): it is gone, and a new one would know nothing of them."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return 0
    jobs = {row["job"] for row in collect_runs(sweep_dir) if "/" not in row["run"]}
    jobs |= {  # trial folders that hold no run record yet (killed before it was written)
        int(p.name)
        for p in sweep_dir.iterdir()
        if re.fullmatch("[0-9]+", p.name) and (p / ".hydra").is_dir()
    }
    jobs = sorted(job for job in jobs if isinstance(job, int))
    if not jobs:
        return 0
    listed = ", ".join(map(str, jobs[:5])) + (", ..." if len(jobs) > 5 else "")
    if storage is None:
        raise LungsegError(
            f"{sweep_dir} already holds {counted(len(jobs), 'trial')} ({listed}) of an earlier "
            f"search, whose Optuna study was kept in memory (hydra.sweeper.storage=null) and "
            f"ended with it. This command would start another study that knows none of their "
            f"results (with the same hydra.sweeper.sampler.seed it draws the same values "
            f"again), in the same sweep folder. Give a new hydra.sweep.dir (or leave it out) "
            f"for a new search; to continue a search later, keep its study in a database from "
            f"its first command, e.g. hydra.sweeper.storage=sqlite:///optuna.db."
        )
    log.info(
        "%s holds %s (%s): this command continues the search of the study in %s, its trials "
        "in folders from %d on",
        sweep_dir,
        counted(len(jobs), "trial"),
        listed,
        storage,
        jobs[-1] + 1,
    )
    return jobs[-1] + 1


def _dict(tree: Any, key: str) -> dict:
    value = tree.get(key) if isinstance(tree, dict) else None
    return value if isinstance(value, dict) else {}


def _rank(row: dict[str, Any], by: str = "test/dice", lowest_first: bool = False) -> tuple:
    value, job = row.get(by), row["job"]
    value = None if value is not None and value != value else value  # NaN: as if none
    order = (value or 0.0) if lowest_first else -(value or 0.0)
    return (value is None, order, job is None, job or 0, row["run"])


def write_summary(sweep_dir: str | Path, running: Path | None = None) -> list[dict[str, Any]]:
    """Write ``summary.csv`` (all overrides, full precision) and ``summary.md`` (the overrides
    that differ between runs, 4 decimals) into ``sweep_dir``; returns the rows. ``running``:
    the folder of the job that is starting, named in summary.md with the command that writes
    it again (a job stopped by Ctrl-C or SIGTERM ends the sweep without another summary)."""
    sweep_dir = Path(sweep_dir)
    rows = collect_runs(sweep_dir)
    found = {key for row in rows for key, value in row.items() if value is not None}
    # The first three always; the lesion scores where the runs report them.
    columns = ["job", "overrides", "status", "best_epoch", *METRICS[:3]]
    if any("direction" in row for row in rows):  # an Optuna search: what it optimises
        columns.insert(3, "objective")
    columns += [key for key in METRICS[3:] if key in found]
    for row in rows:
        columns += [
            key
            for key in row
            if key.startswith("test/dice_") and key not in columns and key not in METRICS
        ]
    columns += ["minutes", "error"]
    table = io.StringIO()
    writer = csv.DictWriter(table, [*columns, "run"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    replace_whole(sweep_dir / "summary.csv", table.getvalue())
    markdown = _markdown(rows, columns, sweep_dir)
    if running is not None:
        markdown += (
            f"\nWritten when job {running.name} started. A sweep stopped before its end "
            f"(Ctrl-C, SIGTERM, killed) leaves the summary as it stood then: `python -m "
            f"lungseg.sweep {sweep_dir}` writes it again from the run folders.\n"
        )
    replace_whole(sweep_dir / "summary.md", markdown)
    return rows


def _markdown(rows: list[dict[str, Any]], columns: list[str], sweep_dir: Path) -> str:
    """A table; overrides common to all runs are listed once above it."""
    search = next((row for row in rows if "direction" in row), None)
    # An Optuna search's sampled values are each trial's own, also where all drew the same.
    searched = search["searched"] if search else []
    shared = set.intersection(*[set(row["override_list"]) for row in rows]) if rows else set()
    shared = {o for o in shared if override_key(o) not in searched}
    failed = sum(row["status"] != "ok" for row in rows)
    if search is None:
        order = "best test Dice first"
    else:
        monitor = next((row["monitor"] for row in rows if row.get("monitor")), None)
        order = (
            f"best objective first. Optuna search: the objective, which it "
            f"{search['direction']}s, is each trial's best {monitor or 'validation score'} "
            f"(its checkpoint monitor); the test scores are for reporting"
        )
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"{len(rows)} runs ({failed} failed or unfinished), {order}.",
    ]
    if searched:
        keys = ", ".join(f"`{key}`" for key in searched)
        lines.append(f"Searched by Optuna: {keys} (each trial's values in its row).")
    if shared:
        common = [o for o in rows[0]["override_list"] if o in shared]
        lines.append(f"Overrides of every run: `{' '.join(common)}`")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        own = " ".join(o for o in row["override_list"] if o not in shared)
        cells = [_cell(own if column == "overrides" else row.get(column)) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _earlier_lines(rows, sweep_dir) + _spread_lines(rows, shared)) + "\n"


def _earlier_lines(rows: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    """What an Optuna search's trials that an earlier command left failed or stopped mean for
    the latest command, and how to finish a stopped one: a continued search trains new trials
    in new folders, so it never reaches them (resume=true included)."""
    earlier = [row for row in rows if row.get("earlier") and row["status"] != "ok"]
    if not earlier:
        return []
    jobs = ", ".join(f"{row['job']} ({row['status']})" for row in earlier)
    lines = [
        "",
        f"Trial {jobs} of an earlier command of this search did not finish. A continued search "
        f"trains new trials in new folders (also with resume=true) and does not run them "
        f"again; its exit status counts only the trials it ran.",
    ]
    stopped = [row for row in earlier if row["status"] == "incomplete"]
    if stopped:
        lines[-1] += (
            " To finish a stopped trial with its values, continue it on its own in its "
            "folder (its scores then count here, though not in the Optuna study), or delete "
            f"its folder; then `python -m lungseg.sweep {sweep_dir}` writes this summary again:"
        )
        lines += ["", *(f"    {_continue_command(row, sweep_dir)}" for row in stopped)]
    return lines


def _continue_command(row: dict[str, Any], sweep_dir: Path) -> str:
    """The command that continues a trial's run in its folder as one run (hydra.mode=RUN),
    keeping the trial's number and sweep in its .hydra/hydra.yaml for the summary."""
    words = [o for o in row["override_list"] if override_key(o) not in NOT_A_SETTING]
    words += ["hydra.mode=RUN", f"hydra.run.dir={os.path.abspath(sweep_dir / row['run'])}"]
    if row["sweep_dir"] is not None:
        words.append(f"hydra.sweep.dir={row['sweep_dir']}")
    words += [f"hydra.job.num={row['job']}", "resume=true"]
    return shlex.join(["python", "train.py", *words])


def setting_groups(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """The finished runs by their setting (overrides but data.fold), in the rows' order."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(setting(row["override_list"]), []).append(row)
    return groups


def _spread_lines(rows: list[dict[str, Any]], shared: set[str]) -> list[str]:
    """Mean ± std over the finished runs; where runs differ in more than data.fold, one per
    setting of the other overrides, over the folds of that setting only."""
    groups = setting_groups(rows)
    lines: list[str] = []
    if len(groups) == 1:
        ((key, members),) = groups.items()
        if len(members) == 1:  # as for one setting among several, below
            return ["", "One finished run: no mean ± std."]
        repeated = _repeated_folds(members)
        if repeated:
            return ["", _repeated_line(len(members), "finished runs", repeated)]
        spread = mean_std(members)
        if spread:
            lines += ["", f"Mean ± std (population) over the {len(members)} finished runs:", ""]
            lines += _spread_items(spread, len(members))
        return lines
    kept = {key: members for key, members in groups.items() if len(members) > 1}
    for key, members in kept.items():
        label = " ".join(o for o in key if o not in shared) or "no other override"
        repeated = _repeated_folds(members)
        if repeated:
            lines += ["", _repeated_line(len(members), f"finished runs of `{label}`", repeated)]
            continue
        folds = sorted((fold_of(row["override_list"]) for row in members), key=fold_order)
        lines += [
            "",
            f"Mean ± std (population) over the {len(members)} finished runs of `{label}` "
            f"(data.fold {', '.join(map(str, folds))}):",
            "",
        ]
        lines += _spread_items(mean_std(members), len(members))
    if len(kept) < len(groups):
        lines += [
            "",
            f"{len(groups) - len(kept)} of the {len(groups)} settings (overrides other than "
            f"data.fold) have one finished run: no mean ± std for "
            f"{'it' if len(groups) - len(kept) == 1 else 'them'}; runs of different settings "
            f"are not pooled.",
        ]
    return lines


def _repeated_folds(members: list[dict[str, Any]]) -> list[str]:
    """The data.fold values (or "no fold") that more than one of a setting's runs trained: a
    sweep run again into its folder with its values in another order, or some folds again,
    trains them into new job folders beside the first ones."""
    folds = [fold_of(row["override_list"]) for row in members]
    return [
        "no fold" if fold is None else str(fold)
        for fold in sorted(set(folds), key=fold_order)
        if folds.count(fold) > 1
    ]


def _repeated_line(count: int, runs: str, repeated: list[str]) -> str:
    return (
        f"No mean ± std over the {count} {runs}: they repeat data.fold "
        f"{', '.join(repeated)} (the same setting trained twice, e.g. a sweep run again into "
        f"its folder with its values in another order), and a mean would count it twice. "
        f"Remove the extra job folders and run `python -m lungseg.sweep <sweep folder>`."
    )


def _spread_items(spread: dict[str, tuple[float, float, int]], ok: int) -> list[str]:
    return [
        f"- {key}: {mean:.4f} ± {std:.4f}" + (f" (over {n} of them)" if n < ok else "")
        for key, (mean, std, n) in spread.items()
    ]


def mean_std(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, int]]:
    """{metric: (mean, std, runs)} over the finished runs that report the metric (a number,
    not NaN), for every test metric (test_post/ included) and minutes."""
    out = {}
    ok = [row for row in rows if row["status"] == "ok"]
    keys = [k for row in ok for k in row if k.startswith(("test/", "test_post/")) or k == "minutes"]
    for key in dict.fromkeys(keys):
        values = [row[key] for row in ok if isinstance(row.get(key), int | float)]
        values = [v for v in values if v == v]  # NaN: no image qualified in that run
        if values:
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
            out[key] = (mean, std, len(values))
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def check_some_run_finished(config: DictConfig) -> None:
    """LungsegError when the sweep has runs and none of them finished (each failed or was cut
    short), after bringing summary.md up to date. A search (hparams_search=optuna) that ends
    so has no best trial: Optuna's own error says only "No trials are completed yet"."""
    sweep_dir = sweep_folder(config)
    rows = collect_runs(sweep_dir)  # none: the folder may not exist yet
    if not rows or any(row["status"] == "ok" for row in rows):
        return
    write_summary(sweep_dir)
    first = next((row for row in rows if row.get("error")), None)  # rows in job order
    raise LungsegError(
        f"All {len(rows)} trials of the search failed, so it has no best parameters. Each "
        f"trial's error is in error.txt in its folder under {sweep_dir} and in "
        f"{sweep_dir / 'summary.md'}"
        + (f"; the first (job {first['job']}): {first['error']}" if first else ".")
    )


def sweep_folder(config: DictConfig) -> Path:
    """Absolute: with hydra.job.chdir=true a job's callbacks run inside its run folder."""
    return Path(config.hydra.runtime.cwd, config.hydra.sweep.dir)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml) that keeps the sweep folder's
    summary up to date in multirun mode.

    It writes the summary when each job starts, listing the job as incomplete (a job stopped
    by Ctrl-C or SIGTERM ends the sweep without ``on_job_end``), and after every job, because
    when a job raises an exception other than LungsegError, Hydra's BasicSweeper runs the
    remaining jobs, then re-raises that exception and skips ``on_multirun_end`` (the command
    still exits with status 1). Such a job's error is recorded here; train.py records a
    LungsegError itself and returns, so ``on_multirun_end`` runs, writes the summary and exits
    with status 1 if any run failed.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """The summary with this job listed as incomplete, and a line saying how it stood:
        Hydra calls no ``on_job_end`` for a job stopped by Ctrl-C or SIGTERM."""
        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(sweep_folder(config), Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # noqa: B018 - a failed job's value re-raises its error
            except Exception as error:
                record_error(config.hydra.runtime.output_dir, error)
        write_summary(sweep_folder(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Exit status 1 where a run of this command failed or did not finish: every job of a
        plain sweep (a sweep run again into its folder runs its jobs there again), and the
        trials that an Optuna search ran in this command (a continued one runs none of the
        earlier ones again, which summary.md lists with what to do about them)."""
        rows = write_summary(sweep_folder(config))
        log.info("sweep summary written to %s", sweep_folder(config) / "summary.md")
        earlier = [str(row["job"]) for row in rows if row.get("earlier") and row["status"] != "ok"]
        if earlier:
            log.warning(
                "trial %s of an earlier command of this search did not finish; it does not "
                "count in this command's exit status, and %s says how to finish it",
                ", ".join(earlier),
                sweep_folder(config) / "summary.md",
            )
        rows = [row for row in rows if not row.get("earlier")]
        failed = [str(row["job"]) for row in rows if row["status"] != "ok"]
        if failed:
            # Hydra gives callbacks no other way to set the exit status of the command.
            sys.exit(
                f"lungseg: error: {len(failed)} of {len(rows)} runs failed (job "
                f"{', '.join(failed)}); their errors are in {sweep_folder(config) / 'summary.md'} "
                f"and in error.txt in their run folders."
            )


def summarize_folder(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """``write_summary`` for a sweep folder given by hand; LungsegError for a folder that is
    not one (missing, a run folder, no multirun job in it, the jobs of several sweeps)."""
    sweep_dir = Path(sweep_dir)
    usage = (
        "give the folder of a multirun (its hydra.sweep.dir, e.g. outputs/train/multirun_<date>), "
        "which holds one folder per job"
    )
    if not sweep_dir.is_dir():
        raise LungsegError(f"{sweep_dir} is not a folder: {usage}.")
    if (sweep_dir / ".hydra").is_dir():
        raise LungsegError(
            f"{sweep_dir} is the folder of one run (it holds .hydra/), not of a sweep: {usage}."
        )
    rows = [row for row in collect_runs(sweep_dir) if row["job"] is not None]
    if not rows:
        raise LungsegError(
            f"{sweep_dir} holds no job of a multirun (a folder with .hydra/hydra.yaml whose "
            f"hydra.job.num is set): {usage}."
        )
    if all("/" in row["run"] for row in rows):  # a folder above the sweep folder(s)
        below = sorted({str(sweep_dir / Path(row["run"]).parent) for row in rows})
        raise LungsegError(
            f"{sweep_dir} holds no job folder itself, only in {', '.join(below[:3])}"
            f"{' ...' if len(below) > 3 else ''}: {usage}."
        )
    # Runs linked in from elsewhere were put there on purpose: only the folder's own count.
    inside = sweep_dir.resolve()
    own = [row for row in rows if inside in (sweep_dir / row["run"]).resolve().parents]
    sweeps = sorted({str(row["sweep_dir"]) for row in own})
    if len(sweeps) > 1:
        raise LungsegError(
            f"{sweep_dir} holds the jobs of {len(sweeps)} sweeps (hydra.sweep.dir "
            f"{', '.join(sweeps)}): {usage}, one at a time."
        )
    return write_summary(sweep_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lungseg.sweep",
        description="Write summary.csv and summary.md of a sweep folder again from its runs.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    rows = run_cli(lambda: summarize_folder(args.sweep_dir))
    failed = sum(row["status"] != "ok" for row in rows)
    print(f"{args.sweep_dir / 'summary.md'}: {len(rows)} runs, {failed} failed or unfinished")


if __name__ == "__main__":
    main()
