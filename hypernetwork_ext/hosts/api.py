"""HTTP routes under ``/hypernetworks/v1``, guarded by the host's ``--api-auth`` when it is set.

Routes added in ``on_app_started`` do not get the host's API authentication by themselves (the
host adds it only to its own ``/sdapi`` routes), so the same HTTP Basic check is applied here.
"""

from __future__ import annotations

from collections.abc import Callable
from secrets import compare_digest

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from ..errors import HypernetworkError, PathEscapeError, UnknownNetworkError
from ..library import Library

PREFIX = "/hypernetworks/v1"


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """``user:password,user2:password2`` (the host's ``--api-auth``) as a dict."""
    credentials = {}
    for pair in (api_auth or "").split(","):
        user, sep, password = pair.strip().partition(":")
        if sep and user:
            credentials[user] = password
    return credentials


def _auth_dependency(credentials: dict[str, str]):
    basic = HTTPBasic()

    def check(given: HTTPBasicCredentials = Depends(basic)) -> bool:  # noqa: B008 (FastAPI's idiom)
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password, expected):
            return True
        raise HTTPException(
            status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"}
        )

    return check


def auth_dependencies(credentials: dict[str, str] | None) -> list:
    """The route dependencies that apply the host's ``--api-auth`` (none when it is not set)."""
    return [Depends(_auth_dependency(credentials))] if credentials else []


def add_routes(
    app: FastAPI,
    library: Library,
    *,
    credentials: dict[str, str] | None = None,
    memory: Callable[[], dict] | None = None,
) -> APIRouter:
    dependencies = auth_dependencies(credentials)
    router = APIRouter(prefix=PREFIX, dependencies=dependencies)

    if memory is not None:

        @router.get("/memory")
        def held_memory() -> dict:
            """What the fast paths hold between generations (bytes per device and kind), the fold
            limit and the last releases."""
            return memory()

    @router.get("/networks")
    def list_networks(hashes: bool = False) -> list:
        """Every network with its metadata; ``hashes=true`` computes missing sha256 hashes first."""
        return [library.describe(entry, compute_hash=hashes) for entry in library.entries]

    @router.post("/refresh")
    def refresh() -> dict:
        entries = library.refresh()
        return {"count": len(entries), "folders": library.folders()}

    @router.get("/networks/{name:path}")
    def one_network(name: str) -> dict:
        try:
            resolution = library.resolve(name)
        except PathEscapeError as exc:
            raise HTTPException(status_code=403, detail=str(exc)) from None
        except UnknownNetworkError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except HypernetworkError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return {**library.describe(resolution.entry), "resolved_by": resolution.how}

    app.include_router(router)
    return router
