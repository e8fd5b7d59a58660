"""flux2 serve under load: does answering status requests slow the job that is running?

A tiny random klein model (tests/conftest.write_tiny_repo; needs the test extra) served by uvicorn in this
process; one job of `--steps` steps at `--size`² px timed alone (its denoising seconds, as the job reports
them), then again while another process keeps `--clients` connections busy asking /healthz and
/v1/jobs/{id}, each pausing `--interval` s between the two (0: none). Prints a markdown row: size, steps,
clients, interval, seconds alone and under load, their ratio, and how many status answers were served.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def poll(url: str, job: str, clients: int, interval: float, stop, served) -> None:
    """clients threads asking for health and the job's status until stop is set (runs in its own process)."""
    def loop():
        while not stop.is_set():
            get(f"{url}/healthz")
            get(f"{url}/v1/jobs/{job}")
            with served.get_lock():
                served.value += 2
            time.sleep(interval)

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_job(url: str, body: dict, clients: int, interval: float) -> tuple[float, int]:
    """(the job's denoising seconds, status answers served meanwhile)."""
    job = post(f"{url}/v1/jobs", body)["id"]
    stop, served = multiprocessing.Event(), multiprocessing.Value("i", 0)
    pollers = None
    if clients:
        pollers = multiprocessing.Process(target=poll, args=(url, job, clients, interval, stop, served))
        pollers.start()
    while (status := get(f"{url}/v1/jobs/{job}"))["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.05)
    stop.set()
    if pollers:
        pollers.join()
    assert status["status"] == "succeeded", status
    return status["elapsed"], served.value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.1, help="seconds each client waits between polls")
    p.add_argument("--backend", default="torch", choices=["mlx", "torch"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's, one per core)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from conftest import write_tiny_repo
    from test_serve import start_server

    from flux2_mlx.config import MODELS
    from flux2_mlx.pipeline import load_pipeline
    from flux2_mlx.server import ImageServer

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_repo(Path(folder))
        spec = MODELS["klein-4b"]
        srv = ImageServer(lambda name: load_pipeline(name, model_path=folder, backend=args.backend), [spec])
        srv.start()
        srv.wait_ready()
        url, stop = start_server(srv)
        body = {"prompt": "a fox", "size": f"{args.size}x{args.size}", "steps": args.steps, "seed": 1}
        run_job(url, body, 0, 0)  # warm-up: the prompt's encoding and first allocations
        alone = min(run_job(url, body, 0, 0)[0] for _ in range(args.repeats))
        loaded = [run_job(url, body, args.clients, args.interval) for _ in range(args.repeats)]
        busy, answers = min(t for t, _ in loaded), sum(n for _, n in loaded) // args.repeats
        stop()
    print("| backend | threads | size | steps | clients | interval s | alone s | under load s | ratio "
          "| status answers per job |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.backend} | {args.threads or 'default'} | {args.size}² | {args.steps} | {args.clients} | "
          f"{args.interval:g} | {alone:.2f} | {busy:.2f} | "
          f"{busy / alone:.3f} | {answers} |")


if __name__ == "__main__":
    main()
