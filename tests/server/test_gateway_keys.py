"""API keys: new keys work and revoked keys stop working within about two seconds of the
database change, and a secret never shows up in logs, error bodies, /metrics or on disk."""

from __future__ import annotations

import contextlib
import logging
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from harness import IGNORE_REQUEST_KEY_WARNING, Hub, wait_until

from tokenhub.store import StoreError

pytestmark = IGNORE_REQUEST_KEY_WARNING

MESSAGES = [{"role": "user", "content": "hello"}]


def _works(client: openai.OpenAI) -> bool:
    try:
        client.models.list()
    except openai.AuthenticationError:
        return False
    return True


def test_new_key_works_and_revoked_key_is_refused_within_2s(hub: Hub) -> None:
    with contextlib.suppress(StoreError):  # made by an earlier run in the same session
        hub.store.create_tenant("globex")
    key, secret = hub.store.create_key("globex")
    with hub.client(api_key=secret) as c:
        t0 = time.monotonic()
        wait_until(lambda: _works(c), 2.0, interval=0.05, what="the new key to be accepted")
        accepted_after = time.monotonic() - t0

        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        event = hub.event(raw.headers["x-request-id"])
        assert (event.tenant, event.key_id, event.status) == ("globex", key.id, 200)

        hub.store.revoke_key(key.id)
        t0 = time.monotonic()
        wait_until(lambda: not _works(c), 2.0, interval=0.05, what="the key to be refused")
        refused_after = time.monotonic() - t0
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert accepted_after < 2.0 and refused_after < 2.0


def _files(directory: Path) -> list[Path]:
    return [f for f in directory.rglob("*") if f.is_file()]


def test_secrets_never_leak(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenhub")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    key, secret = hub.store.create_key("acme")
    wrong = secret[:-4] + ("abcd" if not secret.endswith("abcd") else "wxyz")
    with hub.client(api_key=secret) as c:
        wait_until(lambda: _works(c), 2.0, what="the new key to be accepted")
    seen: list[str] = []  # everything the clients got back

    with hub.client(api_key=secret) as c:
        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        seen += [raw.text, str(raw.headers)]
        with c.chat.completions.with_streaming_response.create(
            model="failover", messages=MESSAGES, stream=True
        ) as resp:
            seen += [resp.read().decode(), str(resp.headers)]
        for model in ("broken", "limited", "no-such-model"):
            with pytest.raises(openai.APIStatusError) as e:
                c.chat.completions.create(model=model, messages=MESSAGES)
            seen += [e.value.response.text, str(e.value.response.headers)]
    with hub.client(api_key=wrong) as c, pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    seen += [e.value.response.text, str(e.value.response.headers)]

    hub.store.revoke_key(key.id)
    with hub.client(api_key=secret) as c:
        wait_until(lambda: not _works(c), 2.0, what="the revoked key to be refused")
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        seen += [e.value.response.text, str(e.value.response.headers)]

    with urllib.request.urlopen(hub.base + "/metrics", timeout=5) as resp:
        seen.append(resp.read().decode())
    hub.settle()

    # The check is not vacuous: the gateway did log (the failover and the failures).
    assert any(r.name.startswith("tokenhub") for r in caplog.records)
    for s in (secret, wrong):
        assert s not in caplog.text
        for text in seen:
            assert s not in text
        # The database with its -wal and -shm files, and the usage journal.
        files = [*hub.db_path.parent.glob(hub.db_path.name + "*"), *_files(hub.journal_dir)]
        assert len(files) >= 2
        for f in files:
            assert s.encode() not in f.read_bytes(), f
