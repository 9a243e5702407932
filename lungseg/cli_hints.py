"""A line of advice after Hydra refuses a command line: Hydra prints its own error (a key the
config lacks, an override its grammar cannot read) and exits, before lungseg's checks run.
``hint_on_override_error`` then names what went wrong the way lungseg's own errors do."""

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from difflib import get_close_matches
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from lungseg import errors

CONF = Path(__file__).resolve().parents[1] / "conf"
# OmegaConf.select's answer for a key the config does not have (lungseg.checks' too). Here, not
# in lungseg.checks: this module is imported before a command line is read, and stays free of
# torch and Lightning, so that Hydra's refusals and their hints come in a second or two.
ABSENT = object()
# Hydra's flags that say where the config comes from, each with a value ("-cd conf" or
# "-cd=conf"); then its other flags that take one.
CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
_VALUED = {*CONFIG_FLAGS, "--cfg", "-c", "--package", "-p", "--experimental-rerun"}
# Characters of Hydra's override grammar that a regex or a path may hold.
_GRAMMAR = re.compile(r"[\\()\[\]{}^$|*?,:=\s]")


@contextmanager
def hint_on_override_error(script: str, config_name: str) -> Iterator[None]:
    """Around an entry point's ``main()``: where Hydra refused the command line (exit status 1
    with no lungseg error reported), print ``lungseg: hint: ...`` to stderr when the
    arguments show why (``override_hint``)."""
    try:
        yield
    except SystemExit as stop:
        if stop.code == 1 and not errors.REPORTED:
            try:
                hint = override_hint(script, config_name, sys.argv[1:])
            except Exception:  # advice only: never in the way of Hydra's own error
                hint = None
            if hint:
                print(f"lungseg: hint: {hint}", file=sys.stderr)
        raise


def override_hint(script: str, config_name: str, args: Sequence[str]) -> str | None:
    """Why Hydra would refuse ``args``: an override the shell split at its spaces, a value
    with characters of Hydra's grammar that needs quotes, or a key the config lacks (with the
    nearest settings). None where none of these applies."""
    overrides = _overrides(args)
    # with configs of the user's, the keys they define are not known here
    own_configs = any(a.split("=", 1)[0] in CONFIG_FLAGS for a in args)
    split = _split_by_shell(overrides)
    if split:
        return split
    parser = OverridesParser.create()
    parsed = []
    for override in overrides:
        try:
            parsed.append(parser.parse_override(override))
        except Exception:
            return _quote_hint(override)
    return None if own_configs else _unknown_key(script, config_name, parsed)


def _overrides(args: Sequence[str]) -> list[str]:
    """The overrides among a command line's arguments: those that are not Hydra's flags."""
    kept, args = [], iter(args)
    for arg in args:
        if not arg.startswith("-"):
            kept.append(arg)
        elif arg in _VALUED:  # "-cd conf"; "-cd=conf" is one argument
            next(args, None)
    return kept


def _split_by_shell(overrides: list[str]) -> str | None:
    """A list (or any value) typed with spaces reaches Hydra as several arguments:
    ``data.split=[0.8,`` ``0.1,`` ``0.1]``."""
    starts = [_starts_override(o) for o in overrides]
    for i, start_here in enumerate(starts):
        if start_here:
            continue
        start = i - 1
        while start >= 0 and not starts[start]:
            start -= 1
        if start < 0 or "=" not in overrides[start]:
            return None
        end = i + 1
        while end < len(overrides) and not starts[end]:
            end += 1
        typed = " ".join(overrides[start:end])
        key, value = typed.split("=", 1)
        listed = value.startswith(("[", "{"))  # a path may hold spaces of its own
        return (
            f"the shell split the override '{typed}' at its spaces into {end - start} "
            f"arguments. "
            + (
                f"Write it without spaces ({key}={value.replace(' ', '')}) or quote"
                if listed
                else "Quote"
            )
            + f" it whole: '{typed}'."
        )
    return None


def _starts_override(arg: str) -> bool:
    """Whether ``arg`` begins an override: key=value, or ~key (a deletion has no value)."""
    return "=" in arg or arg.startswith("~")


def _quote_hint(override: str) -> str | None:
    key, _, value = override.partition("=")
    for opening, closing in ("[]", "{}"):
        if value.count(opening) > value.count(closing):
            return (
                f"the {'list' if opening == '[' else 'mapping'} in '{override}' is not closed: "
                f"end it with {closing}."
            )
    if not value or "'" in value or '"' in value or not _GRAMMAR.search(value):
        return None
    # in single quotes the shell changes nothing ($, \, ! stay); Hydra's double quotes keep
    # the value as it is
    return (
        f"Hydra's override grammar cannot read '{override}': characters such as \\ ( ) ^ $ | * "
        f"[ ] , are its own syntax. Quote the value for Hydra, and the whole override for the "
        f"shell: '{key}=\"{value}\"'."
    )


def _unknown_key(script: str, config_name: str, parsed: list) -> str | None:
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    chosen = [
        f"{p.key_or_group}={next(iter(p.sweep_string_iterator()))}"
        if p.is_sweep_override()
        else p.input_line
        for p in parsed
        if p.key_or_group in groups and p.package is None and not p.is_delete()
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=chosen)
    known = _keys(cfg)
    for p in parsed:
        key = p.key_or_group
        if p.is_add() or p.is_force_add() or p.is_delete() or key in groups:
            continue
        if "/" in key or key.split(".")[0] == "hydra":  # Hydra's own: hydra/launcher=slurm
            continue
        if OmegaConf.select(cfg, key, default=ABSENT) is ABSENT:
            near = get_close_matches(key, known, n=2, cutoff=0.75)
            guess = f"; did you mean {' or '.join(near)}?" if near else "."
            return (
                f"{key} is not a setting of {script}{guess} python {script} --cfg job prints "
                f"them all (Hydra's + would add the key, but nothing would read it)."
            )
    return None


def _keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """The settings of ``cfg``: its leaves' dotted keys (a section is no setting to give)."""
    out = []
    for key, value in cfg.items_ex(resolve=False):
        name = f"{prefix}{key}"
        out += _keys(value, f"{name}.") if isinstance(value, DictConfig) else [name]
    return out
