"""HTTP in front of a fleet, on Ray Serve: `fd-ray-sync serve --name N`, or `serve_fleet()`.

Routes (FastDeploy's control names and meanings; OpenAI's completions):

    POST /v1/completions        {"prompt", "max_tokens"}: every response names the weight
                                version that produced it ("weight_version", and the header
                                X-Weight-Version); one request runs on one replica
    GET  /v1/models
    POST /v1/pause?mode=        abort | wait (default) | keep  (actors/front.py)
    POST /v1/resume
    GET  /v1/is_paused
    POST /v1/sleep?tags=&level= tags: weights, kv_cache (default both); level 1 or 2
    POST /v1/wakeup?tags=
    POST /v1/update_weights     {"version", "path": a snapshot folder every node reads,
                                "force"}: the fleet's all-or-nothing update
    GET  /v1/weights/status     version, each replica's version and gate, the update running
    GET  /health                200 while a replica serves, else 503

Every route but completions, models and health is a control route: it needs
`Authorization: Bearer <token>` (401 without it, 403 with another). The token comes from
the environment (`FD_RAY_SYNC_TOKEN`) or a file (`--token-file`); the deployment holds
only its SHA-256. Bad parameters get 422 (a body or query field, named) or 400 (a value
the fleet refuses, its error naming it); nothing changes on a refusal. Requests go from the
Serve replica straight to the fleet's replicas (`fd_ray_sync.routing.Router`): the Serve
deployment adds no queue of its own beyond `max_ongoing_requests`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route parameters'
# annotations at runtime to tell a JSON body from query parameters.

import hashlib
import hmac
import os
import time
import uuid
from typing import Literal

import ray
from fastapi import FastAPI, Header, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from fd_ray_sync.errors import (
    ConfigError,
    RankFailed,
    RequestAborted,
    SnapshotError,
    StateError,
    VersionError,
    WeightMismatchError,
    WeightSyncError,
)
from fd_ray_sync.routing import Router
from fd_ray_sync.sleep import sleep_tags
from fd_ray_sync.sources.snapshot import SnapshotSpec
from fd_ray_sync.version import validate_version

TOKEN_ENV = "FD_RAY_SYNC_TOKEN"
app = FastAPI(title="fd-ray-sync", description="A fleet's completions and weight control.")


class CompletionRequest(BaseModel):
    """OpenAI's completion request, as far as the fleet's engines go (greedy decoding)."""

    model_config = ConfigDict(extra="ignore")  # temperature, top_p...: not used by the engine

    prompt: str | list[str] = Field(description="One prompt or several (one batch).")
    max_tokens: int = Field(16, ge=1, le=4096)
    model: str | None = None
    n: Literal[1] = Field(1, description="One completion per prompt.")
    stream: Literal[False] = Field(False, description="Streaming is not offered.")


class UpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="A snapshot folder every node of the fleet can read.")
    version: str | int | None = Field(None, description="Default: the folder's version.yaml.")
    force: bool = False


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_token(path: str | None = None) -> str:
    """The control token: from `path` when given, else from $FD_RAY_SYNC_TOKEN."""
    if path is not None:
        with open(path) as f:
            token = f.read().strip()
        where = f"token file {path}"
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
    if not token:
        raise ConfigError(
            f"no control token: {where} is empty; set ${TOKEN_ENV} or pass --token-file "
            "(the control routes refuse every request without one)"
        )
    return token


REFUSALS = (ConfigError, VersionError, SnapshotError, WeightMismatchError)


def _status_code(error: WeightSyncError, serving_route: bool) -> int:
    if isinstance(error, RequestAborted):
        return 503
    if isinstance(error, REFUSALS):
        return 400
    if isinstance(error, RankFailed) and not error.lost and error.errors:
        # Every rank refused the input in prepare (a bad folder, a wrong shape): the
        # request's fault, and nothing changed.
        if all(isinstance(e, REFUSALS) for e in error.errors.values()):
            return 400
    if isinstance(error, StateError):
        return 503 if serving_route else 409
    return 500


def _error(error: Exception, serving_route: bool = False) -> JSONResponse:
    if not isinstance(error, WeightSyncError):
        raise error
    kind = "aborted" if isinstance(error, RequestAborted) else type(error).__name__
    return JSONResponse(
        {"error": {"type": kind, "message": str(error)}},
        status_code=_status_code(error, serving_route),
    )


async def _call(method, *args):
    """A coordinator call's answer, its fd-ray-sync error raised as itself."""
    try:
        return await method.remote(*args)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, WeightSyncError):
            raise e.cause from None
        raise


def _tags(tags: str | None) -> tuple[str, ...] | None:
    """`weights,kv_cache` (FastDeploy writes `weight`) -> the fleet's tag names, checked."""
    if tags is None or not tags.strip():
        return None
    return sleep_tags(["weights" if t.strip() == "weight" else t.strip() for t in tags.split(",")])


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class FleetService:
    def __init__(self, fleet: str, namespace: str, digest: str, timeout_s: float = 120.0):
        self.fleet, self.digest = fleet, digest
        self.coordinator = ray.get_actor(fleet, namespace=namespace)
        self.router = Router(self.coordinator, fleet, timeout_s)

    def _authorize(self, authorization: str | None) -> None:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(
                401,
                "control routes need an Authorization: Bearer <token> header",
                headers={"WWW-Authenticate": "Bearer"},
            )
        presented = token_digest(authorization.removeprefix("Bearer ").strip())
        if not hmac.compare_digest(presented, self.digest):
            raise HTTPException(403, "the bearer token is not this fleet's control token")

    # --- serving -------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            return _error(ConfigError("prompt: an empty list"))
        try:
            results = await self.router.agenerate(prompts, body.max_tokens)
        except WeightSyncError as e:
            return _error(e, serving_route=True)
        version = results[0].version
        return JSONResponse(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.model or self.fleet,
                "choices": [
                    {"index": i, "text": r.text, "finish_reason": "length", "logprobs": None}
                    for i, r in enumerate(results)
                ],
                "weight_version": version,
                "replica": results[0].replica,
            },
            headers={"X-Weight-Version": version},
        )

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.fleet, "object": "model"}]}

    @app.get("/health")
    async def health(self):
        status = await self.coordinator.status.remote()
        body = {"serving": status["serving"], "version": status["version"]}
        return JSONResponse(body, status_code=200 if status["serving"] else 503)

    # --- control -------------------------------------------------------------------------

    @app.post("/v1/pause")
    async def pause(
        self,
        mode: Literal["abort", "wait", "keep"] = Query("wait"),
        authorization: str | None = Header(None),
    ):
        self._authorize(authorization)
        return await self._control(self.coordinator.pause_serving, mode)

    @app.post("/v1/resume")
    async def resume(self, authorization: str | None = Header(None)):
        self._authorize(authorization)
        return await self._control(self.coordinator.resume_serving)

    @app.get("/v1/is_paused")
    async def is_paused(self, authorization: str | None = Header(None)):
        self._authorize(authorization)
        return {"is_paused": await _call(self.coordinator.is_paused)}

    @app.post("/v1/sleep")
    async def sleep(
        self,
        tags: str | None = Query(None, description="weights,kv_cache (default both)"),
        level: int = Query(1, ge=1, le=2),
        authorization: str | None = Header(None),
    ):
        self._authorize(authorization)
        try:
            return await self._control(self.coordinator.sleep, level, _tags(tags))
        except ConfigError as e:
            return _error(e)

    @app.post("/v1/wakeup")
    async def wakeup(
        self, tags: str | None = Query(None), authorization: str | None = Header(None)
    ):
        self._authorize(authorization)
        try:
            return await self._control(self.coordinator.wake_up, _tags(tags))
        except ConfigError as e:
            return _error(e)

    @app.post("/v1/update_weights")
    async def update_weights(self, body: UpdateRequest, authorization: str | None = Header(None)):
        self._authorize(authorization)
        try:
            version = validate_version(body.version) if body.version is not None else None
        except VersionError as e:
            return _error(e)
        if not os.path.isabs(body.path):
            return _error(ConfigError(f"path: {body.path!r} is not an absolute folder path"))
        spec = SnapshotSpec(version, folder=body.path)
        return await self._control(self.coordinator.update, spec, body.force)

    @app.get("/v1/weights/status")
    async def weights_status(self, authorization: str | None = Header(None)):
        self._authorize(authorization)
        status = await self.coordinator.status.remote()
        keys = ("version", "serving", "replicas_serving", "replica_versions", "replica_errors")
        out = {k: status.get(k) for k in keys}
        out.update(paused=status.get("paused"), update=status.get("update"))
        out["gates"] = status.get("gates")
        out["sleep"] = status.get("sleep")
        return out

    async def _control(self, method, *args):
        try:
            out = await _call(method, *args)
        except WeightSyncError as e:
            return _error(e)
        if isinstance(out, BaseModel):
            return out.model_dump(mode="json")
        return {"ok": True} if out is None else out


def serve_fleet(
    name: str = "fd-ray-sync",
    namespace: str = "fd_ray_sync",
    token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
    timeout_s: float = 120.0,
) -> str:
    """Put the HTTP app in front of the fleet `name` (Ray must be connected); returns its
    URL. The app runs in the cluster (Serve) until `serve.delete` or the cluster ends."""
    digest = token_digest(token or read_token())
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise StateError(f"no fleet named {name!r} in namespace {namespace!r}") from None
    serve.start(http_options={"host": host, "port": port})
    serve.run(
        FleetService.bind(name, namespace, digest, timeout_s),
        name=app_name(name),
        route_prefix=route_prefix,
    )
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def app_name(fleet: str) -> str:
    return f"fd-ray-sync-{fleet}"
