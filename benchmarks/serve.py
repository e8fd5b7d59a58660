"""flux2 serve under load: does answering status requests slow the job that is running?

A random klein model served by uvicorn in this process: `--model tiny` is the tests' tiny model
(tests/conftest.write_tiny_repo; needs the test extra), `--model wide` the same files with a transformer of
klein-4b's width (hidden 3072, 24 heads, MLP 9216) at `--depth` double + single blocks, whose steps are
long matmuls as the real model's are. One job of `--steps` steps at `--size`² px is timed (its denoising
seconds, as the job reports them) alone and while another process keeps `--clients` keep-alive
connections asking /healthz and /v1/jobs/{id}, each pausing `--interval` s between the two (0: none);
alone and loaded alternate `--repeats` times and the medians are compared (pairs: the range of the
loaded/alone ratio of each pair; answers: those served while the job ran, per second of its denoising).
Prints a markdown row with the load average before and after: the machine may be shared.

The row also says where the job's thread lost its time under load (Linux /proc schedstat): more CPU,
waiting for a core (runq: other threads and processes had them), or blocked (neither: mostly waiting for
the GIL); and the CPU seconds the answers took in this process (loaded minus alone) and in the polling
process. `--pin` puts the job's thread on the first core and everything else on the others;
`--switch-interval` sets sys.setswitchinterval (Python's default: 0.005 s). `--cost S` runs no job and
measures the CPU microseconds per answer of the server and of the clients for S seconds; with
`--streams` the clients hold event streams open instead, and the server's CPU is measured.

On a Mac or a GPU: `--backend mlx` or torch on CUDA/MPS, `--model wide --size 512` or larger.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class Client:
    """One keep-alive HTTP connection, as a browser or an SDK keeps one; fresh: a new connection for each
    request instead, as urllib.request.urlopen makes."""

    def __init__(self, url: str, fresh: bool = False):
        self.host, self.fresh = url.split("//")[1], fresh
        self.conn = http.client.HTTPConnection(self.host, timeout=60)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        if self.fresh:
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, timeout=60)
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, data, {"Content-Type": "application/json"})
        return json.loads(self.conn.getresponse().read())


def poll(url: str, job: str, clients: int, interval: float, cores, fresh, stop, served) -> None:
    """clients threads asking for health and the job's status until stop is set (runs in its own process)."""
    if cores:
        os.sched_setaffinity(0, cores)

    def loop():
        client = Client(url, fresh)
        while not stop.is_set():
            client.call("GET", "/healthz")
            client.call("GET", f"/v1/jobs/{job}")
            with served.get_lock():
                served.value += 2
            time.sleep(interval)

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def schedstat(tid: int) -> tuple[float, float]:
    """(seconds on a core, seconds waiting for one) of a thread so far (Linux; elsewhere nan)."""
    path = Path(f"/proc/self/task/{tid}/schedstat")
    if not path.exists():
        return math.nan, math.nan
    ran, waited, _ = path.read_text().split()
    return int(ran) / 1e9, int(waited) / 1e9


def run_job(url: str, body: dict, clients: int, interval: float, cores, tid: int, fresh=False) -> dict:
    """The job's denoising seconds, the status answers served meanwhile, how the job's thread spent the job
    (on a core, waiting for one, and neither: blocked, mostly waiting for the GIL), and the CPU seconds
    of this process (the job and the server) and of the polling process."""
    client = Client(url)
    ran, waited, begin, times = *schedstat(tid), time.perf_counter(), os.times()
    job = client.call("POST", "/v1/jobs", body)["id"]
    stop, served = multiprocessing.Event(), multiprocessing.Value("i", 0)
    pollers = None
    if clients:
        pollers = multiprocessing.Process(target=poll,
                                          args=(url, job, clients, interval, cores, fresh, stop, served))
        pollers.start()
    while (status := client.call("GET", f"/v1/jobs/{job}"))["status"] not in ("succeeded", "failed",
                                                                               "cancelled"):
        time.sleep(0.01)
    wall, (ran2, waited2) = time.perf_counter() - begin, schedstat(tid)
    stop.set()
    if pollers:
        pollers.join()
    assert status["status"] == "succeeded", status
    after = os.times()
    return dict(seconds=status["elapsed"], answers=served.value / status["elapsed"], cpu=ran2 - ran,
                runq=waited2 - waited, blocked=wall - (ran2 - ran) - (waited2 - waited),
                process=after.user + after.system - times.user - times.system,
                clients=after.children_user + after.children_system - times.children_user
                - times.children_system)


def serve(app, http_impl: str, loop: str, cores) -> tuple[str, object]:
    """uvicorn serving app on a free loopback port, in a thread (on `cores` if given); (url, stop())."""
    from conftest import serve_app

    # sched_setaffinity(0, …) on Linux pins the calling thread only: the server's
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    return serve_app(app, pin, http=http_impl, loop=loop)


def answer_cost(args) -> None:
    """CPU microseconds per answer in the server and in the polling process, no job running: the clients
    ask as fast as they can for `--cost` seconds."""
    from flux2_mlx.config import MODELS
    from flux2_mlx.server import ImageServer

    srv = ImageServer(lambda name: None, [MODELS["klein-4b"]])  # no model: the job fails, its status stays
    srv.start()
    srv.wait_ready()
    url, stop = serve(srv.app, args.http, args.loop, None)
    job = Client(url).call("POST", "/v1/jobs", {"prompt": "a fox"})["id"]
    halt, served = multiprocessing.Event(), multiprocessing.Value("i", 0)
    pollers = multiprocessing.Process(target=poll, args=(url, job, args.clients, 0.0, None,
                                                         args.new_connections, halt, served))
    pollers.start()
    time.sleep(1)  # the clients connected
    before, count = os.times(), served.value
    time.sleep(args.cost)
    after, count = os.times(), served.value - count
    halt.set()
    pollers.join()
    stop()
    end = os.times()
    server = after.user + after.system - before.user - before.system
    clients = (end.children_user + end.children_system) / served.value  # over the pollers' whole run
    print("| http | connections | clients | answers/s | server µs/answer | clients µs/answer |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.http}/{args.loop} | {'new per request' if args.new_connections else 'keep-alive'} | "
          f"{args.clients} | {count / args.cost:.0f} | {server / count * 1e6:.0f} | {clients * 1e6:.0f} |")


def listen(url: str, job: str, clients: int, stop) -> None:
    """clients threads holding the job's event stream open until stop is set (runs in its own process)."""
    def read():
        conn = http.client.HTTPConnection(url.split("//")[1])
        conn.request("GET", f"/v1/jobs/{job}/events")
        answer = conn.getresponse()
        while answer.readline():
            pass

    for _ in range(clients):
        threading.Thread(target=read, daemon=True).start()
    stop.wait()


def stream_cost(args) -> None:
    """The server's CPU while `--clients` event streams wait on a job that stays queued (its model never
    loads), for `--cost` seconds: what an open page costs between a job's events."""
    from flux2_mlx.config import MODELS
    from flux2_mlx.server import ImageServer

    srv = ImageServer(lambda name: threading.Event().wait(), [MODELS["klein-4b"]])
    srv.start()
    url, stop = serve(srv.app, args.http, args.loop, None)
    job = Client(url).call("POST", "/v1/jobs", {"prompt": "a fox"})["id"]
    halt = multiprocessing.Event()
    listeners = multiprocessing.Process(target=listen, args=(url, job, args.clients, halt))
    listeners.start()
    time.sleep(1)  # the streams opened
    before = os.times()
    time.sleep(args.cost)
    after = os.times()
    halt.set()
    listeners.join()
    stop()
    server = after.user + after.system - before.user - before.system
    print(f"| {args.http}/{args.loop} | {args.clients} event streams, no event | "
          f"{max(server, 0.0) / args.cost * 100:.1f} % of a core |")


def write_repo(folder: Path, wide: bool, depth: int) -> None:
    from conftest import random_transformer, write_tiny_repo

    from flux2_mlx.config import KLEIN_4B
    from flux2_mlx.weights import save_safetensors

    spec = write_tiny_repo(folder)
    if wide:  # klein-4b's blocks on the tiny text encoder's context width
        cfg = dataclasses.replace(KLEIN_4B, context_in_dim=spec.transformer.context_in_dim, depth=depth,
                                  depth_single_blocks=depth)
        save_safetensors(folder / spec.transformer_file, random_transformer(cfg, seed=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny", choices=["tiny", "wide"])
    p.add_argument("--depth", type=int, default=1, help="--model wide: double and single blocks each")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--text-tokens", type=int, help="pad prompts to this many tokens (default: the model's)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--interval", type=float, default=1.0, help="seconds each client waits between polls")
    p.add_argument("--backend", default="torch", choices=["mlx", "torch"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's, one per core)")
    p.add_argument("--switch-interval", type=float, help="sys.setswitchinterval for the run")
    p.add_argument("--pin", action="store_true", help="the job on the first core, the rest on the others")
    p.add_argument("--http", default="h11", choices=["h11", "httptools"])
    p.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    p.add_argument("--new-connections", action="store_true", help="a connection per request (urllib's way)")
    p.add_argument("--cost", type=float, help="no job: measure CPU per answer for this many seconds")
    p.add_argument("--streams", action="store_true", help="--cost: the clients hold event streams open")
    args = p.parse_args()
    if args.cost:
        return stream_cost(args) if args.streams else answer_cost(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    job_cores = other_cores = None
    if args.pin:  # Linux
        cores = sorted(os.sched_getaffinity(0))
        job_cores, other_cores = {cores[0]}, set(cores[1:])
    if other_cores:
        os.sched_setaffinity(0, other_cores)  # this thread: the one asking for the job's status

    from flux2_mlx.config import MODELS
    from flux2_mlx.pipeline import load_pipeline
    from flux2_mlx.server import ImageServer

    if args.text_tokens:
        for name, spec in MODELS.items():
            text = dataclasses.replace(spec.text_encoder, max_length=args.text_tokens)
            MODELS[name] = dataclasses.replace(spec, text_encoder=text)

    tids = []

    def load(name):
        tids.append(threading.get_native_id())  # the worker thread, which runs every job
        if job_cores:
            os.sched_setaffinity(0, job_cores)
        return load_pipeline(name, model_path=folder, backend=args.backend)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        write_repo(Path(folder), args.model == "wide", args.depth)
        srv = ImageServer(load, [MODELS["klein-4b"]])
        srv.start()
        srv.wait_ready()
        url, stop = serve(srv.app, args.http, args.loop, other_cores)
        body = {"prompt": "a fox", "size": f"{args.size}x{args.size}", "steps": args.steps, "seed": 1}
        run_job(url, body, 0, 0, None, tids[0])  # warm-up: the prompt's encoding and first allocations
        runs = {"alone": [], "loaded": []}
        for _ in range(args.repeats):  # interleaved: a machine that gets busier slows both alike
            runs["alone"].append(run_job(url, body, 0, 0, None, tids[0]))
            runs["loaded"].append(run_job(url, body, args.clients, args.interval, other_cores, tids[0],
                                          args.new_connections))
        stop()
    med = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in runs.items()}
    for kind, rs in runs.items():
        print(kind, [round(r["seconds"], 2) for r in rs], file=sys.stderr)
    a, b = med["alone"], med["loaded"]
    pairs = sorted(busy["seconds"] / quiet["seconds"] for quiet, busy in zip(runs["alone"], runs["loaded"]))
    cells = {
        "model": f"wide {args.depth}+{args.depth}" if args.model == "wide" else "tiny",
        "backend": args.backend, "threads": args.threads or "default",
        "switch s": f"{sys.getswitchinterval():g}", "pinned": "yes" if args.pin else "no",
        "http": f"{args.http}/{args.loop}", "size": f"{args.size}²", "steps": args.steps,
        "clients": args.clients, "interval s": f"{args.interval:g}",
        "alone s": f"{a['seconds']:.2f}", "under load s": f"{b['seconds']:.2f}",
        "ratio": f"{b['seconds'] / a['seconds']:.3f}", "pairs": f"{pairs[0]:.2f}–{pairs[-1]:.2f}",
        "answers": f"{b['answers']:.0f}",
        "job thread +cpu / +runq / +blocked s": " / ".join(f"{b[k] - a[k]:+.2f}" for k in ("cpu", "runq",
                                                                                          "blocked")),
        "+server / clients cpu s": f"{b['process'] - a['process']:+.2f} / {b['clients']:.2f}",
        "load avg": f"{load_before:.2f}→{os.getloadavg()[0]:.2f}",
    }
    print("| " + " | ".join(cells) + " |")
    print("|---" * len(cells) + "|")
    print("| " + " | ".join(str(v) for v in cells.values()) + " |")


if __name__ == "__main__":
    main()
