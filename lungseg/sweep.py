"""The summary of a multirun (`python train.py -m model=unet,fcn,segnet,deeplab`):
``summary.csv`` and ``summary.md`` in the sweep folder list every run's overrides, best epoch
and test metrics, best test Dice first, and the error of each failed run; ``summary.md`` ends
with the mean ± std of each metric over the finished runs (the cross-validation result of a
sweep over ``data.fold``)."""

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

from lungseg.errors import LungsegError

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


def record_error(run_dir: str | Path, error: BaseException) -> None:
    """Write a failed run's error into ``<run_dir>/error.txt`` and log it.

    The first line, which the summary shows, is the message of the innermost cause (Hydra's
    instantiate wraps errors raised while building an object). A LungsegError says what to
    fix; anything else gets the traceback after its message."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause)
    if not isinstance(cause, LungsegError):
        text = f"{type(cause).__name__}: {text}\n\n{''.join(traceback.format_exception(error))}"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / ERROR_FILE).write_text(text + "\n")
    log.error("run failed, error written to %s: %s", Path(run_dir) / ERROR_FILE, cause)


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run folder of a sweep (a folder with ``.hydra/overrides.yaml``): best test
    Dice first, then runs without one (failed, unfinished), each group in job order.

    status: "ok" (metrics.json), "failed" (error.txt; error = its first line) or "incomplete"
    (neither: still running, or killed)."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for overrides in sweep_dir.glob("**/.hydra/overrides.yaml"):
        run = overrides.parent.parent
        hydra_yaml = overrides.with_name("hydra.yaml")
        row: dict[str, Any] = {
            # None for a run started on its own (hydra.job.num is only set in a multirun).
            "job": OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num", default=None)
            if hydra_yaml.is_file()
            else None,
            "run": run.relative_to(sweep_dir).as_posix(),
            "overrides": " ".join(OmegaConf.load(overrides)),
            "status": "incomplete",
        }
        if (run / ERROR_FILE).is_file():
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
            row.update({key: metrics.get(key) for key in [*METRICS, *per_class] if key in metrics})
            row["minutes"] = metrics.get("train_minutes")
        rows.append(row)
    return sorted(rows, key=_rank)


def _rank(row: dict[str, Any]) -> tuple:
    dice, job = row.get("test/dice"), row["job"]
    return (dice is None, -(dice or 0.0), job is None, job or 0, row["run"])


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` (all overrides, full precision) and ``summary.md`` (the overrides
    that differ between runs, 4 decimals) into ``sweep_dir``; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect_runs(sweep_dir)
    found = {key for row in rows for key, value in row.items() if value is not None}
    # The first three always; the lesion scores where the runs report them.
    columns = ["job", "overrides", "status", "best_epoch", *METRICS[:3]]
    columns += [key for key in METRICS[3:] if key in found]
    for row in rows:
        columns += [
            key
            for key in row
            if key.startswith("test/dice_") and key not in columns and key not in METRICS
        ]
    columns += ["minutes", "error"]
    with open(sweep_dir / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, [*columns, "run"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(_markdown(rows, columns, sweep_dir))
    return rows


def _markdown(rows: list[dict[str, Any]], columns: list[str], sweep_dir: Path) -> str:
    """A table; overrides common to all runs are listed once above it."""
    shared = set.intersection(*[set(row["overrides"].split()) for row in rows]) if rows else set()
    failed = sum(row["status"] != "ok" for row in rows)
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"{len(rows)} runs ({failed} failed or unfinished), best test Dice first.",
    ]
    if shared:
        common = [o for o in rows[0]["overrides"].split() if o in shared]
        lines.append(f"Overrides of every run: `{' '.join(common)}`")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        own = " ".join(o for o in row["overrides"].split() if o not in shared)
        cells = [_cell(own if column == "overrides" else row.get(column)) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    spread = mean_std(rows)
    if spread:
        ok = sum(row["status"] == "ok" for row in rows)
        lines += ["", f"Mean ± std (population) over the {ok} finished runs:", ""]
        lines += [
            f"- {key}: {mean:.4f} ± {std:.4f}" + (f" (over {n} of them)" if n < ok else "")
            for key, (mean, std, n) in spread.items()
        ]
    return "\n".join(lines) + "\n"


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
