"""mask_url: no credential of a URL survives; everything else does."""

from __future__ import annotations

from hypothesis import given, strategies as st

from batchrun.urls import mask_url


def test_passwords_tokens_and_secret_parameters_are_masked():
    assert mask_url("https://user:tok3n@gateway.example/v1") == "https://user:***@gateway.example/v1"
    assert mask_url("https://tok3n@gateway.example/v1") == "https://***@gateway.example/v1"
    assert mask_url("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert mask_url("rediss://default:pw@[::1]:6380/2") == "rediss://default:***@[::1]:6380/2"
    assert mask_url("https://x.openai.azure.com/openai?api-version=2024-10-21&api-key=abc") == \
        "https://x.openai.azure.com/openai?api-version=2024-10-21&api-key=***"


def test_urls_without_secrets_are_unchanged():
    for url in ("https://api.openai.com/v1", "http://127.0.0.1:8000/v1", "redis://127.0.0.1:6379/13",
                "memory://", "https://host/v1?api-version=2024-10-21"):
        assert mask_url(url) == url


def test_a_malformed_url_still_loses_its_credentials():
    assert "pw" not in mask_url("https://u:pw@host:notaport/v1")


@given(user=st.text(alphabet="abcdefghij", min_size=1, max_size=8),
       secret=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=6, max_size=20))
def test_no_secret_survives(user, secret):
    for url in (f"https://{user}:{secret}@h.example/v1", f"https://{secret}@h.example/v1",
                f"https://h.example/v1?token={secret}", f"redis://:{secret}@h:6379/0"):
        assert secret not in mask_url(url)
