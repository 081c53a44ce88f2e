"""The sample rules LLaMA-Factory applies, checked one by one."""

import pytest
from pydantic import ValidationError

from mmdata.samples import Sample, conversation_problems, sample_json_schema


def sample(messages, images=(), context=None):
    return Sample.model_validate({"messages": messages, "images": list(images)}, context=context)


def msg(role, content):
    return {"role": role, "content": content}


def test_valid_multiturn_with_system_and_images():
    s = sample([msg("system", "be brief"), msg("user", "<image>what?"), msg("assistant", "a cat"),
                msg("user", "<image>and this?"), msg("assistant", "a dog")], images=["a.jpg", "b.jpg"])
    assert s.to_json_line().startswith('{"messages":[{"role":"system"')


@pytest.mark.parametrize(
    "messages, images, expected",
    [
        ([msg("assistant", "x"), msg("user", "y")], [], "expected"),
        ([msg("user", "a"), msg("system", "s"), msg("assistant", "b")], [], "system message may only come first"),
        ([msg("user", "a")], [], "ends with a user turn"),
        ([msg("user", "  "), msg("assistant", "b")], [], "(user) is empty"),
        ([msg("user", "a"), msg("assistant", "")], [], "(assistant) is empty"),
        ([msg("user", "<image>a"), msg("assistant", "b")], [], "1 <image> placeholder(s) but 0 image(s)"),
        ([msg("user", "a"), msg("assistant", "b")], ["x.jpg"], "0 <image> placeholder(s) but 1 image(s)"),
        ([msg("system", "s")], [], "only a system message"),
    ],
)
def test_rule_violations_are_named(messages, images, expected):
    with pytest.raises(ValidationError) as info:
        sample(messages, images)
    assert expected in str(info.value)


def test_unknown_role_rejected_by_model():
    with pytest.raises(ValidationError):
        sample([msg("human", "a"), msg("gpt", "b")])


def test_empty_answer_allowed_only_for_prediction_sets():
    messages = [msg("user", "<image>read it"), msg("assistant", "")]
    with pytest.raises(ValidationError):
        sample(messages, ["a.png"])
    assert sample(messages, ["a.png"], context={"allow_empty_answer": True}).images == ["a.png"]


def test_problems_lists_every_violation():
    problems = conversation_problems([("user", ""), ("user", "<image>")], n_images=0)
    assert any("alternate" in p for p in problems)
    assert any("placeholder" in p for p in problems)
    assert any("empty" in p for p in problems)


def test_schema_has_messages_and_images():
    schema = sample_json_schema()
    assert {"messages", "images", "videos"} <= set(schema["properties"])
