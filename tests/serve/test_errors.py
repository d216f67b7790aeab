import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from lmforge.serve.errors import describe_validation_error, error_body
from lmforge.serve.schemas import CompletionRequest


def validation_error(**fields) -> RequestValidationError:
    with pytest.raises(ValidationError) as info:
        CompletionRequest(**fields)
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])


def test_validation_errors_name_the_field_without_the_body_prefix():
    # (ranges are SamplingParams'; the schema checks types and shapes)
    message, param = describe_validation_error(validation_error(prompt="x", temperature="hot"))
    assert param == "temperature"
    assert message.startswith("temperature: ") and "number" in message


def test_custom_validator_messages_lose_pydantics_prefix():
    message, _ = describe_validation_error(validation_error(prompt="x", logit_bias={"a": 1}))
    assert "Value error" not in message and "token ids" in message


def test_several_problems_are_counted():
    message, _ = describe_validation_error(validation_error(prompt="x", temperature="hot", top_p=[0]))
    assert message.endswith("(and 1 more problem(s))")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (429, "rate_limit_error"),
        (418, "i'm_a_teapot"),
        (499, "error"),
    ],
)
def test_error_envelope(status, kind):
    body = error_body(status, "message", "param", "code")
    assert body == {"error": {"message": "message", "type": kind, "param": "param", "code": "code"}}
