"""Runs inside a test's network namespace: deploys moeserve's Ray Serve application on the Ray
cluster there, drives it over HTTP on the namespace's loopback and prints `RESULT <json>`.

    serve_driver.py basic MODEL EXPECTED.json --ray-address A   2 replicas: text, spread, abort, metrics
    serve_driver.py kill MODEL --ray-address A                  a replica killed mid-stream
    serve_driver.py autoscale MODEL --ray-address A             1 -> 2 -> 1 replicas under load
    serve_driver.py nodes MODEL --ray-address A                 one replica per node
    serve_driver.py ep MODEL EXPECTED.json --ray-address A      a replica of 2 expert-parallel workers
    serve_driver.py backpressure MODEL --ray-address A          Ray Serve's queue full: 503s
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx

PORT = 8123
URL = f"http://127.0.0.1:{PORT}"
APP = "moeserve"
ENGINE = {"max_model_len": 256, "block_size": 4, "num_kv_blocks": 128, "expert_metrics": "expert"}


def _deploy(model: str, **extra) -> None:
    from ray import serve

    from moeserve.entrypoints.ray_serve import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    args = {"model": model, "served_model_name": "tiny", "engine": ENGINE, "health_check_period_s": 1.0,
            "ray_actor_options": {"num_cpus": 1}, **extra}
    serve.run(build_app(args), name=APP, route_prefix="/")


def _engines():
    from ray import serve

    return serve.get_deployment_handle("MoeServeEngine", APP)


def _stats() -> list:
    """Every live replica's stats (a replica that died since this driver's handle last heard
    of the set answers with an error: left out)."""
    results = _engines().broadcast("stats").results(return_exceptions=True)
    return sorted((r for r in results if not isinstance(r, BaseException)), key=lambda s: s.replica)


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments["MoeServeEngine"]
    return deployment.replica_states.get("RUNNING", 0)


def _complete(prompt: str, max_tokens: int, **extra) -> httpx.Response:
    return httpx.post(f"{URL}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0, "ignore_eos": True, **extra}, timeout=120)


def _wait(condition, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def basic(args) -> dict:
    from openai import OpenAI

    _deploy(args.model, num_replicas=2)
    client = OpenAI(base_url=f"{URL}/v1", api_key="unused")
    expected = json.loads(open(args.expected).read())
    texts = {}
    for prompt in expected:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        texts[prompt] = out.choices[0].text
    # Concurrent load: both replicas serve.
    before = {s.replica: s.requests_served for s in _stats()}
    threads = [threading.Thread(target=_complete, args=(f"the expert router {i}", 24)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = {s.replica: s.requests_served - before.get(s.replica, 0) for s in _stats()}
    # A streaming request abandoned by its client: its replica gets all its blocks back.
    mid: list = []
    with httpx.stream("POST", f"{URL}/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": "def f_7(x, y=3):", "max_tokens": 200, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as r:
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
            if chunks == 3:
                mid = _stats()
                break
    busy = [s.replica for s in mid if s.in_flight > 0]
    freed = _wait(lambda: all(s.in_flight == 0 and s.num_free_blocks == s.num_blocks for s in _stats()), 15)
    time.sleep(2.5)  # the ingress polls its replicas' series once a second
    metrics = httpx.get(f"{URL}/metrics", timeout=10).text
    health = httpx.get(f"{URL}/health", timeout=10).status_code
    return {"texts": texts, "served": served, "busy_mid_stream": busy,
            "blocks_mid_stream": {s.replica: [s.num_free_blocks, s.num_blocks] for s in mid},
            "freed": freed, "after": [vars(s) for s in _stats()], "metrics": metrics, "health": health}


def kill(args) -> dict:
    import ray

    _deploy(args.model, num_replicas=2)
    first = {s.replica for s in _stats()}
    outcome: dict = {}

    def long_stream() -> None:
        start = time.monotonic()
        events = []
        try:
            with httpx.stream("POST", f"{URL}/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": "mixture of experts", "max_tokens": 240,
                                    "temperature": 0, "ignore_eos": True, "stream": True}) as r:
                outcome["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as e:
            outcome["transport_error"] = repr(e)
        outcome["seconds"] = time.monotonic() - start
        outcome["last_events"] = events[-2:]
        outcome["num_events"] = len(events)

    t = threading.Thread(target=long_stream)
    t.start()
    assert _wait(lambda: any(s.in_flight for s in _stats()), 30)
    victim = next(s for s in _stats() if s.in_flight)
    ray.kill(ray.get_actor(victim.actor_name, namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    t.join(90)
    outcome["joined"] = not t.is_alive()
    # Meanwhile the other replica serves; a request routed to the dead one before Ray Serve
    # noticed gets a 503 it may retry.
    during = []
    for i in range(6):
        codes = []
        for _ in range(3):
            r = _complete(f"the batch {i}", 8)
            codes.append(r.status_code)
            if r.status_code == 200:
                break
            time.sleep(0.5)
        during.append(codes)
    back = _wait(lambda: _running_replicas() == 2 and len(_stats()) == 2, 120, 1.0)
    after = {s.replica for s in _stats()}
    return {"stream": outcome, "during": during, "back_to_two": back, "seconds_to_two": time.monotonic() - killed_at,
            "replaced": sorted(first - after), "new": sorted(after - first), "victim": victim.replica}


def autoscale(args) -> dict:
    _deploy(args.model, autoscaling_config={"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                                            "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                                            "downscale_delay_s": 3, "metrics_interval_s": 0.5,
                                            "look_back_period_s": 1.0})
    timeline = [(0.0, _running_replicas())]
    start = time.monotonic()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            _complete("def f_7(x, y=3):", 64)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    up = _wait(lambda: _running_replicas() == 2, 90, 0.5)
    timeline.append((time.monotonic() - start, _running_replicas()))
    stop.set()
    for w in workers:
        w.join()
    timeline.append((time.monotonic() - start, _running_replicas()))
    down = _wait(lambda: _running_replicas() == 1, 90, 0.5)
    timeline.append((time.monotonic() - start, _running_replicas()))
    return {"up": up, "down": down, "timeline": timeline}


def backpressure(args) -> dict:
    """One replica taking one request at a time, one more allowed to wait: a burst of six
    finds Ray Serve's queue full for some, which get a 503 with Retry-After at once."""
    _deploy(args.model, num_replicas=1, max_ongoing_requests=1, max_queued_requests=1)
    results: list = []

    def one(i: int) -> None:
        start = time.monotonic()
        stream = i % 2 == 1
        r = _complete(f"the expert router {i}", 48, stream=stream)
        results.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - start, r.text, stream))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _complete("the batch", 4).status_code  # the burst gone, a request goes through again
    return {"results": results, "after": after}


def ep(args) -> dict:
    """One replica that is itself two expert-parallel workers (placed on this cluster)."""
    _deploy(args.model, num_replicas=1, engine={**ENGINE, "expert_parallel_size": 2})
    expected = json.loads(open(args.expected).read())
    texts = {p: _complete(p, 12).json()["choices"][0]["text"] for p in expected}
    return {"texts": texts, "replicas": len(_stats())}


def nodes(args) -> dict:
    _deploy(args.model, num_replicas=2)
    ok = _complete("the expert router", 8).status_code
    return {"node_ips": sorted(s.node_ip for s in _stats()), "status": ok}


def main() -> None:
    import ray
    from ray import serve

    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["basic", "kill", "autoscale", "nodes", "ep", "backpressure"])
    p.add_argument("model")
    p.add_argument("expected", nargs="?")
    p.add_argument("--ray-address", required=True)
    args = p.parse_args()
    ray.init(address=args.ray_address, log_to_driver=False)
    try:
        result = globals()[args.scenario](args)
    finally:
        serve.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
