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
# Hydra's flags; those that take the next argument as their value.
_VALUED = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c"}
_VALUED |= {"--package", "-p", "--experimental-rerun"}
# Characters of Hydra's override grammar that a regex or a path may hold.
_GRAMMAR = re.compile(r"[\\()\[\]{}^$|*?,:'\"=\s]")


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
    own_configs = any(a.split("=", 1)[0] in ("--config-dir", "-cd") for a in args)
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
    # with configs of the user's, the keys they define are not known here
    return None if own_configs else _unknown_key(script, config_name, parsed)


def _overrides(args: Sequence[str]) -> list[str]:
    kept, args = [], iter(args)
    for arg in args:
        if arg.startswith("-") and not arg.startswith("--") and "=" in arg:
            kept.append(arg)  # not a flag: an override such as -x=1 is Hydra's to refuse
        elif arg.startswith("-"):
            if arg in _VALUED:
                next(args, None)
        else:
            kept.append(arg)
    return kept


def _split_by_shell(overrides: list[str]) -> str | None:
    """A list (or any value) typed with spaces reaches Hydra as several arguments:
    ``data.split=[0.8,`` ``0.1,`` ``0.1]``."""
    for i, override in enumerate(overrides):
        if "=" in override:
            continue
        start = i - 1
        while start >= 0 and "=" not in overrides[start]:
            start -= 1
        if start < 0:
            return None
        end = i + 1
        while end < len(overrides) and "=" not in overrides[end]:
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


def _quote_hint(override: str) -> str:
    key, _, value = override.partition("=")
    return (
        f"Hydra's override grammar cannot read '{override}': characters such as \\ ( ) ^ $ | "
        f"* [ ] , are its own syntax. Quote the value for Hydra, and the whole override for "
        f"the shell: \"{key}='{value}'\"."
        if value and _GRAMMAR.search(value)
        else None
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
        if p.is_add() or p.is_force_add() or key in groups or key.split(".")[0] == "hydra":
            continue
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            near = get_close_matches(key, known, n=2, cutoff=0.75)
            guess = f"; did you mean {' or '.join(near)}?" if near else "."
            return (
                f"{key} is not a setting of {script}{guess} (python {script} --cfg job prints "
                f"them all; Hydra's + would add the key, but nothing would read it)"
            )
    return None


_ABSENT = object()


def _keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items_ex(resolve=False):
        name = f"{prefix}{key}"
        out.append(name)
        if isinstance(value, DictConfig):
            out += _keys(value, f"{name}.")
    return out
