"""The catalog's web UI (``/``, ``/static/...``), the page that lists the API offline (``/docs``), and what
each error type means (``/problems/{type}``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from services.sight_catalog.problems import PROBLEMS, Problem
from services.sight_catalog.routes.common import Catalog

#: Where the web UI's files are.
WEB = Path(__file__).resolve().parent.parent / "web"


def add_routes(app: FastAPI, catalog: Catalog) -> None:
    """``/problems/{kind}``, ``/``, ``/docs`` and ``/static``."""

    @app.get("/problems/{kind}", tags=["docs"], summary="What an error type means", response_model=None)
    def problem_type(kind: str) -> JSONResponse:
        """The status, title and meaning of an error ``type``."""
        if kind not in PROBLEMS:
            raise Problem("not-found", f"no problem type {kind!r}; the types are {', '.join(PROBLEMS)}")
        status, title, meaning = PROBLEMS[kind]
        return JSONResponse(
            {"type": f"/problems/{kind}", "status": status, "title": title, "meaning": meaning}
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(WEB / "docs.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
