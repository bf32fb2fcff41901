"""Push the robustness dashboard and its Prometheus data source to a running Grafana.

Uses grafana-client (the maintained fork of the `grafana-api` package DESIGN.md names) with a
service-account token only: never `GrafanaApi.from_env()`, whose fallback without a URL is
admin:admin on localhost. Idempotent: a folder of its own (found or created by uid), the data
source created or updated under its fixed uid, the dashboard saved under its uid with overwrite.
Before the dashboard is saved, Grafana itself checks that the data source's Prometheus answers
(its data-source health API, so the URL is tried as Grafana reaches it, which may differ from
how this machine would); if it does not, the folder and data source are put back as they were.
Every failure a user can meet (Grafana unreachable, token refused, a server error, Prometheus
absent) becomes one `MsaSearchError` line naming the URL and the step.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import niquests
from grafana_client import GrafanaApi
from grafana_client.client import (GrafanaClientError, GrafanaException, GrafanaServerError, GrafanaTimeoutError,
                                   GrafanaUnauthorizedError, TokenAuth)

from data_pipeline.errors import MsaSearchError

from .dashboards import (DASHBOARD_TITLE, DATASOURCE_UID, DEFAULT_PROMETHEUS_URL, FOLDER_TITLE, FOLDER_UID,
                         dashboard_json, datasource_settings)

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PushResult:
    folder: str       # "found" or "created"
    datasource: str   # "created", "updated" or "kept (provisioned, read-only)"
    dashboard_url: str
    prometheus: str = "answers"  # or "not checked (...)" where Grafana has no health API


def push_dashboards(url: str, token: str, prometheus_url: str = DEFAULT_PROMETHEUS_URL,
                    timeout: float = DEFAULT_TIMEOUT_S) -> PushResult:
    """Creates or updates the folder, the data source and the dashboard on the Grafana at `url`."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise MsaSearchError(f"--url '{url}': expected http(s)://HOST[:PORT][/PATH] of a Grafana server")
    if parsed.username or parsed.password:
        raise MsaSearchError(f"--url '{parsed.hostname}': leave the user and password out; "
                             "the token comes from GRAFANA_TOKEN")
    if not token:
        raise MsaSearchError("GRAFANA_TOKEN is empty: export a Grafana service-account token (Editor role); "
                             "no default user or password is tried")
    # grafana-client appends "api" to the path as given: a path prefix needs its trailing slash.
    api_url = parsed._replace(path=parsed.path if parsed.path.endswith("/") else parsed.path + "/").geturl()
    api = GrafanaApi.from_url(api_url, credential=TokenAuth(token), timeout=timeout)
    base = url.rstrip("/")

    with _step(base, "looking up the folder"):
        folder = _missing_is_none(lambda: api.folder.get_folder(FOLDER_UID))
    if folder is None:
        with _step(base, "creating the folder"):
            api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)

    settings = datasource_settings(prometheus_url)
    with _step(base, "looking up the data source"):
        existing = _missing_is_none(lambda: api.datasource.get_datasource_by_uid(DATASOURCE_UID))
    if existing is None:
        with _step(base, "creating the data source"):
            api.datasource.create_datasource(settings)
        datasource = "created"
    elif existing.get("readOnly"):  # provisioned from dashboards/provisioning: Grafana refuses edits
        datasource = "kept (provisioned, read-only)"
    else:
        with _step(base, "updating the data source"):
            api.datasource.update_datasource_by_uid(DATASOURCE_UID, settings)
        datasource = "updated"

    # A dashboard over a Prometheus that does not answer would only show "No data".
    try:
        with _step(base, "checking the data source's Prometheus"):
            prometheus = _prometheus_health(api)
    except MsaSearchError as exc:
        raise MsaSearchError(f"{exc}; {_undo(api, folder is None, datasource, existing)}") from exc
    if prometheus.startswith("ERROR: "):
        used = (f"--prometheus-url '{prometheus_url}'" if existing is None or not existing.get("readOnly")
                else f"the provisioned data source's URL '{existing.get('url', '?')}'")
        undone = _undo(api, folder is None, datasource, existing)
        raise MsaSearchError(f"{used}: expected a Prometheus that Grafana at {base} can query, found "
                             f"{prometheus.removeprefix('ERROR: ')}; {undone}; start Prometheus (README, Live "
                             "metrics) or give its URL as Grafana reaches it")

    board = json.loads(dashboard_json())
    with _step(base, "saving the dashboard"):
        saved = api.dashboard.update_dashboard({"dashboard": board, "folderUid": FOLDER_UID, "overwrite": True,
                                                "message": f"msa-search dashboards push: {DASHBOARD_TITLE}"})
    # Grafana answers with the dashboard's path, its sub-path (if served from one) included.
    path = saved.get("url", "") if isinstance(saved, dict) else ""
    origin = f"{parsed.scheme}://{parsed.netloc}"
    return PushResult(folder="created" if folder is None else "found", datasource=datasource,
                      dashboard_url=origin + path if path.startswith("/") else base, prometheus=prometheus)


def _prometheus_health(api: GrafanaApi) -> str:
    """What Grafana's health check of the data source finds: `answers`, `ERROR: <its reason>`, or
    `not checked (...)` on a Grafana without the data-source health API (before 9)."""
    try:
        answer = api.datasource.health(DATASOURCE_UID)
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return "not checked (this Grafana has no data-source health API)"
        if exc.status_code != 400:  # Grafana answers 400 with {status: ERROR, message} for a failed check
            raise
        answer = exc.response
    if isinstance(answer, dict) and answer.get("status") == "OK":
        return "answers"
    message = answer.get("message") if isinstance(answer, dict) else answer
    return f"ERROR: {_one_line(str(message or 'no answer'))}"


def _undo(api: GrafanaApi, folder_created: bool, datasource: str, previous: dict | None) -> str:
    """Put the data source and folder back as they were before this push; says how that went."""
    try:
        if datasource == "created":
            api.datasource.delete_datasource_by_uid(DATASOURCE_UID)
        elif datasource == "updated":
            # Without its version: Grafana refuses an update older than the one just made.
            api.datasource.update_datasource_by_uid(DATASOURCE_UID, {k: v for k, v in previous.items()
                                                                     if k != "version"})
        if folder_created:
            api.folder.delete_folder(FOLDER_UID)
    except (GrafanaException, niquests.exceptions.RequestException) as exc:
        return f"undoing this push failed too ({_root_cause(exc)}): check folder and data source {DATASOURCE_UID}"
    return "nothing was changed"


def _missing_is_none(get):
    try:
        return get()
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return None
        raise


@contextmanager
def _step(url: str, what: str) -> Iterator[None]:
    """Turns what grafana-client and niquests raise into one line naming the Grafana and the step."""
    try:
        yield
    except (GrafanaException, niquests.exceptions.RequestException) as exc:
        raise MsaSearchError(_message(exc, f"Grafana at {url}", what)) from exc


def _message(exc: Exception, where: str, what: str) -> str:
    if isinstance(exc, GrafanaUnauthorizedError):
        return (f"{where} refused the token in GRAFANA_TOKEN (401 Unauthorized) while {what}: "
                "use a valid service-account token")
    if isinstance(exc, GrafanaClientError) and exc.status_code == 403:
        return f"{where} denied {what} (403 Forbidden): the token's service account needs the Editor role{_detail(exc)}"
    if isinstance(exc, GrafanaClientError) and exc.status_code == 404:
        return f"{where} has no API for {what} (404 Not Found): is --url Grafana's base URL?"
    if isinstance(exc, GrafanaClientError):
        return f"{where} refused {what} ({exc.status_code}){_detail(exc)}"
    if isinstance(exc, GrafanaServerError):
        return f"{where} failed while {what} (server error {exc.status_code}){_detail(exc)}"
    if isinstance(exc, GrafanaTimeoutError):
        return f"{where} did not answer in time while {what}"
    # grafana-client lets niquests' connection errors through unwrapped.
    return f"cannot reach {where} while {what}: {_root_cause(exc)}"


def _detail(exc: GrafanaException) -> str:
    response = exc.response
    text = response.get("message") if isinstance(response, dict) else response
    return f": {_one_line(str(text))}" if text else ""


def _root_cause(exc: BaseException) -> str:
    """The innermost reason ("[Errno 111] Connection refused"), not urllib3's retry wrapper around it."""
    for _ in range(10):
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc.__cause__
        if inner is None:
            break
        exc = inner
    text = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>:\s*", "", str(exc))
    return _one_line(text) or type(exc).__name__


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
