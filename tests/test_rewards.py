"""Reward functions (trainer/objectives/rewards.py): the built-ins' values, user functions from a file or a
module called with TRL's arguments, the one-line message of every bad spec and bad output, and combine."""

from __future__ import annotations

import inspect
import math
import textwrap
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError
from trainer.objectives.rewards import Reward, RewardError, combine, extract_answer, load_rewards, score


def run(spec: str, completions: list[str], ids: list[list[int]] | None = None, **fields: list) -> list[float]:
    """One spec's outputs for the completions (the records' fields given as columns)."""
    (reward,) = load_rewards([spec], None)
    records = [{key: values[index] for key, values in fields.items()} for index in range(len(completions))]
    ids = ids if ids is not None else [[0]] * len(completions)
    return score([reward], ["prompt"] * len(completions), completions, ids, records)[:, 0].tolist()


def write(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def same(actual: list[float], expected: list[float]) -> bool:
    """Equal lists, NaN equal to NaN."""
    return torch.equal(torch.tensor(actual).nan_to_num(-99.0), torch.tensor(expected).nan_to_num(-99.0))


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("so 6 * 7 is\n#### 42", "42"),
        ("#### 1\nno, wait\n#### 2 ", "2"),
        ("<think>maybe 3</think><answer> 7 </answer>", "7"),
        ("<answer>1</answer> then <answer>\n2\n</answer>", "2"),
        ("half: \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} or \\boxed{5}", "5"),
        ("<answer>it is \\boxed{3}</answer>", "3"),
        ("  just text \n", "just text"),
        ("\\boxed{unclosed", "\\boxed{unclosed"),
    ],
)
def test_extract_answer(completion: str, answer: str) -> None:
    assert extract_answer(completion) == answer


def test_exact_match_reads_the_final_answer_and_compares_numbers() -> None:
    completions = ["#### 3", "<answer>3.0</answer>", "\\boxed{4}", " Paris ", "#### 1,000", "#### 3", "x"]
    answers = [3, "3", "3", "Paris", "1000", "three", None]  # None: the record has no answer -> not applicable
    assert same(run("exact_match", completions, answer=answers), [1, 1, 0, 1, 1, 0, math.nan])


def test_exact_match_field_override() -> None:
    completions = ["#### 5", "#### 5"]
    assert run("exact_match:label", completions, answer=["5", "5"], label=["5", "6"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"no field 'answer' \(they have label\): use exact_match:FIELD"):
        run("exact_match", completions, label=["5", "5"])


def test_format_default_and_custom() -> None:
    completions = [
        "<think>a\nb</think>\n<answer>4</answer>\n",  # newlines inside and around: still the format
        "<answer>4</answer>",
        "<think>x</think><answer>4</answer> and more",
    ]
    assert run("format", completions) == [1.0, 0.0, 0.0]
    assert run("format:\\d+(:\\d+)?", ["12", "12:30", "12a"]) == [1.0, 1.0, 0.0]  # the regex may hold colons


def test_length_penalty() -> None:
    ids = [[0] * n for n in (2, 4, 6, 12)]
    assert run("length:4", ["c"] * 4, ids) == [0.0, 0.0, -0.5, -2.0]
    assert run("length", ["c"] * 3, [[0] * n for n in (256, 384, 512)]) == [0.0, -0.5, -1.0]


def test_builtin_names_win_over_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "format.py", "def f(prompts, completions, completion_ids, **fields):\n    return [9.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (reward,) = load_rewards(["format:f"], None)
    assert reward.name == "format"
    assert run("format:f", ["f", "g"]) == [1.0, 0.0]  # the regex "f", not format.py's f


# ----------------------------------------------------------------------------- user functions


USER = """
    from __future__ import annotations

    from dataclasses import dataclass

    calls = []


    @dataclass
    class Grade:  # a dataclass under string annotations needs its module in sys.modules
        value: float

    def graded(prompts, completions, completion_ids, **fields):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **fields))
        return [Grade(0.5).value, None]
"""


def test_file_function_gets_trl_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "rewards.py", USER)
    monkeypatch.chdir(tmp_path)  # relative to the current directory
    (reward,) = load_rewards(["rewards.py:graded"], [2.0])
    assert (reward.name, reward.spec, reward.weight) == ("graded", "rewards.py:graded", 2.0)
    records = [{"answer": "a", "level": 1}, {"answer": "b", "level": 2, "source": "x"}]
    scores = score([reward], ["p0", "p1"], ["c0", "c1"], [[1, 2], [3]], records)
    assert scores.dtype == torch.float32 and same(scores[:, 0].tolist(), [0.5, math.nan])
    (call,) = inspect.getmodule(reward.function).calls
    assert call == {
        "prompts": ["p0", "p1"],
        "completions": ["c0", "c1"],
        "completion_ids": [[1, 2], [3]],
        "answer": ["a", "b"],
        "level": [1, 2],
        "source": [None, "x"],  # a field one record lacks is None for it
    }


def test_files_with_the_same_name_stay_apart(tmp_path: Path) -> None:
    for folder, value in (("one", 1.0), ("two", 2.0)):
        write(tmp_path / folder, "scoring.py", f"def f(completions, **_):\n    return [{value}] * len(completions)\n")
    rewards = load_rewards([f"{tmp_path}/one/scoring.py:f", f"{tmp_path}/two/scoring.py:f"], None)
    assert [reward.name for reward in rewards] == ["f", "f_2"]  # the same metric name twice gets a suffix
    assert score(rewards, ["p"], ["c"], [[0]], [{}]).tolist() == [[1.0, 2.0]]


def test_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "reward_pkg_test/__init__.py", "")
    write(
        tmp_path,
        "reward_pkg_test/scoring.py",
        "def correct(prompts, completions, completion_ids, answer, **_):\n"
        "    return [float(c == a) for c, a in zip(completions, answer)]\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run("reward_pkg_test.scoring:correct", ["a", "b"], answer=["a", "a"]) == [1.0, 0.0]


# ----------------------------------------------------------------------------- load errors


@pytest.mark.parametrize(
    "source, spec, expected",
    [
        (None, "missing.py:f", "'missing.py:f': file missing.py not found (relative paths resolve against {tmp}): fix"),
        ("def f(**_): pass\n", "rewards.py:g", "'rewards.py:g': rewards.py has no 'g' (it defines f): fix the name"),
        ("LIMIT = 3\n", "rewards.py:LIMIT", "LIMIT in rewards.py is not callable (int): name a function f(prompts,"),
        (
            "import os\nraise ValueError('bad setting\\nsecond line')\n",
            "rewards.py:f",
            "'rewards.py:f': importing rewards.py raised ValueError: bad setting at rewards.py:2: fix that line",
        ),
        (
            "x = 1\nimport no_such_package_here\n",
            "rewards.py:f",
            "raised ModuleNotFoundError: No module named 'no_such_package_here' at rewards.py:2",
        ),
        (
            "x = 1\ndef f(:\n",
            "rewards.py:f",
            "importing rewards.py raised SyntaxError: ... at rewards.py:2: fix that line",
        ),
        (None, "no_such_module_here:f", "'no_such_module_here:f': no module named 'no_such_module_here': install"),
        (None, "math:nothing", "'math:nothing': math has no 'nothing'"),
        (None, "rewards.py", "'rewards.py' is not a reward function (name the function: rewards.py:FUNCTION): use"),
        (None, "exact_mach", "'exact_mach' is not a reward function (did you mean exact_match?)"),
        (None, "length:abc", "'length:abc': N must be a positive number of tokens"),
        (None, "length:0", "'length:0': N must be a positive number of tokens"),
        (None, "format:(<answer>", "'format:(<answer>': invalid regex (missing ), unterminated subpattern"),
        (None, "exact_match:", "'exact_match:' has an empty argument"),
    ],
)
def test_load_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str | None, spec: str, expected: str
) -> None:
    if source is not None:
        write(tmp_path, "rewards.py", source)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_rewards([spec], None)
    message = str(error.value)
    assert message.startswith("objective.rewards: ") and "\n" not in message
    parts = expected.format(tmp=tmp_path).split("...")  # "..." stands for text that varies (Python's wording)
    assert all(part in message for part in parts), message


def test_weight_errors() -> None:
    with pytest.raises(ConfigError, match=r"has 1 weights for 2 objective.rewards: give one weight per"):
        load_rewards(["length", "format"], [1.0])
    with pytest.raises(ConfigError, match=r"objective.reward_weights\[1\]=inf: give a finite number"):
        load_rewards(["length", "format"], [1.0, math.inf])


# ----------------------------------------------------------------------------- bad outputs


def returns(value):
    def bad(prompts, completions, completion_ids, **fields):
        return value

    return bad


@pytest.mark.parametrize(
    "output, expected",
    [
        ([1.0], "returned a list of length 1 for 2 completions: return a list of 2 floats"),
        (None, "returned None for 2 completions"),
        (torch.zeros(2, 1), "returned a Tensor of shape (2, 1) for 2 completions"),
        ((x for x in [1.0, 2.0]), "returned a generator for 2 completions"),
        ([1.0, "0.5"], "returned '0.5' (str) at index 1: return finite floats, None"),
        ([math.nan, 1.0], "returned nan (float) at index 0: return finite floats"),
        ([1.0, -math.inf], "returned -inf (float) at index 1"),
    ],
)
def test_bad_outputs_are_one_line(output: object, expected: str) -> None:
    function = returns(output)
    line = inspect.getsourcelines(function)[1]
    with pytest.raises(RewardError) as error:
        score([Reward("bad", "test:bad", function)], ["p", "p"], ["a", "b"], [[0], [0]], [{}, {}])
    message = str(error.value)
    assert message.startswith("reward bad (") and f"test_rewards.py:{line}) {expected}" in message
    assert "\n" not in message


def test_raising_function_names_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = """\
        import json

        def parsed(prompts, completions, completion_ids, **fields):
            values = [1.0 for _ in completions]
            return [json.loads(c) for c in completions]  # json's own frames lie deeper: this line is named
    """
    write(tmp_path, "rewards.py", source)
    monkeypatch.chdir(tmp_path)
    rewards = load_rewards(["rewards.py:parsed"], None)
    with pytest.raises(RewardError) as error:
        score(rewards, ["p"], ["not json"], [[0]], [{}])
    assert str(error.value) == (
        "reward parsed (rewards.py:3) raised JSONDecodeError: Expecting value: line 1 column 1 (char 0) "
        "at rewards.py:5: fix the function"
    )


def test_arrays_and_numpy_numbers_are_accepted() -> None:
    numpy = pytest.importorskip("numpy")
    rewards = [
        Reward("tensor", "t", returns(torch.tensor([1.0, 2.0]))),
        Reward("numpy", "n", returns([numpy.float32(0.25), numpy.int64(3)])),
        Reward("ints", "i", returns((True, 0))),
    ]
    scores = score(rewards, ["p", "p"], ["a", "b"], [[0], [0]], [{}, {}])
    assert scores.shape == (2, 3) and scores.tolist() == [[1.0, 0.25, 1.0], [2.0, 3.0, 0.0]]
    assert score([], ["p"], ["a"], [[0]], [{}]).shape == (1, 0)


# ----------------------------------------------------------------------------- combine


def test_combine_weights_and_none() -> None:
    rewards = load_rewards(["length:2", "exact_match"], [0.5, 2.0])
    scores = score(rewards, ["p"] * 3, ["#### 1", "#### 1", "#### 2"], [[0] * 4, [0] * 2, [0] * 6], [
        {"answer": "1"},
        {"answer": None},
        {"answer": "2"},
    ])  # fmt: skip
    assert same(scores.tolist(), [[-1.0, 1.0], [0.0, math.nan], [-2.0, 1.0]])
    assert same(combine(scores, rewards).tolist(), [-0.5 + 2.0, 0.0, -1.0 + 2.0])
    all_none = torch.tensor([[math.nan, math.nan], [math.nan, 1.0]])
    assert same(combine(all_none, rewards).tolist(), [math.nan, 2.0])  # NaN only where every function said None


class Scorer:
    """A callable object as a reward function: its class is where it is defined."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self, prompts, completions, completion_ids, **fields):
        completions[0] = "edited"
        return [1.0] * self.count


def test_callable_object_and_fresh_arguments() -> None:
    seen = []

    def record(prompts, completions, completion_ids, **fields):
        seen.extend(completions)
        return [0.0] * len(completions)

    rewards = [Reward("scorer", "s", Scorer(2)), Reward("record", "r", record)]
    scores = score(rewards, ["p"] * 2, ["a", "b"], [[0], [0]], [{}, {}])
    assert scores.tolist() == [[1.0, 0.0], [1.0, 0.0]] and seen == ["a", "b"]  # Scorer's edit did not reach record
    with pytest.raises(RewardError) as error:
        score([Reward("scorer", "s", Scorer(1))], ["p"] * 2, ["a", "b"], [[0], [0]], [{}, {}])
    line = inspect.getsourcelines(Scorer)[1]
    assert f"test_rewards.py:{line}) returned a list of length 1 for 2 completions" in str(error.value)
