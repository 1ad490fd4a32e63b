"""The HTTP app on Ray Serve, through a real HTTP client: every route, tokens, bad input."""

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest

from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.sources.snapshot import write_snapshot

pytestmark = pytest.mark.slow
TINY = preset("tiny")
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from fd_ray_sync.service import app_name, serve_fleet

    fleet = Fleet.launch(FleetConfig(name="http-fleet", tp=1, dp=2))
    fleet.update(init_full_state_dict(TINY, seed=1), version=1)
    url = serve_fleet("http-fleet", token=TOKEN, port=_free_port())
    yield fleet, url, tmp_path_factory.mktemp("snapshots")
    serve.delete(app_name("http-fleet"))
    serve.shutdown()
    fleet.shutdown()


def call(url, method="GET", body=None, headers=None):
    """(status, JSON body, headers) of one request."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def text_of(seed, prompt, tokens):
    engine = ReferenceEngine(TINY)
    engine.load_full_state_dict(init_full_state_dict(TINY, seed=seed))
    return engine.generate([prompt], tokens)[0]


def snapshot(fleet, folder, seed, version):
    state = init_full_state_dict(TINY, seed=seed)
    path = folder / f"v{version}-{seed}"
    plans = fleet.shard_plans()
    write_snapshot(path, state, plans.__getitem__, tp=1, version=str(version), part_bytes=1 << 20)
    return str(path)


def test_completions_carry_the_weight_version(served):
    _, url, _ = served
    status, body, headers = call(
        f"{url}/v1/completions", "POST", {"prompt": ["The trainer ", "fleet"], "max_tokens": 6}
    )
    assert status == 200, body
    assert body["weight_version"] == "1" == headers["X-Weight-Version"]
    assert [c["text"] for c in body["choices"]] == [
        text_of(1, "The trainer ", 6),
        text_of(1, "fleet", 6),
    ]
    assert call(f"{url}/health")[0] == 200
    assert call(f"{url}/v1/models")[1]["data"][0]["id"] == "http-fleet"


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": "x", "n": 3}, "n"),
        ({"prompt": "x", "stream": True}, "stream"),
    ],
)
def test_bad_completion_parameters_get_422_naming_the_field(served, body, field):
    _, url, _ = served
    status, out, _ = call(f"{url}/v1/completions", "POST", body)
    assert status == 422 and field in json.dumps(out["detail"])


@pytest.mark.parametrize(
    "method,route",
    [
        ("POST", "/v1/pause"),
        ("POST", "/v1/resume"),
        ("GET", "/v1/is_paused"),
        ("POST", "/v1/sleep"),
        ("POST", "/v1/wakeup"),
        ("POST", "/v1/update_weights"),
        ("GET", "/v1/weights/status"),
    ],
)
def test_control_routes_refuse_a_missing_or_wrong_token_and_change_nothing(served, method, route):
    fleet, url, _ = served
    before = fleet.status()
    body = {"path": "/nowhere", "version": 99} if route == "/v1/update_weights" else None
    assert call(f"{url}{route}", method, body)[0] == 401
    wrong = {"Authorization": "Bearer nope"}
    assert call(f"{url}{route}", method, body, wrong)[0] == 403
    after = fleet.status()
    assert after["version"] == before["version"] and after["paused"] is None
    assert after["replicas_serving"] == before["replicas_serving"]


def test_pause_resume_and_requests_held_meanwhile(served):
    _, url, _ = served
    assert call(f"{url}/v1/pause?mode=later", "POST", headers=AUTH)[0] == 422
    assert call(f"{url}/v1/is_paused", headers=AUTH)[1] == {"is_paused": False}
    assert call(f"{url}/v1/pause?mode=wait", "POST", headers=AUTH)[0] == 200
    assert call(f"{url}/v1/is_paused", headers=AUTH)[1] == {"is_paused": True}
    out = {}
    held = threading.Thread(
        target=lambda: out.update(r=call(f"{url}/v1/completions", "POST", {"prompt": "x"}))
    )
    held.start()
    held.join(timeout=1.0)
    assert held.is_alive()  # waiting at the gates
    assert call(f"{url}/v1/resume", "POST", headers=AUTH)[0] == 200
    held.join(timeout=60)
    assert out["r"][0] == 200
    assert call(f"{url}/v1/is_paused", headers=AUTH)[1] == {"is_paused": False}


def test_update_weights_from_a_snapshot_and_every_answer_one_version(served):
    fleet, url, folder = served
    path = snapshot(fleet, folder, seed=2, version=2)
    texts = {"1": text_of(1, "fleet", 6), "2": text_of(2, "fleet", 6)}
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            status, body, _ = call(
                f"{url}/v1/completions", "POST", {"prompt": "fleet", "max_tokens": 6}
            )
            answers.append((status, body))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    status, report, _ = call(f"{url}/v1/update_weights", "POST", {"path": path}, AUTH)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert status == 200 and report["version"] == "2", report
    assert answers and all(s == 200 for s, _ in answers)
    for _, body in answers:
        assert body["choices"][0]["text"] == texts[body["weight_version"]]  # never a mix
    weights = call(f"{url}/v1/weights/status", headers=AUTH)[1]
    assert weights["version"] == "2" and weights["replica_versions"] == ["2", "2"]


def test_refused_updates_get_4xx_naming_the_cause_and_change_nothing(served):
    fleet, url, folder = served
    version = fleet.status()["version"]
    status, out, _ = call(
        f"{url}/v1/update_weights", "POST", {"path": str(folder / "missing"), "version": 50}, AUTH
    )
    assert status == 400 and "missing" in out["error"]["message"]
    status, out, _ = call(
        f"{url}/v1/update_weights", "POST", {"path": "relative/dir", "version": 50}, AUTH
    )
    assert status == 400 and "path" in out["error"]["message"]
    old = snapshot(fleet, folder, seed=3, version=1)
    status, out, _ = call(f"{url}/v1/update_weights", "POST", {"path": old}, AUTH)
    assert status == 400 and "not newer" in out["error"]["message"]
    status, out, _ = call(f"{url}/v1/update_weights", "POST", {"path": old, "bogus": 1}, AUTH)
    assert status == 422 and "bogus" in json.dumps(out["detail"])
    assert fleet.status()["version"] == version and all(fleet.status()["replicas_serving"])


def test_sleep_and_wakeup_by_tags(served):
    fleet, url, _ = served
    version = fleet.status()["version"]
    status, out, _ = call(f"{url}/v1/sleep?tags=weights,gpu", "POST", headers=AUTH)
    assert status == 400 and "'gpu'" in out["error"]["message"]
    assert call(f"{url}/v1/sleep?level=3", "POST", headers=AUTH)[0] == 422
    assert fleet.status()["asleep"] == {}  # refused: nothing slept
    status, out, _ = call(f"{url}/v1/sleep?tags=weight,kv_cache&level=1", "POST", headers=AUTH)
    assert status == 200 and out["asleep"] == {"weights": 1, "kv_cache": 1}
    status, out, _ = call(f"{url}/v1/completions", "POST", {"prompt": "x", "max_tokens": 4})
    assert status == 503 and "wake_up" in out["error"]["message"]
    assert call(f"{url}/health")[0] == 503
    status, out, _ = call(f"{url}/v1/wakeup?tags=weights", "POST", headers=AUTH)
    assert status == 200 and out["asleep"] == {"kv_cache": 1}
    assert call(f"{url}/v1/wakeup", "POST", headers=AUTH)[1]["asleep"] == {}
    status, out, _ = call(f"{url}/v1/completions", "POST", {"prompt": "fleet", "max_tokens": 6})
    assert status == 200 and out["weight_version"] == version
    assert out["choices"][0]["text"] == text_of(int(version), "fleet", 6)  # same weights back
