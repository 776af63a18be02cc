"""bench/sim_tasks.py's verdict on a generated task: its reference calls run on the real toy
tools (executable) and use only values the user was given (grounded). Tasks built by hand here;
the benchmark itself generates them with the simulator."""

from __future__ import annotations

from bench.sim_tasks import check_task
from trustee.types import Task, ToolCall


def _task(query: str, *calls: ToolCall, hidden: str = "") -> Task:
    return Task(
        id="t", env="simulated", tools=[], first_query=query, hidden_info=hidden, expected_calls=list(calls)
    )


def test_a_task_whose_calls_run_and_whose_values_were_given_is_valid():
    v = check_task(_task("What is 12 plus 30?", ToolCall(name="add", arguments={"a": 12, "b": 30})))
    assert v["executable"] and v["grounded"] and v["valid"] and v["real_results"] == [{"result": 42}]
    v = check_task(
        _task(
            "Convert it to km please",
            ToolCall(name="convert_units", arguments={"value": 2.5, "from_unit": "m", "to_unit": "km"}),
            hidden="the distance is 2.5 m",
        )
    )
    assert v["valid"], v


def test_values_the_user_never_gave_make_it_ungrounded():
    v = check_task(_task("Forbidden", ToolCall(name="multiply", arguments={"a": 1, "b": 2})))
    assert v["executable"] and not v["grounded"] and not v["valid"]
    v = check_task(_task("add 120 and 3", ToolCall(name="add", arguments={"a": 12, "b": 3})))
    assert not v["grounded"]  # 12 is only part of 120


def test_calls_the_real_tools_cannot_answer_are_not_executable():
    v = check_task(_task("get color", ToolCall(name="kv_get", arguments={"key": "color"})))
    assert not v["executable"] and "not found" in v["real_results"][0]["error"]  # empty store
    v = check_task(
        _task(
            "set color blue then read it",
            ToolCall(name="kv_set", arguments={"key": "color", "value": "blue"}),
            ToolCall(name="kv_get", arguments={"key": "color"}),
        )
    )
    assert v["executable"] and v["valid"]
    v = check_task(
        _task(
            "m to kg 5",
            ToolCall(name="convert_units", arguments={"value": 5, "from_unit": "m", "to_unit": "kg"}),
        )
    )
    assert not v["executable"]  # length to mass: the real tool returns an error
    v = check_task(_task("weather in oslo", ToolCall(name="weather", arguments={"city": "oslo"})))
    assert not v["executable"]
    assert not check_task(_task("nothing to do"))["executable"]  # no reference call
