import pytest

from lmforge.data.document import Document
from lmforge.data.pii import PiiRedactor, find_pii, luhn_valid
from lmforge.data.step import STEPS


def redact(text: str, **kwargs) -> str:
    return PiiRedactor(**kwargs).redact(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mail jane.doe+news@example.co.uk today.", "Mail <EMAIL> today."),
        ("Contact: a_b@mail-server.example.org", "Contact: <EMAIL>"),
        ("Call +1 (415) 555-0132 now", "Call <PHONE> now"),
        ("London: +44 20 7946 0958.", "London: <PHONE>."),
        ("Seoul +82 10-1234-5678", "Seoul <PHONE>"),
        ("휴대폰 010-1234-5678 로 연락", "휴대폰 <PHONE> 로 연락"),
        ("Office (415) 555-0132 or 415.555.0132", "Office <PHONE> or <PHONE>"),
        ("UK office 020 7946 0958", "UK office <PHONE>"),
        ("Toll-free 1-800-555-0199 or 1 (800) 555-0199.", "Toll-free <PHONE> or <PHONE>."),
        ("Server at 8.8.8.8 responded", "Server at <IP> responded"),
        ("IPv6 2001:4860:4860::8888 is public", "IPv6 <IP> is public"),
        ("Card 4111 1111 1111 1111 expires", "Card <CREDIT_CARD> expires"),
        ("Card 4111-1111-1111-1111.", "Card <CREDIT_CARD>."),
        ("Amex 3782 822463 10005 ok", "Amex <CREDIT_CARD> ok"),
        ("MC 5500000000000004", "MC <CREDIT_CARD>"),
        ("주민등록번호 900101-1234567 입니다", "주민등록번호 <KR_RRN> 입니다"),
        ("born 2000: 000229-3234567", "born 2000: <KR_RRN>"),
        ("api_key=sk_live_abcdef123456", "api_key=<SECRET>"),
        ('{"token": "abcd1234efgh5678"}', '{"token": "<SECRET>"}'),
        ("password: correcthorsebattery", "password: <SECRET>"),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY=<SECRET>"),
        ("key id AKIAIOSFODNN7EXAMPLE in logs", "key id <SECRET> in logs"),
        ("ghp_" + "a" * 36 + " leaked", "<SECRET> leaked"),
        ("Call 415 555 0132 today", "Call <PHONE> today"),
        ("or 1 415 555 0132.", "or <PHONE>."),
        ("Phone: 4155550132", "Phone: <PHONE>"),
        ("call me at 14155550132!", "call me at <PHONE>!"),
        ("tel. no. 2125550199", "tel. no. <PHONE>"),
        ("휴대폰 01023456789 로 연락", "휴대폰 <PHONE> 로 연락"),
        ("mobile 0111234567", "mobile <PHONE>"),
        ("주민등록번호 9001011234568 입니다", "주민등록번호 <KR_RRN> 입니다"),
        ("RRN 0002293234563", "RRN <KR_RRN>"),
        ("Server 4.1.2.3 is down", "Server <IP> is down"),
    ],
)
def test_positives(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Released version 1.2.3 and v1.2.3.4 today.",
        "Meeting on 2024-01-15 at 12:30:45.",
        "ISBN 978-3-16-148410-0 and 9783161484100",
        "Order 4111 1111 1111 1112 is not a valid card",  # fails Luhn
        "Invoice 1234567812345678",  # fails Luhn
        "Router 192.168.1.1, host 10.0.0.7, loopback 127.0.0.1 and ::1, link fe80::1",
        "Documentation range 2001:db8::1 and 999.1.1.1",
        "Dates 901332-1234567 and 990230-1234567 are not birth dates",
        "The secret: keep calm. password: short",
        "token counts: 12345678 and max_tokens: 100000000",
        "user@localhost and @handle on social media",
        "pi is 3.14159265 and population 1,234,567",
        "password=<PASSWORD>",
        "Upgrade to version 1.2.3.4 now; see Section 4.1.2.3 and § 8.8.8.8.",
        "Released v. 2.0.1.5 (build 5.6.7.8), Rev 3.3.3.3, table 9.1.2.3",
        "Order 4155550132 shipped; 12 items, total 2125550199 units",  # bare digits, no phone word
        "Serial 9001011234567 fails the RRN check digit",
        "ID 9013321234568 is no birth date",
        "Count 0102345678901 is too long for a mobile",
    ],
)
def test_tricky_negatives_are_kept(text):
    assert redact(text) == text


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")


def test_private_ips_redacted_only_when_asked():
    text = "LAN 192.168.1.1 and public 1.1.1.1"
    assert redact(text) == "LAN 192.168.1.1 and public <IP>"
    assert redact(text, public_ips_only=False) == "LAN <IP> and public <IP>"


def test_priority_resolves_overlaps():
    # The phone-like value of a secret is reported once, as a secret.
    text = "password=+14155550132"
    assert find_pii(text, types=["phone"]) == [(9, 21, "phone")]
    assert find_pii(text) == [(9, 21, "secret")]


def test_step_counts_per_type_and_custom_tokens():
    step = PiiRedactor(replacements={"email": "[mail]"}, types=["email", "phone"])
    assert STEPS["pii"] is PiiRedactor
    doc = Document("d", "a@b.io, c@d.io, +1 415 555 0132, 8.8.8.8")
    out = step.process(doc)
    assert out.text == "[mail], [mail], <PHONE>, 8.8.8.8"
    assert step.stats.counters == {"pii_email": 2, "pii_phone": 1, "pii_docs_changed": 1}
    with pytest.raises(ValueError, match="unknown PII types"):
        PiiRedactor(types=["ssn"])


def test_secret_keys_need_a_word_start_or_prefix_separator():
    assert redact("my-api-key: abcdefgh1234") == "my-api-key: <SECRET>"
    assert redact("notsecret=abcdefgh1234") == "notsecret=abcdefgh1234"


def test_secret_case_is_kept_and_offsets_survive_length_changing_lowercase():
    assert redact("API_KEY=AbCdEfGh1234") == "API_KEY=<SECRET>"
    # "İ".lower() is two characters long; the match must still land on the right span.
    assert redact("İstanbul token=AbCdEfGh1234 end") == "İstanbul token=<SECRET> end"
