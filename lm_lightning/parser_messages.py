"""jsonargparse's messages about a bad command line or config, turned into one sentence.

jsonargparse (under LightningCLI) reports a bad flag as a 10-20 line tree of every type it tried, after 70-80 lines
of usage. :func:`parser_error_sentence` reads that tree (jsonargparse 4.53's wording; anything it does not recognize
falls back to the tree's first line) and says which flag was wrong, what it expects, and how to fix it.
:func:`undecodable_config` does the same for a ``-c`` file that is not text.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Sequence
from typing import Optional

SUBCOMMANDS = ("fit", "validate", "test", "predict", "export")
# An example for each option that takes a class, for "give a class path such as ...".
CLASS_EXAMPLES = {
    "model": "lm_lightning.systems.LanguageModel",
    "data": "lm_lightning.data.TokenDataModule",
    "optimizer": "torch.optim.AdamW",
    "lr_scheduler": "torch.optim.lr_scheduler.StepLR",
    "logger": "lightning.pytorch.loggers.TensorBoardLogger",
    "callbacks": "lightning.pytorch.callbacks.EarlyStopping",
}
# The top-level keys of a config (and of `--help`), for "did you mean" on a misspelled one.
SECTIONS = ("trainer", "model", "data", "checkpoint", "export", "seed_everything", "ckpt_path", "optimizer", "lr_scheduler")
# The classes behind the sections whose options the parser lists itself (a misspelled one is "unrecognized").
SECTION_CLASSES = {"trainer": "lightning.pytorch.Trainer", "checkpoint": "lightning.pytorch.callbacks.ModelCheckpoint"}
SIMPLE_TYPES = {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string", "NoneType": "null"}


def parser_error_sentence(message: str, args: Sequence[str]) -> str:
    """One sentence for a jsonargparse error ``message`` raised while parsing the command line ``args``."""
    subcommand = args[0] if args and args[0] in SUBCOMMANDS else "fit"
    help_hint = f"`python -m lm_lightning {subcommand} --help` lists the options"
    lines = _tree(message)
    for rule in (_unknown_key, _wrong_value, _wrong_type, _not_a_class, _config_file, _command_line):
        sentence = rule(message, lines, list(args), help_hint)
        if sentence:
            return sentence
    first = " ".join(message.split("\n", 1)[0].split())
    return f"the command line was refused ({first.rstrip(':')}): {help_hint}."


# --- reading jsonargparse's tree of messages --------------------------------------------------------------
def _tree(message: str) -> list[tuple[int, str]]:
    """(depth, text) per line; a list item's "- " counts as indentation, so its children are deeper than it."""
    return [(len(line) - len(line.lstrip(" -")), line.strip(" -")) for line in message.splitlines() if line.strip(" -")]


def _ancestors(lines: list[tuple[int, str]], index: int) -> list[str]:
    """The texts of the line at ``index`` and of the lines it hangs under, outermost first."""
    texts, depth = [lines[index][1]], lines[index][0]
    for d, text in reversed(lines[:index]):
        if d < depth:
            texts.insert(0, text)
            depth = d
    return texts


def _flag(lines: list[tuple[int, str]], index: int, extra: str = "") -> str:
    """``--data.tokenizer`` from the nested ``Parser key "data"`` ... ``Parser key "tokenizer"`` above a line."""
    keys = [key for text in _ancestors(lines, index) for key in re.findall(r'Parser key "([^"]+)"', text)]
    return "--" + ".".join(keys + ([extra] if extra else []))


def _class_path(lines: list[tuple[int, str]], index: int) -> Optional[str]:
    paths = [p for text in _ancestors(lines, index) for p in re.findall(r"Problem with given class_path '([^']+)'", text)]
    return paths[-1] if paths else None


def _block(lines: list[tuple[int, str]], index: int) -> list[tuple[int, str]]:
    """The lines of the union block whose "Does not validate ..." header is at ``index``: its "Subtypes", "Errors" and
    "Given value" lines follow at one depth (the header's, or 2 less when the header is itself a list item)."""
    if index + 1 >= len(lines):
        return []
    depth = lines[index + 1][0]
    block = []
    for d, text in lines[index + 1 :]:
        if d < depth:
            break
        block.append((d, text))
    return block


def _given(lines: list[tuple[int, str]], index: int) -> str:
    for _, text in _block(lines, index):
        if text.startswith("Given value:"):
            return text[len("Given value:") :].split(". Got value:")[0].strip()
    return "?"


def _subtypes(lines: list[tuple[int, str]], index: int) -> list[str]:
    for _, text in _block(lines, index):
        if text.startswith("Subtypes: ["):
            return _split_top_level(text[len("Subtypes: [") : -1])
    return []


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += 1 if char in "[(" else -1 if char in "])" else 0
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()] if text.strip() else parts


def _describe(type_text: str) -> list[str]:
    """What a user may give for a type as jsonargparse prints it: ``<class 'int'>`` -> an integer, a Literal -> its values."""
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", type_text)
    if literal:
        return [value.strip().strip("'\"") for value in _split_top_level(literal.group(1))]
    simple = re.fullmatch(r"<class '([\w.]+)'>", type_text)
    if simple:
        name = simple.group(1)
        return [SIMPLE_TYPES.get(name, f"a {name}")]
    return ["a class path (package.module.Class)"] if "Callable" in type_text or "class" in type_text else [type_text]


def _expected(types: list[str]) -> str:
    values = list(dict.fromkeys(v for t in types for v in _describe(t)))  # in order, each once
    literals = [v for v in values if not v.startswith(("a ", "an ", "true/false", "null"))]
    words = [v for v in values if v not in literals]
    if literals:
        words.insert(0, "one of " + ", ".join(literals))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _given_on_command_line(flag: str, args: list[str]) -> bool:
    return any(arg.split("=")[0].replace(".init_args.", ".") == flag for arg in args)


def _where(flag: str, args: list[str]) -> str:
    return flag if _given_on_command_line(flag, args) else f"{flag.lstrip('-')} (in the -c file)"


def _close_match(name: str, class_path: Optional[str]) -> Optional[str]:
    """The argument of ``class_path`` that ``name`` most likely misspells."""
    names = list(SECTIONS)
    try:
        if class_path is not None:
            module, _, attr = class_path.rpartition(".")
            names = list(inspect.signature(getattr(importlib.import_module(module), attr)).parameters)
    except Exception:  # any failure only costs the suggestion
        return None
    matches = difflib.get_close_matches(name, names, n=1)
    return matches[0] if matches else None


def _network_class(system_class_path: Optional[str], args: list[str]) -> Optional[str]:
    """The class path of the network a system is given (``--model.network CLASS``, else the CLI's default), when the
    system takes one: the network's settings are ``--model.network.*``, not ``--model.*``."""
    if _close_match("network", system_class_path) != "network":
        return None
    given = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--model.network"]
    path = given[-1] if given else "lm_lightning.networks.LSTMNetwork"
    return path if "." in path else f"lm_lightning.networks.{path}"


# --- the rules, most specific first -------------------------------------------------------------------------
def _unknown_key(message: str, lines: list, args: list[str], help_hint: str) -> Optional[str]:
    for i, (_, text) in enumerate(lines):
        found = re.fullmatch(r"(?:Option|Subcommand '\w+' does not accept option) '([^']+)'(?: is not accepted)?", text)
        if found:
            name, class_path = found.group(1), _class_path(lines, i)
            flag, owner = _flag(lines, i, name), f" of {class_path.rsplit('.', 1)[-1]}" if class_path else ""
            # A misspelled argument of a class, or a misspelled section (trainr.max_epochs) at the top of a config.
            wrong = name if class_path else name.split(".")[0]
            guess = _close_match(wrong, class_path)
            network = _network_class(class_path, args) if guess is None and "." not in name else None
            if network is not None and _close_match(wrong, network):  # a network setting given to the system
                guess = f"network.{_close_match(wrong, network)}"
            fix = f"did you mean {flag.replace(wrong, guess)}? ({help_hint})" if guess else f"check the spelling ({help_hint})"
            return f"{_where(flag, args)} is not an option{owner}: {fix}."
    return None


def _wrong_value(message: str, lines: list, args: list[str], help_hint: str) -> Optional[str]:
    for i, (_, text) in enumerate(lines):
        found = re.fullmatch(r"Expected a (.+?)\. Got value: (.*?)(?:\. Got value: .*)?", text)
        if found:
            flag, expected = _flag(lines, i), _expected([found.group(1)])
            return f"{_where(flag, args)} {found.group(2)!r} is not valid: give {expected}."
    return None


def _union_blocks(lines: list) -> list[int]:
    """Union blocks whose failure is the value itself (not a class further down), deepest first."""
    blocks = []
    for i, (_, text) in enumerate(lines):
        if text == "Does not validate against any of the Union subtypes":
            inner = [t for _, t in _block(lines, i)]
            if not any(t.startswith(("Problem with given class_path", "Does not validate")) for t in inner):
                blocks.append(i)
    return sorted(blocks, key=lambda i: -lines[i][0])


def _wrong_type(message: str, lines: list, args: list[str], help_hint: str) -> Optional[str]:
    """A union of plain types (``Optional[int]``, the Literals of ``--trainer.precision``): the value fits none."""
    for i in _union_blocks(lines):
        types = [t for t in _subtypes(lines, i) if "Callable" not in t and "lightning" not in t and "torch" not in t]
        if any(_describe(t)[0] != "null" for t in types):
            flag, expected = _flag(lines, i), _expected(types)
            return f"{_where(flag, args)} {_given(lines, i)!r} is not valid: give {expected}."
    return None


def _not_a_class(message: str, lines: list, args: list[str], help_hint: str) -> Optional[str]:
    patterns = (
        r"No module named .*",
        r"module '.*' has no attribute .*",
        r"Import path does not correspond to a subclass of \w+",
        r".*expects a function or a callable class: (module .*)\. Got value: .*",
        r"Expected a dot import path string: .*",
    )
    for i, (_, text) in enumerate(lines):
        for pattern in patterns:
            found = re.fullmatch(pattern, text)
            if found:
                reason = found.group(1) if found.groups() else text
                if reason.startswith("Expected a dot import path"):
                    reason = "not a dotted class path"
                flag = _flag(lines, i)
                value = next(iter(re.findall(r"Expected a path but (\S+) either", message)), None) or _class_path(lines, i) or "?"
                example = CLASS_EXAMPLES.get(flag.lstrip("-").rsplit(".", 1)[-1], "package.module.Class")
                return f"{_where(flag, args)} {value} is not a class that can be used here ({reason}): give a class path such as {example}."
    return None


def _config_files(args: list[str]) -> list[str]:
    files = [b for a, b in zip(args, args[1:]) if a in ("-c", "--config")]
    return files + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]


def _config_file(message: str, lines: list, args: list[str], help_hint: str) -> Optional[str]:
    found = re.match(r'Parser key "config": (File does not exist|Path is not a file): (.*)', message)
    if found:
        return f"-c {found.group(2).strip(chr(39))}: {found.group(1).lower()}: give the path of a YAML config such as configs/default.yaml."
    if message.startswith(("Problems parsing config", "Unexpected config")):
        import yaml

        for path in _config_files(args):
            try:
                with open(path, encoding="utf-8") as stream:
                    settings = yaml.safe_load(stream)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(err, "problem", None) or "a syntax error"
                return f"-c {path} is not valid YAML ({problem}{where}): fix the file or give another config."
            except (OSError, UnicodeDecodeError):
                continue
            if not isinstance(settings, dict):
                what = "empty" if settings is None else f"a {type(settings).__name__}, not a mapping of settings"
                return f"-c {path} is {what}: a config maps sections to settings, e.g. `trainer: {{max_epochs: 3}}`."
        first = " ".join(message.split("\n", 1)[0].split())
        return f"a value on the command line is not valid YAML ({first}): quote it or fix it ({help_hint})."
    return None


def _command_line(message: str, lines: list, args: list[str], help_hint: str) -> Optional[str]:
    found = re.fullmatch(r"unrecognized arguments: (.*)", message.strip())
    if found:
        words = found.group(1).split()
        flag = next((w for w in words if w.startswith("-")), words[0]).split("=")[0]
        what = "not an option" if flag.startswith("-") else "not a subcommand or option"
        section, _, name = flag.lstrip("-").partition(".")
        guess = _close_match(name, SECTION_CLASSES.get(section)) if name else None
        fix = f"did you mean --{section}.{guess}? ({help_hint})" if guess else f"check the spelling ({help_hint})"
        return f"{flag} is {what}: {fix}."
    if message.startswith('expected "subcommand" to be one of'):
        return f"a subcommand is missing: use one of {', '.join(SUBCOMMANDS)}, e.g. `python -m lm_lightning fit`."
    found = re.match(r"argument subcommand: invalid choice: '([^']*)'", message)
    if found:
        return f"{found.group(1)!r} is not a subcommand: use one of {', '.join(SUBCOMMANDS)} (`python -m lm_lightning --help`)."
    found = re.match(r"argument (\S+): expected one argument", message)
    if found:
        flag = next((a for a in reversed(args) if a.startswith(found.group(1))), found.group(1))
        return f"{flag} needs a value: write it after the flag ({help_hint})."
    if "the following arguments are required" in message:
        return f"{message.strip()}: add them ({help_hint})."
    return None


def undecodable_config(args: Sequence[str]) -> Optional[str]:
    """The sentence for a ``-c`` file that is not text (jsonargparse lets the UnicodeDecodeError through)."""
    for path in _config_files(list(args)):
        try:
            with open(path, encoding="utf-8") as stream:
                stream.read()
        except UnicodeDecodeError as err:
            return f"-c {path} is not a text file (byte {err.start} is not UTF-8): give a YAML config such as configs/default.yaml."
        except OSError:
            continue
    return None
