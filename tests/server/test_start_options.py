"""The original's options (issue 15): every option its examples pass is accepted and
works. Options are checked again at start, so the attribute form (`app.metrics_port = -1`
before start) is refused like the keyword. `enable_auth` (tests/server/test_gateway.py),
`rate_limit` (tests/server/test_rate_limits.py), `enable_monitoring` with DataFlow's
`enable_metrics` (tests/server/test_metrics.py) and `enable_caching`
(tests/dataflow/test_df_cache.py) work now."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dataflow import DataFlow, ValidationError
from nexus_server import Nexus


@pytest.mark.parametrize("value", [None, False])
@pytest.mark.parametrize("option", ["enable_auth", "enable_monitoring", "rate_limit"])
def test_nexus_accepts_them_unset(option: str, value: Any) -> None:
    app = Nexus(**{option: value})
    assert getattr(app, option) is value


def test_nexus_accepts_the_originals_ports_and_discovery() -> None:
    app = Nexus(api_port=8000, mcp_port=3001, auto_discovery=False, cors_origins=["*"])
    assert (app.api_port, app.mcp_port, app.auto_discovery) == (8000, 3001, False)
    assert app.cors_origins == ("*",)
    off = Nexus(api_port=None, mcp_port=None)
    assert off.api_port is None and off.mcp_port is None


@pytest.mark.parametrize("value", [True, None])
def test_durability_on_is_accepted(value: bool | None) -> None:
    assert Nexus(enable_durability=value).enable_durability is value


def test_durability_off_is_refused_saying_what_it_keeps() -> None:
    with pytest.raises(ValueError, match=r"enable_durability=False.*request_id"):
        Nexus(enable_durability=False)


async def test_the_attribute_form_is_refused_at_start() -> None:
    app = Nexus(grpc_port=0, api_port=None, mcp_port=None, enable_monitoring=True)
    app.metrics_port = -1
    with pytest.raises(ValueError, match="metrics_port"):
        async with app.serving():
            pytest.fail("served despite a refused option")


def test_the_attribute_form_makes_start_exit_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    app = Nexus(grpc_port=0, api_port=None, mcp_port=None)
    app.expose_metrics = True  # without enable_monitoring
    with pytest.raises(SystemExit) as caught:
        app.start()
    assert caught.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "expose_metrics=True" in err[0] and "enable_monitoring" in err[0]
    assert not (tmp_path / "nexus.db").exists()


@pytest.mark.parametrize("value", [None, False])
async def test_dataflow_accepts_them_unset(value: bool | None) -> None:
    db = DataFlow("sqlite:///:memory:", enable_metrics=value, enable_caching=value)
    await db.close()


@pytest.mark.parametrize("size", [0, -1, True, "20"])
def test_connection_pool_size_must_be_a_positive_integer(size: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        DataFlow("sqlite:///:memory:", connection_pool_size=size)
    assert caught.value.field == "connection_pool_size"


async def test_the_originals_dataflow_options_work_on_postgres(pg_url: str) -> None:
    """`connection_pool_size=20` sizes the pool; `enable_model_persistence=False` writes
    no registry table; the rest of the original's settings are accepted."""
    db = DataFlow(
        pg_url,
        enable_model_persistence=False,
        auto_migrate=True,
        skip_migration=False,
        enable_metrics=False,
        enable_caching=False,
        connection_pool_size=20,
    )
    try:
        await db.initialize()
        assert db._pg_pool.get_max_size() == 20
        tables = await db.run_sync(
            lambda conn: set(
                conn.exec_driver_sql(
                    "select tablename from pg_tables where schemaname = current_schema()"
                ).scalars()
            )
        )
        assert "dataflow_model_registry" not in tables
    finally:
        await db.close()
