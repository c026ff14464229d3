"""The vendored metrics table stays equal to section 4 of the shared contract (when it is present)."""

from __future__ import annotations

import pytest

from tests.deploy.contract import VENDORED, load_metrics, shared_contract


def test_vendored_metrics_table_matches_the_shared_contract() -> None:
    shared = shared_contract()
    if shared is None:
        pytest.skip("no ../shared beside this clone: the vendored copy is the reference")
    assert load_metrics(VENDORED) == load_metrics(shared)


def test_vendored_table_lists_every_contract_metric() -> None:
    assert len(load_metrics(VENDORED)) == 13
