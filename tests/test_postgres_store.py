"""What only the PostgreSQL store does; the behaviours every store shares are in
test_store_contract.py, which runs on PostgreSQL too."""

from __future__ import annotations

import psycopg
import pytest
import trio

from adapters.postgres_store import PostgresStore, PostgresStoreError
from runtime import Message, RunRecord, TextBlock
from tests.gateway_client import open_client
from tests.gateways import gateway_process
from tests.services import Postgres, postgres_fixture  # noqa: F401 (the fixture)

QUICK = "Hi.\n#sim words=5 rate=100"


async def test_statement_timeout_bounds_a_call_without_a_deadline(postgres: Postgres) -> None:
    url = postgres.create_database()
    async with PostgresStore(url, statement_timeout=0.3) as store:
        record = RunRecord(run_id="r1", session_key="s", status="running", started_at=0)
        prompt = Message("user", (TextBlock("hi"),), 0, {"run_id": "r1"})
        with psycopg.connect(url) as other, trio.fail_after(10):
            other.execute("LOCK TABLE runs IN EXCLUSIVE MODE")
            started = trio.current_time()
            with pytest.raises(PostgresStoreError, match=r"statement_timeout 0\.3 s"):
                await store.begin_run(record, prompt)
            assert trio.current_time() - started < 3
            other.rollback()
        assert await store.history("s") == []
        await store.begin_run(record, prompt)
        assert [m.text for m in await store.history("s")] == ["hi"]


async def test_an_unreachable_server_is_one_sentence_without_the_password(tmp_path) -> None:
    url = f"postgresql://me:secret@/nowhere?host={tmp_path}"
    with trio.fail_after(30), pytest.raises(PostgresStoreError) as caught:
        async with PostgresStore(url, connect_timeout=1):
            pass
    message = str(caught.value)
    assert "could not be reached" in message and "Check that the server is up" in message
    assert "secret" not in message


async def test_a_server_restart_is_survived(postgres: Postgres) -> None:
    """Connections the server dropped are replaced: the call that met one fails with a
    sentence, the store goes on."""
    url = postgres.create_database()
    async with PostgresStore(url, pool_size=2) as store:
        await store.sessions()
        killed = postgres.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{url.split('?')[0].rsplit('/', 1)[1]}'"
        )
        assert killed.count("True") == 2  # both of the pool's connections
        with trio.fail_after(30):
            for _ in range(3):  # each broken connection fails once, then is replaced
                try:
                    await store.sessions()
                except PostgresStoreError as exc:
                    assert "could not be reached" in str(exc)
            assert await store.sessions() == []


async def test_serve_with_a_postgresql_url_keeps_history_there(postgres: Postgres, env) -> None:
    url = postgres.create_database()
    with trio.fail_after(60):
        async with gateway_process(env, "--db", url) as gateway:
            name = url.split("?")[0].rsplit("/", 1)[1]
            assert f"db PostgreSQL database {name} at {postgres.folder}" in gateway.banner
            assert "postgres@" not in gateway.banner
            async with open_client(gateway.port) as client:
                params = {"sessionKey": "s", "message": QUICK, "idempotencyKey": "r1"}
                await client.ok("chat.send", params)
                await client.wait_chat("r1", "final")
            gateway.process.terminate()
            await gateway.process.wait()
    async with PostgresStore(url) as store:
        history = await store.history("s")
        assert [m.role for m in history] == ["user", "assistant"]
        assert (await store.get_run("r1")).status == "finished"
