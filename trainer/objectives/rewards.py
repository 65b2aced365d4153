"""Reward functions for GRPO / RLOO: loaded once from objective.rewards, called with TRL's signature.

A spec (one string of objective.rewards) names one function:
  FILE.py:function     a Python file, imported by path (a relative path resolves against the current directory)
  pkg.module:function  an importable module
  exact_match[:FIELD]  1.0 when the completion's final answer (extract_answer) equals the record's FIELD (answer)
  format[:REGEX]       1.0 when the stripped completion fully matches REGEX (dot matches newline; the default
                       asks for <think>...</think> then <answer>...</answer>)
  length[:N]           0 up to N completion tokens (256), then -(tokens - N) / N
Built-in names win over a module of the same name.

A reward function is called as TRL calls it, f(prompts=[...], completions=[...], completion_ids=[[...], ...],
**fields), each list holding one entry per completion and `fields` the records' other columns (answer=[...]).
It returns one float per completion, or None where the completion is not its business: NaN in `score`'s
table, left out of `combine`'s sum. Every failure, at load or at call, is one line naming the spec or the
function and the fix.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError

RewardFunction = Callable[..., Sequence[float | None]]
BUILTINS = ("exact_match", "format", "length")
DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
DEFAULT_LENGTH = 256
USAGE = "use FILE.py:function, pkg.module:function, exact_match[:FIELD], format[:REGEX] or length[:N]"
INPUTS = ("prompts", "completions", "completion_ids")  # the arguments every function gets; never a record field


class RewardError(RuntimeError):
    """A reward function raised, or returned something other than one real number (or None) per completion."""


@dataclass
class Reward:
    """One loaded reward function. `name` is its metric name (unique in the run), `weight` its factor in combine."""

    name: str
    spec: str
    function: RewardFunction
    weight: float = 1.0


def load_rewards(specs: list[str], weights: list[float] | None = None) -> list[Reward]:
    """objective.rewards and objective.reward_weights (None: all 1) as Rewards; ConfigError on the first bad spec."""
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(
            f"objective.reward_weights has {len(weights)} weights for {len(specs)} objective.rewards: "
            "give one weight per reward function, or null"
        )
    weights = [1.0] * len(specs) if weights is None else weights
    rewards: list[Reward] = []
    for index, (spec, weight) in enumerate(zip(specs, weights, strict=True)):
        if not math.isfinite(weight):
            raise ConfigError(f"objective.reward_weights[{index}]={weight}: give a finite number")
        base, function = _resolve(spec)
        name, copy = base, 1
        while name in {reward.name for reward in rewards}:  # the same function twice: exact_match, exact_match_2
            copy += 1
            name = f"{base}_{copy}"
        rewards.append(Reward(name, spec, function, float(weight)))
    return rewards


def score(
    rewards: list[Reward],
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    fields: list[dict[str, Any]],
) -> torch.Tensor:
    """(N, R) float32: column j holds reward j's unweighted outputs for the N completions, NaN where it gave None.

    `prompts`, `completion_ids` and `fields` (the records' other columns) hold one entry per completion.
    Raises RewardError (one line) when a function raises or returns anything but N finite numbers or None."""
    n = len(completions)
    if not len(prompts) == len(completion_ids) == len(fields) == n:
        raise ValueError(
            f"score: {len(prompts)} prompts, {n} completions, {len(completion_ids)} completion_ids and "
            f"{len(fields)} records: give one of each per completion"
        )
    keys = dict.fromkeys(key for record in fields for key in record if key not in INPUTS)  # in first-seen order
    inputs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
    inputs |= {key: [record.get(key) for record in fields] for key in keys}
    # fresh lists for each function, so that one editing its arguments cannot change the next one's
    table = [_call(reward, n, {key: list(value) for key, value in inputs.items()}) for reward in rewards]
    return torch.tensor(table, dtype=torch.float32).reshape(len(rewards), n).T.contiguous()


def combine(scores: torch.Tensor, rewards: list[Reward]) -> torch.Tensor:
    """(N,) the weighted sum of `scores` (N, R) over reward functions, NaN counting 0, and NaN where every
    function returned None for a completion."""
    weights = torch.tensor([reward.weight for reward in rewards], dtype=scores.dtype, device=scores.device)
    total = (scores * weights).nansum(dim=1)
    return total.masked_fill(scores.isnan().all(dim=1), math.nan)


def extract_answer(completion: str) -> str:
    """A completion's final answer: the inside of the last <answer>...</answer>, then of the last \\boxed{...},
    then what follows the last ####, each narrowing the previous where present; stripped."""
    text = completion
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    text = tagged[-1] if tagged else text
    start = text.rfind("\\boxed{")
    if start >= 0:
        begin, depth = start + len("\\boxed{"), 0
        for end in range(begin, len(text)):  # to the matching brace: \boxed{\frac{1}{2}}
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth < 0:
                text = text[begin:end]
                break
    return text.rpartition("####")[2].strip()


# ----------------------------------------------------------------------------- loading


def _resolve(spec: str) -> tuple[str, RewardFunction]:
    """(metric name, function) for one spec."""
    head, colon, argument = spec.partition(":")
    if head in BUILTINS:
        if colon and not argument:
            raise ConfigError(
                f"objective.rewards: {spec!r} has an empty argument: give one after the colon, or drop it"
            )
        return head, BUILTIN_FACTORIES[head](spec, argument or None)
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute.isidentifier():
        close = difflib.get_close_matches(head, BUILTINS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        hint = hint or ("" if colon else f" (name the function: {head}:FUNCTION)")
        raise ConfigError(f"objective.rewards: {spec!r} is not a reward function{hint}: {USAGE}")
    module = _import(spec, target)
    if not hasattr(module, attribute):
        defined = [name for name, value in vars(module).items() if inspect.isfunction(value) and name[0] != "_"]
        raise ConfigError(
            f"objective.rewards: {spec!r}: {target} has no {attribute!r} (it defines "
            f"{', '.join(defined) or 'no functions'}): fix the name after the colon"
        )
    function = getattr(module, attribute)
    if not callable(function):
        raise ConfigError(
            f"objective.rewards: {spec!r}: {attribute} in {target} is not callable ({type(function).__name__}): "
            "name a function f(prompts, completions, completion_ids, **fields)"
        )
    return getattr(function, "__name__", type(function).__name__), function


def _import(spec: str, target: str) -> Any:
    """The module a spec names: a .py file imported by path, else an importable module."""
    is_file = target.endswith(".py")
    if is_file and not Path(target).expanduser().is_file():
        raise ConfigError(
            f"objective.rewards: {spec!r}: file {target} not found (relative paths resolve against {Path.cwd()}): "
            "fix the path"
        )
    try:
        return _import_file(Path(target).expanduser().resolve()) if is_file else importlib.import_module(target)
    except Exception as error:
        missing = getattr(error, "name", None)  # ModuleNotFoundError: which module; else an error inside the module
        if isinstance(error, ModuleNotFoundError) and not is_file and f"{target}.".startswith(f"{missing}."):
            raise ConfigError(
                f"objective.rewards: {spec!r}: no module named {missing!r}: install it, add its folder to PYTHONPATH, "
                "or give a file (FILE.py:function)"
            ) from error
        message = f"objective.rewards: {spec!r}: importing {target} raised {_describe(error)}: fix that line"
        raise ConfigError(message) from error


def _import_file(path: Path) -> Any:
    name = re.sub(r"\W", "_", path.stem)  # rewards.py -> module `rewards`, unless another module holds that name
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) != str(path):
        name = f"{name}_{zlib.crc32(str(path).encode()):08x}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle find a module's classes through sys.modules
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ----------------------------------------------------------------------------- calling


def _call(reward: Reward, n: int, inputs: dict[str, list]) -> list[float]:
    """One function's N outputs as floats (NaN for None), or RewardError."""
    try:
        output = reward.function(**inputs)
    except Exception as error:
        source = _source(reward.function)[0]
        raise RewardError(f"{_named(reward)} raised {_describe(error, prefer=source)}: fix the function") from error
    if getattr(output, "ndim", None) == 1 and hasattr(output, "tolist"):  # a numpy array or a tensor
        output = output.tolist()
    if not isinstance(output, (list, tuple)) or len(output) != n:
        raise RewardError(
            f"{_named(reward)} returned {_what(output)} for {n} completions: return a list of {n} floats "
            "(None where a completion does not apply)"
        )
    values = []
    for index, value in enumerate(output):
        if value is None:
            values.append(math.nan)
        elif not isinstance(value, numbers.Real) or not math.isfinite(value):  # a str, a tensor, NaN, inf
            raise RewardError(
                f"{_named(reward)} returned {value!r:.40} ({type(value).__name__}) at index {index}: return finite "
                "floats, None where a completion does not apply"
            )
        else:
            values.append(float(value))
    return values


def _named(reward: Reward) -> str:
    file, line = _source(reward.function)
    return f"reward {reward.name} ({_short(file)}:{line})" if file else f"reward {reward.name} ({reward.spec})"


def _source(function: Any) -> tuple[str | None, int | None]:
    """The file and line defining a function (a callable object's class; a partial's function)."""
    target = inspect.unwrap(function)
    target = getattr(target, "func", target)
    target = target if inspect.isroutine(target) or inspect.isclass(target) else type(target)
    try:
        return inspect.getsourcefile(target), inspect.getsourcelines(target)[1]
    except (TypeError, OSError):
        return None, None


def _describe(error: BaseException, prefer: str | None = None) -> str:
    """'Type: the message's first line at file:line': where a SyntaxError points, else the traceback's last frame
    (the last one in file `prefer` when there is one, so a library's frame does not hide the caller's line)."""
    lines = str(error.msg if isinstance(error, SyntaxError) else error).splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    if isinstance(error, SyntaxError) and error.filename:
        return f"{text} at {_short(error.filename)}:{error.lineno}"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith("<frozen")]
    frames = [frame for frame in frames if frame.filename == prefer] or frames
    return f"{text} at {_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else text


def _what(output: Any) -> str:
    if output is None:
        return "None"
    if hasattr(output, "shape"):
        return f"a {type(output).__name__} of shape {tuple(output.shape)}"
    length = f" of length {len(output)}" if hasattr(output, "__len__") else ""
    return f"a {type(output).__name__}{length}"


def _short(path: str) -> str:
    """A path relative to the current directory when it lies under it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


# ----------------------------------------------------------------------------- built-ins


def _exact_match(spec: str, field: str | None) -> RewardFunction:
    field = field or "answer"

    def exact_match(prompts: list[str], completions: list[str], completion_ids: list, **fields: list) -> list:
        if field not in fields:
            raise ValueError(
                f"the records have no field {field!r} (they have {', '.join(fields) or 'none'}): use exact_match:FIELD"
            )
        return [
            None if expected is None else float(_same(extract_answer(completion), str(expected).strip()))
            for completion, expected in zip(completions, fields[field], strict=True)
        ]

    return exact_match


def _same(answer: str, expected: str) -> bool:
    """Equal as numbers when both parse as finite numbers (3 and 3.0, 1,000 and 1000), else as text."""
    first, second = _number(answer), _number(expected)
    return first == second if first is not None and second is not None else answer == expected


def _number(text: str) -> float | None:
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", text):  # thousands separators
        text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _format(spec: str, regex: str | None) -> RewardFunction:
    try:
        pattern = re.compile(regex or DEFAULT_FORMAT, re.DOTALL)
    except re.error as error:
        raise ConfigError(f"objective.rewards: {spec!r}: invalid regex ({error}): fix it") from None

    def format_match(prompts: list[str], completions: list[str], completion_ids: list, **fields: list) -> list:
        return [float(pattern.fullmatch(completion.strip()) is not None) for completion in completions]

    return format_match


def _length(spec: str, argument: str | None) -> RewardFunction:
    try:
        limit = DEFAULT_LENGTH if argument is None else int(argument)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ConfigError(f"objective.rewards: {spec!r}: N must be a positive number of tokens, e.g. length:256")

    def length(prompts: list[str], completions: list[str], completion_ids: list, **fields: list) -> list:
        return [min(0.0, (limit - len(ids)) / limit) for ids in completion_ids]

    return length


BUILTIN_FACTORIES: dict[str, Callable[[str, str | None], RewardFunction]] = {
    "exact_match": _exact_match,
    "format": _format,
    "length": _length,
}
