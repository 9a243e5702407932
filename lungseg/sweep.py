"""The summary of a multirun (`python train.py -m model=unet,fcn,segnet,deeplab`):
``summary.csv`` and ``summary.md`` in the sweep folder list every run's overrides, best epoch
and test metrics, best test Dice first (an Optuna search: best objective first), and the error
of each failed run; ``summary.md`` ends with the mean ± std of each metric over the finished
runs that differ only in ``data.fold`` (the cross-validation result of a sweep over
``data.fold``), one per setting of the other overrides.

``python -m lungseg.sweep <sweep folder>`` writes both again from the run folders (a sweep
re-run in place, copied, or whose command was killed)."""

import argparse
import csv
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lungseg import hydra_files
from lungseg.errors import LungsegError, run_cli

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


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run folder of a sweep (a folder with ``.hydra/overrides.yaml``): best test
    Dice first (an Optuna search's trials: best objective first, the value the search
    optimises), then runs without one (failed, unfinished), each group in job order.

    status: "ok" (metrics.json), "failed" (error.txt, not older than any metrics.json; error =
    its first line) or "incomplete" (neither: still running, or killed)."""
    sweep_dir = Path(sweep_dir)
    rows = []
    direction = None  # of an Optuna search
    for overrides in sweep_dir.glob("**/.hydra/overrides.yaml"):
        run = overrides.parent.parent
        hydra_yaml = overrides.with_name("hydra.yaml")
        # Not resolved: Hydra leaves interpolations (${now:...}) in it.
        saved = OmegaConf.load(hydra_yaml) if hydra_yaml.is_file() else {}
        hydra_cfg = _dict(OmegaConf.to_container(saved, resolve=False) if saved else {}, "hydra")
        sweeper = _dict(hydra_cfg, "sweeper")
        if "optuna" in str(sweeper.get("_target_", "")).lower():
            direction = sweeper.get("direction", "maximize")
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
    for row in rows:
        row["direction"] = direction
    return sorted(rows, key=lambda row: _rank(row, "objective", direction == "minimize"))


def _dict(tree: Any, key: str) -> dict:
    value = tree.get(key) if isinstance(tree, dict) else None
    return value if isinstance(value, dict) else {}


def _rank(row: dict[str, Any], by: str = "test/dice", lowest_first: bool = False) -> tuple:
    value, job = row.get(by), row["job"]
    value = None if value is not None and value != value else value  # NaN: as if none
    order = (value or 0.0) if lowest_first else -(value or 0.0)
    return (value is None, order, job is None, job or 0, row["run"])


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` (all overrides, full precision) and ``summary.md`` (the overrides
    that differ between runs, 4 decimals) into ``sweep_dir``; returns the rows."""
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
    with open(sweep_dir / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, [*columns, "run"], extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(_markdown(rows, columns, sweep_dir))
    return rows


def _markdown(rows: list[dict[str, Any]], columns: list[str], sweep_dir: Path) -> str:
    """A table; overrides common to all runs are listed once above it."""
    shared = set.intersection(*[set(row["override_list"]) for row in rows]) if rows else set()
    failed = sum(row["status"] != "ok" for row in rows)
    search = next((row for row in rows if "direction" in row), None)
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
    if shared:
        common = [o for o in rows[0]["override_list"] if o in shared]
        lines.append(f"Overrides of every run: `{' '.join(common)}`")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        own = " ".join(o for o in row["override_list"] if o not in shared)
        cells = [_cell(own if column == "overrides" else row.get(column)) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _spread_lines(rows, shared)) + "\n"


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
    sweep_dir = _sweep_dir(config)
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


def _sweep_dir(config: DictConfig) -> Path:
    """Absolute: with hydra.job.chdir=true a job's callbacks run inside its run folder."""
    return Path(config.hydra.runtime.cwd, config.hydra.sweep.dir)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml) that keeps the sweep folder's
    summary up to date in multirun mode.

    It rewrites the summary after every job, because when a job raises an exception other
    than LungsegError, Hydra's BasicSweeper runs the remaining jobs, then re-raises that
    exception and skips ``on_multirun_end`` (the command still exits with status 1). Such a
    job's error is recorded here; train.py records a LungsegError itself and returns, so
    ``on_multirun_end`` runs, writes the summary and exits with status 1 if any run failed.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # noqa: B018 - a failed job's value re-raises its error
            except Exception as error:
                record_error(config.hydra.runtime.output_dir, error)
        write_summary(_sweep_dir(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = write_summary(_sweep_dir(config))
        log.info("sweep summary written to %s", _sweep_dir(config) / "summary.md")
        failed = [str(row["job"]) for row in rows if row["status"] != "ok"]
        if failed:
            # Hydra gives callbacks no other way to set the exit status of the command.
            sys.exit(
                f"lungseg: error: {len(failed)} of {len(rows)} runs failed (job "
                f"{', '.join(failed)}); their errors are in {_sweep_dir(config) / 'summary.md'} "
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
    sweeps = sorted({str(row["sweep_dir"]) for row in rows})
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
