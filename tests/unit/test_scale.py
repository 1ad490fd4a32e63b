"""fd_ray_sync.scale, the cost model behind `fd-ray-sync plan`: its shape (monotonic, never
under its floor), the fit (recovers constants from runs the model itself generated, read back
through a bench file), the 1T target's assumptions, and the command."""

import itertools
import json
import random

import pytest

from fd_ray_sync import cli, scale
from fd_ray_sync.bench_net import PAYLOAD
from fd_ray_sync.errors import ConfigError
from fd_ray_sync.scale import (
    ASSUMED,
    GB,
    Constants,
    PlanInputs,
    estimate,
    fit,
    floor_s,
    load_measured,
)

TARGET = dict(
    params=1e12,
    bytes_per_param=1,
    gpus=256,
    gpus_per_node=8,
    tp=8,
    link_gbit=400,
    nics_per_node=8,
    intra_gbyte=400,
)
WAYS = [
    dict(transport="collective", delivery="full"),
    dict(transport="collective", delivery="slice"),
    dict(transport="collective", delivery="full", colocated=True, source="host"),
    dict(transport="collective", delivery="full", nics_per_node=1),
    dict(transport="object_store"),
    dict(transport="naive_ray"),
    dict(transport="ipc"),
]


def test_more_bytes_take_longer_and_more_bandwidth_less_time():
    for way in WAYS:
        last = 0.0
        for params in (1e8, 1e9, 3e10, 2.35e11, 1e12, 4e12):
            now = estimate(PlanInputs(**{**TARGET, **way, "params": params})).seconds
            assert now > last, (way, params)
            last = now
        rates = [(gbit, intra) for gbit in (1, 10, 100, 400, 800) for intra in (50, 400, 900)]
        took = {
            r: estimate(PlanInputs(**{**TARGET, **way, "link_gbit": r[0], "intra_gbyte": r[1]}))
            for r in rates
        }
        for a, b in itertools.product(rates, rates):
            if a[0] <= b[0] and a[1] <= b[1]:  # b is at least as fast on both links
                assert took[b].seconds <= took[a].seconds, (way, a, b)


def test_the_floor_is_below_every_estimate():
    rng = random.Random(0)
    for _ in range(400):
        tp = rng.choice([1, 2, 4, 8, 16])
        ep = rng.choice([1, 1, 2])
        gpn = rng.choice([1, 2, 4, 8])
        way = rng.choice(WAYS)
        drawn = dict(
            params=10 ** rng.uniform(6, 12.5),
            bytes_per_param=rng.choice([0.5, 1, 2, 4]),
            gpus=tp * ep * rng.randint(1, 40),
            gpus_per_node=gpn,
            tp=tp,
            ep=ep,
            link_gbit=rng.choice([1, 25, 100, 400]),
            nics_per_node=rng.choice([1, gpn]),
            intra_gbyte=rng.choice([10, 200, 450]),
            write_gbyte=rng.choice([10, 1500]),
            h2d_gbyte=rng.choice([10, 54]),
            bucket_bytes=rng.choice([1, 64, 1024]) << 20,
            piece_bytes=rng.choice([1, 4, 16]) << 20,
            trainer_nodes=1 if way.get("colocated") else rng.randint(1, 4),
        )
        x = PlanInputs(**{**drawn, **way})
        e = estimate(x)
        assert 0 < e.floor_s <= e.seconds, (x, e)
        assert e.seconds == pytest.approx(sum(e.terms.values()))


def test_the_1t_fp8_target_lands_under_10_s_only_on_every_nic():
    full = estimate(PlanInputs(**TARGET, transport="collective", delivery="full"))
    slices = estimate(PlanInputs(**TARGET, transport="collective", delivery="slice"))
    one_nic = estimate(PlanInputs(**{**TARGET, "nics_per_node": 1}, transport="collective"))
    relay = estimate(PlanInputs(**TARGET, transport="object_store"))
    assert full.seconds < 10 and slices.seconds < 10
    assert one_nic.seconds > 10 and relay.seconds > 10
    # full delivery: each GPU takes 7/8 of the model over NVLink; slices: none of it
    assert full.bytes["intra_per_gpu"] == pytest.approx(0.875e12)
    assert slices.bytes["intra_per_gpu"] == 0
    assert full.bytes["ingress_per_node"] == slices.bytes["ingress_per_node"] == 1e12


KNOWN = {
    "collective": Constants(
        link_efficiency=0.62, piece_latency_s=0.004, bucket_overhead_s=0.03, update_fixed_s=0.21
    ),
    "object_store": Constants(
        link_efficiency=0.55, piece_latency_s=0.002, bucket_overhead_s=0.05, update_fixed_s=0.4
    ),
    "naive_ray": Constants(
        link_efficiency=0.7, piece_latency_s=0.001, bucket_overhead_s=0.0, update_fixed_s=0.1
    ),
}
METHODS = {
    "collective": "collective",
    "object_store": "object_store_relay",
    "naive_ray": "naive_ray",
}


def _bench_files(tmp_path) -> list:
    """Shaped-network bench files (the layout `bench --nodes N --link-gbit B --json F` writes)
    whose seconds the model itself computed with KNOWN, on links whose payload is PAYLOAD of
    their rate (as the bench's tbf-shaped links, and as `load_measured` reads them)."""
    paths = []
    grid = itertools.product((1.0, 2.5, 10.0), ((64, 4), (16, 1), (256, 16)))
    for i, (link, (bucket_mb, piece_mb)) in enumerate(grid):
        doc = {
            "link_gbit": link,
            "delay_ms": 0,
            "tp": 2,
            "bucket_mb": bucket_mb,
            "piece_mb": piece_mb,
            "runs": 3,
            "memcpy_gbps": 12.0,
            "relay_widened": True,
            "nodes": {},
        }
        for nodes, size in ((2, 256 << 20), (4, 1 << 30), (8, 512 << 20)):
            methods = {}
            for transport, method in METHODS.items():
                x = PlanInputs(
                    params=size,
                    bytes_per_param=1,
                    gpus=2 * nodes,
                    gpus_per_node=2,
                    tp=2,
                    link_gbit=link,
                    payload_share=PAYLOAD,
                    nics_per_node=1,
                    intra_gbyte=12,
                    write_gbyte=12,
                    h2d_gbyte=12,
                    transport=transport,
                    bucket_bytes=bucket_mb << 20,
                    piece_bytes=piece_mb << 20,
                    trainer_gpus=1,
                    source="host",
                )
                methods[method] = {
                    "seconds": estimate(x, KNOWN[transport]).seconds,
                    "sent_by_node_bytes": {"trainer": size},
                    "bit_identical": True,
                }
            floor = floor_s(x)
            doc["nodes"][str(nodes)] = {"model_bytes": size, "floor_s": floor, "methods": methods}
        path = tmp_path / f"bench-net-{i}.json"
        path.write_text(json.dumps(doc))
        paths.append(str(path))
    return paths


def test_fit_recovers_the_constants_that_generated_the_runs(tmp_path):
    runs = [r for p in _bench_files(tmp_path) for r in load_measured(p)[0]]
    assert len(runs) == 9 * 3 * 3
    got = fit(runs)
    for transport in ("collective", "object_store"):
        want = KNOWN[transport].model_dump(exclude={"source"})
        assert got[transport].model_dump(exclude={"source"}) == pytest.approx(want, rel=1e-6)
        assert "held at assumed: none" in got[transport].source
    # naive Ray sends one object: its bucket count never varies, so that constant cannot be
    # told from the fixed cost; it is held at the assumed value and the fit says so.
    naive = got["naive_ray"]
    assert naive.bucket_overhead_s == ASSUMED["naive_ray"].bucket_overhead_s
    assert "held at assumed: bucket_overhead_s" in naive.source
    assert naive.link_efficiency == pytest.approx(0.7, rel=1e-6)
    assert naive.piece_latency_s == pytest.approx(0.001, rel=1e-6)


def test_a_measured_file_lacking_a_field_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "bench-net-bad.json"
    doc = {
        "link_gbit": 1.0,
        "tp": 2,
        "bucket_mb": 64,
        "nodes": {
            "4": {"model_bytes": 1 << 28, "methods": {"collective": {"bit_identical": True}}}
        },
    }
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"bench-net-bad\.json.*lacks field 'seconds'"):
        load_measured(path)
    del doc["link_gbit"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"bench-net-bad\.json: the file lacks field 'link_gbit'"):
        load_measured(path)


def test_optional_fields_and_unmodelled_methods_are_noted_not_fatal(tmp_path):
    path = tmp_path / "bench-net-partial.json"
    doc = {
        "link_gbit": 1.0,
        "tp": 2,
        "bucket_mb": 64,
        "nodes": {
            "2": {
                "model_bytes": 1 << 28,
                "methods": {
                    "collective": {"seconds": 3.0, "bit_identical": False},
                    "object_store_relay": {"seconds": 3.5},
                    "ours_no_relay": {"seconds": 4.0},
                },
            }
        },
    }
    path.write_text(json.dumps(doc))
    runs, notes = load_measured(path)
    assert [r.method for r in runs] == ["object_store_relay"]
    assert runs[0].inputs.piece_bytes == 64 << 20
    text = "\n".join(notes)
    for said in ("no 'piece_mb'", "no 'memcpy_gbps'", "not bit-identical", "'ours_no_relay'"):
        assert said in text


def test_bad_inputs_are_refused_with_their_reason():
    with pytest.raises(ValueError, match="not a multiple of tp"):
        PlanInputs(**{**TARGET, "gpus": 250})
    with pytest.raises(ValueError, match="delivery 'slice' is a collective's choice"):
        PlanInputs(**TARGET, transport="object_store", delivery="slice")


def test_plan_prints_the_estimate_and_the_published_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no docs/bench-net*.json here
    out_json = tmp_path / "plan.json"
    assert cli.main(["plan", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "assumed (not yet fitted)" in out
    assert "published vs. ours" in out
    for p in scale.PUBLISHED:
        assert p.name in out and f"{p.seconds:.2f}s" in out
    doc = json.loads(out_json.read_text())
    assert doc["estimate"]["seconds"] < 10
    assert [p["name"] for p in doc["published"]] == [p.name for p in scale.PUBLISHED]


def _estimate_constants(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("  constants, "))


def test_plan_fits_measured_files_and_compares_each_run(tmp_path, capsys):
    files = _bench_files(tmp_path)
    assert cli.main(["plan", "--measured", *files[:3]]) == 0
    out = capsys.readouterr().out
    # The headline stays on the assumed GPU constants; the fitted ones are shown apart.
    assert _estimate_constants(out).startswith("  constants, assumed (not yet fitted)")
    assert "fitted constants: CPU processes on the bench machine" in out
    assert "constants, fitted to 9 run(s)" in out
    assert "measured vs. predicted (27 run(s) from 3 file(s))" in out
    assert cli.main(["plan", "--fitted", "--measured", *files[:3]]) == 0
    out = capsys.readouterr().out
    assert _estimate_constants(out).startswith("  constants, fitted to 9 run(s)")
    assert cli.main(["plan", "--assumed", "--measured", *files[:3]]) == 0
    out = capsys.readouterr().out
    assert "constants, assumed (not yet fitted)" in out  # the estimate's
    assert "measured vs. predicted (27 run(s)" in out  # still against the fitted constants


def _as_the_bench_writes(**naive) -> dict:
    """One node count of a `bench --nodes 4 --link-gbit 1` file, laid out as the bench writes
    it (figures from docs/bench-net-4n-1g-256m.json; `naive` overrides naive_ray's)."""

    def method(seconds, trainer_sent, **more):
        sent = {"trainer": trainer_sent, "node1": 3e5, "node2": 3e5, "node3": 3e5, "node4": 3e5}
        return {
            "times": [seconds, seconds],
            "sent": [sent, sent],
            "bit_identical": True,
            "seconds": seconds,
            "x_floor": seconds / 2.05487186598895,
            "sent_by_node_bytes": sent,
            "trainer_node_sent_x_model": trainer_sent / 245661696,
            "wall_s": 30.0,
            **more,
        }

    return {
        "link_gbit": 1.0,
        "delay_ms": 0.0,
        "tp": 1,
        "bucket_mb": 64,
        "piece_mb": 4.0,
        "runs": 2,
        "network": {"nodes": 4, "link_gbit": 1.0, "delay_applied": False, "tbf_latency_ms": 10},
        "nodes": {
            "4": {
                "model_bytes": 245661696,
                "floor_s": 2.05487186598895,
                "methods": {
                    "collective": method(
                        2.378525168998749, 246000509.5, rebuild_s=20.0, peer_restore_s=2.0
                    ),
                    "object_store_relay": method(7.369798872501633, 246150617.0),
                    "naive_ray": method(**{"seconds": 8.363115930000276,
                                           "trainer_sent": 983858601.5, **naive}),
                },
            }
        },
    }  # fmt: skip


def test_a_bench_file_is_read_as_written_its_floor_the_models(tmp_path):
    path = tmp_path / "bench-net-4n-1g-256m.json"
    path.write_text(json.dumps(_as_the_bench_writes()))
    runs, notes = load_measured(path)
    assert [r.method for r in runs] == ["collective", "object_store_relay", "naive_ray"]
    # The bench's floor counts TCP payload only (1448/1514 of the shaped rate); so does the
    # model reading its runs, so nothing is noted beyond the missing memcpy_gbps.
    assert notes == [f"{path}: no 'memcpy_gbps': host copies assumed 10 GB/s"]
    for r in runs:
        assert r.inputs.payload_share == PAYLOAD
        assert floor_s(r.inputs) == pytest.approx(r.floor_s, rel=1e-9)
        assert r.fittable() and r.sent_x_modelled() == pytest.approx(1.0, abs=0.01)


def test_a_run_that_re_sent_bytes_is_compared_but_not_fitted(tmp_path):
    # naive Ray at 0.5 Gbit/s: Ray's object manager re-sent chunks, 8.5 models left the
    # trainer's node where 4 must (docs/bench-net-4n-0.5g-256m.json)
    path = tmp_path / "bench-net-resent.json"
    path.write_text(json.dumps(_as_the_bench_writes(seconds=35.0, trainer_sent=2092686573.0)))
    runs, _ = load_measured(path)
    naive = next(r for r in runs if r.method == "naive_ray")
    assert naive.sent_x_modelled() == pytest.approx(2.13, abs=0.01) and not naive.fittable()
    got = fit(runs)
    assert "naive_ray" not in got  # its only run was left out: the assumed constants stand
    assert set(got) == {"collective", "object_store"}


def test_the_relay_waits_on_its_backpressure_window_unless_the_chain_widens_it():
    """Ranks report a bucket written one bucket late, so buckets_in_flight - 1 travel the
    relay chain at once: with the default 2 and no widening (the fleet before session 7),
    one at a time, and the chain's time grows with its length until the window covers it.
    The fleet widens the window by the chain's hops - 1: no wait at any window."""
    x = dict(TARGET, transport="object_store", bucket_bytes=1 << 30)
    for gpus in (16, 64, 256):
        nodes = gpus // 8
        took = [
            estimate(
                PlanInputs(**{**x, "gpus": gpus, "buckets_in_flight": w, "relay_widened": False})
            ).terms["stream"]
            for w in range(2, nodes + 4)
        ]
        assert all(a >= b for a, b in itertools.pairwise(took)), took
        assert took[0] > took[-1] and len(set(took[nodes - 1 :])) == 1  # flat from w = nodes + 1
        widened = estimate(PlanInputs(**{**x, "gpus": gpus})).terms["stream"]
        assert widened == pytest.approx(took[-1], rel=1e-9)
    # One bucket at a time over 32 hops: about 32 times the model's line time.
    one = estimate(PlanInputs(**x, relay_widened=False))
    line = one.bytes["ingress_per_node"] / (400 / 8 * GB) / ASSUMED["object_store"].link_efficiency
    assert one.terms["stream"] == pytest.approx(32 * line, rel=0.01)


def test_plan_says_which_file_lacks_which_field(tmp_path, capsys):
    path = tmp_path / "bench-net-nolink.json"
    path.write_text(json.dumps({"tp": 2, "bucket_mb": 64, "nodes": {}}))
    assert cli.main(["plan", "--measured", str(path)]) == 1
    err = capsys.readouterr().err
    assert "bench-net-nolink.json" in err and "'link_gbit'" in err
