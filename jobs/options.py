"""Command options declared once, on config dataclasses.

A config dataclass (``CurateConfig``, ``ReleaseConfig``, ``SynthConfig``, ...) is the one place
an option is declared: a field is a command-line option when its metadata has a ``help`` text,
and its default is the field's default. From the class this module derives

* the argparse options of the command (:func:`add_arguments`),
* the config from parsed arguments (:func:`from_args`) and the arguments of a config
  (:func:`as_args`: what orchestration hands to a command's ``run``, no command line involved),
* the command line a config stands for (:func:`argv`: for logs and stage records),
* the check of a YAML mapping of options against the fields (:func:`check_mapping`: names,
  value types and choices, as the parser would check them).

Field metadata (all optional but ``help``):

``help``        the help text; a field without one is not an option
``flag``        the option string (default ``--`` + the name with ``-``); a bool that defaults
                to True takes a ``--no-...`` flag that sets it False
``positional``  True: a positional argument (its ``flag`` is the metavar)
``type``        the string -> value parser (default: from the annotation)
``metavar``, ``choices``, ``nargs``, ``action`` ("append"), ``required``   as in argparse
``group``       the title of the argparse group the option is listed in

Why hand-rolled: argparse has no dataclass support, and no library in this environment
(tyro, simple-parsing) derives options from dataclasses defined in layers that must not import
the CLI; this reads plain ``field(metadata=...)`` dicts, so those layers depend on nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path

_SCALARS = {"int": int, "float": float, "str": str, "Path": Path}


def fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` (a dataclass or an instance) that are command-line options."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest(f: dataclasses.Field) -> str:
    """The argparse attribute of field `f` (derived from its flag, as argparse does)."""
    return flag(f).lstrip("-").replace("-", "_")


def default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _annotation(f: dataclasses.Field) -> str:
    """The field's type as written (``int``, ``tuple[str, ...]``), without ``| None``."""
    t = f.type
    text = t if isinstance(t, str) else t.__name__ if isinstance(t, type) else str(t)
    return text.replace(" | None", "")


def _is_bool(f) -> bool:
    return _annotation(f).split(" | ")[0] == "bool"  # TrainConfig.bf16 is `bool | str`


def _inverted(f) -> bool:
    """A bool option that defaults to True: its flag (``--no-report``) sets it False."""
    return _is_bool(f) and default(f) is True


def _many(f) -> bool:
    return f.metadata.get("action") == "append" or f.metadata.get("nargs") in ("+", "*")


def value_type(f: dataclasses.Field):
    """The string -> value parser of field `f`."""
    if "type" in f.metadata:
        return _parser(f.metadata["type"])
    annotation = _annotation(f)
    if _many(f):
        annotation = annotation.split("[", 1)[1].split(",")[0].rstrip("]") if "[" in annotation else "str"
    return _SCALARS.get(annotation, str)


def _parser(parse):
    """`parse` for argparse: its ValueError message is shown (argparse shows the message of an
    ArgumentTypeError only, "invalid value" for anything else)."""
    def typed(text):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    typed.__name__ = getattr(parse, "__name__", "value")
    return typed


def add_arguments(parser, cls, *, skip=(), defaults: dict | None = None) -> dict:
    """Declare the options of dataclass `cls` on `parser`: one per field with a help text,
    except the names in `skip`; `defaults` replaces field defaults (finetune's learning rate).
    Returns the argument groups made, by title."""
    groups: dict = {}
    defaults = defaults or {}
    for f in fields(cls):
        if f.name in skip:
            continue
        md = f.metadata
        target = parser
        if md.get("group"):
            if md["group"] not in groups:
                groups[md["group"]] = parser.add_argument_group(md["group"])
            target = groups[md["group"]]
        kwargs = {"help": md["help"]}
        value = defaults.get(f.name, default(f))
        if _is_bool(f):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = value_type(f)
            for key in ("metavar", "choices", "nargs", "action"):
                if key in md:
                    kwargs[key] = md[key]
            required = md.get("required", f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            if md.get("positional"):
                kwargs["metavar"] = md.get("flag", f.name)
                target.add_argument(f.name, **kwargs)
                continue
            if required:
                kwargs["required"] = True
            elif not _many(f) or value:
                kwargs["default"] = list(value) if _many(f) and value is not None else value
        target.add_argument(flag(f), **kwargs)
        if _many(f) and not value and not kwargs.get("required"):
            parser.set_defaults(**{dest(f): [] if md.get("nargs") else None})
    return groups


def _arg_name(f) -> str:
    return f.name if f.metadata.get("positional") else dest(f)


def from_args(cls, args, **given):
    """``cls(...)`` from the parsed `args` of its options, plus the fields in `given`."""
    kwargs = {}
    for f in fields(cls):
        if f.name in given or not hasattr(args, _arg_name(f)):
            continue
        value = getattr(args, _arg_name(f))
        if _inverted(f):
            value = not value
        elif _many(f) and value is not None and _annotation(f).startswith("tuple"):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs, **given)


def as_args(*configs, **more) -> argparse.Namespace:
    """The parsed arguments the options of `configs` stand for (the inverse of
    :func:`from_args`), plus `more` (e.g. ``extra=[Beam options]``)."""
    ns = argparse.Namespace()
    for config in configs:
        for f in fields(config):
            value = getattr(config, f.name)
            if _inverted(f):
                value = not value
            elif _many(f) and value is not None:
                value = list(value)
            setattr(ns, _arg_name(f), value)
    for key, value in more.items():
        setattr(ns, key, value)
    return ns


def argv(*configs) -> list[str]:
    """The command-line options `configs` stand for: every option that is set (a None or
    False value is left out, as it is the unset state of its option)."""
    out: list[str] = []
    for config in configs:
        for f in fields(config):
            value = getattr(config, f.name)
            if f.metadata.get("positional"):
                out.append(str(value))
            elif _inverted(f):
                out += [] if value else [flag(f)]
            elif value is True:
                out.append(flag(f))
            elif value is None or value is False:
                continue
            elif _many(f):
                if f.metadata.get("action") == "append":
                    out += [a for v in value for a in (flag(f), str(v))]
                elif value:
                    out += [flag(f), *map(str, value)]
            elif isinstance(value, dict):
                out += [flag(f), ",".join(f"{k}={v}" for k, v in value.items())]
            else:
                out += [flag(f), str(value)]
    return out


def flags(keys) -> list[str]:
    """``["max_length"]`` -> ``["--max-length"]``: mapping keys as the options they name."""
    return ["--" + str(k).replace("_", "-") for k in keys]


def did_you_mean(unknown, known) -> str:
    """`` (did you mean num_captions?)`` for the unknown keys that are close to a known one, else ``""``."""
    guesses = [f"{key} -> {match[0]}" for key in unknown
               if (match := difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.75))]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def by_name(*classes) -> dict[str, dataclasses.Field]:
    """Options by the names a YAML mapping uses for them: their argparse attribute
    (``no_report``, ``input``), which is the field name wherever the flag is derived from it."""
    return {dest(f): f for cls in classes for f in fields(cls)}


def check_value(f: dataclasses.Field, value):
    """`value` (from YAML) as the option of field `f` takes it; ValueError in argparse's words."""
    if _is_bool(f):
        if not isinstance(value, bool):
            raise ValueError(f"argument {flag(f)}: expected true or false, got {value!r}")
        return value
    convert = value_type(f)
    items = value if _many(f) and isinstance(value, list) else [value]
    checked = []
    for item in items:
        if isinstance(item, bool) or (convert in (int, float) and not isinstance(item, (int, float, str))):
            raise ValueError(f"argument {flag(f)}: invalid {convert.__name__} value: {item!r}")
        if convert is int and isinstance(item, float):
            raise ValueError(f"argument {flag(f)}: invalid int value: {item!r}")
        try:
            item = convert(item) if isinstance(item, str) else item
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            name = getattr(convert, "__name__", "")
            detail = f"invalid {name} value: {item!r}" if name in ("int", "float") else str(err)
            raise ValueError(f"argument {flag(f)}: {detail}") from None
        choices = f.metadata.get("choices")
        if choices is not None and item not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ValueError(f"argument {flag(f)}: invalid choice: {item!r} (choose from {shown})")
        checked.append(item)
    return checked if _many(f) and isinstance(value, list) else checked[0]


def check_mapping(mapping: dict, *classes, reserved=()) -> tuple[dict, dict]:
    """(the checked values by field name, the entries no option of `classes` has).
    A key in `reserved` raises ``KeyError(key)``; a bad value raises ValueError."""
    known = by_name(*classes)
    values, unknown = {}, {}
    for key, value in mapping.items():
        key = str(key)
        if key in reserved:
            raise KeyError(key)
        f = known.get(key)
        if f is None:
            unknown[key] = value
            continue
        values[f.name] = None if value is None else check_value(f, value)
        if _inverted(f) and values[f.name] is not None:
            values[f.name] = not values[f.name]
    return values, unknown


@dataclasses.dataclass(frozen=True)
class Call:
    """One command run in this process from config objects, with no command line: what the
    bootstrap and run-job run. Iterating it gives the command line it stands for (logs, stage
    records); `extra` are options in another tool's syntax (Beam's, img2dataset's)."""

    command: str
    configs: tuple
    extra: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [self.command, *argv(*self.configs), *self.extra]

    def __iter__(self):
        return iter(self.argv())

    def with_(self, **changes) -> "Call":
        """The same call with `changes` applied to the configs that have those fields."""
        configs = tuple(dataclasses.replace(c, **{k: v for k, v in changes.items() if k in _names(c)})
                        for c in self.configs)
        return dataclasses.replace(self, configs=configs)

    def run(self) -> int:
        """The command's ``run`` (looked up now), given these configs' arguments; it raises on error."""
        import importlib

        from capfilt.jobs.cli import COMMANDS

        module = importlib.import_module(COMMANDS[self.command][0])
        return int(module.run(as_args(*self.configs, extra=list(self.extra))) or 0)


def _names(config) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def pick(cls, values: dict, **given):
    """``cls(**given, **the values that are fields of cls)``; the values win over `given`."""
    names = _names(cls)
    return cls(**{**given, **{k: v for k, v in values.items() if k in names}})
