"""`flux2 serve` over real HTTP on a tiny random model: the official openai client, the job queue and its
server-sent events, cancel, 429s and bad input. One server (uvicorn in a thread) for the module."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import serve_app
from PIL import Image

pytest.importorskip("starlette", reason="flux2 serve needs the serve extra")
uvicorn = pytest.importorskip("uvicorn", reason="flux2 serve needs the serve extra")
openai = pytest.importorskip("openai", reason="the openai client is in the test extra")

from flux2_mlx.cli import main  # noqa: E402
from flux2_mlx.config import MODELS  # noqa: E402
from flux2_mlx.pipeline import load_pipeline  # noqa: E402
from flux2_mlx.server import ImageServer  # noqa: E402

KEY = "sk-local-test"
SMALL = {"size": "32x32", "steps": 1}


def start_server(srv: ImageServer):
    """uvicorn serving srv.app on a free loopback port, in a thread; (base url, stop())."""
    return serve_app(srv.app)


def base_transformer(tiny_repo, folder):
    """klein base has klein's shapes: the tiny transformer, linked under klein base's file name."""
    link = folder / MODELS["klein-base-4b"].transformer_file
    link.symlink_to(tiny_repo / MODELS["klein-4b"].transformer_file)
    return link


@pytest.fixture(scope="module")
def served(short_prompts, tiny_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("served")
    base = base_transformer(tiny_repo, tmp_path_factory.mktemp("base"))

    def load(name):
        return load_pipeline(name, model_path=tiny_repo,
                             transformer=base if name == "klein-base-4b" else None)

    srv = ImageServer(load, [MODELS["klein-4b"], MODELS["klein-base-4b"]], api_key=KEY, output_dir=out,
                      max_upload=2**20, hosts={"127.0.0.1"})
    srv.start()
    srv.wait_ready()
    url, stop = start_server(srv)
    yield SimpleNamespace(srv=srv, url=url, out=out, base=base,
                          client=openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0))
    stop()


def call(served, method, path, body=None, *, key=KEY, headers=None, raw=None):
    """(status, headers, parsed JSON body) of one request; body: JSON, or raw bytes with headers."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    head = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        head["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(served.url + path, data=data, method=method, headers=head)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def wait_for(served, job_id, until=("succeeded", "failed", "cancelled")):
    while True:
        _, _, job = call(served, "GET", f"/v1/jobs/{job_id}")
        if job["status"] in until:
            return job
        time.sleep(0.01)


def cli_png(tiny_repo, path, *args):
    args = ["generate", "a red fox", "--model-path", tiny_repo, "-W", 32, "-H", 32, "--steps", 1, "--seed", 5,
            "-o", path, *args]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return path.read_bytes()


@pytest.fixture(scope="module")
def fox(served, tiny_repo, tmp_path_factory):
    """`flux2 generate "a red fox"` at 32x32, 1 step, seed 5: the PNG the server must send for the same."""
    return cli_png(tiny_repo, tmp_path_factory.mktemp("fox") / "fox.png")


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_openai_generate_equals_flux2_generate(served, fox):
    """The same PNG, metadata included, as `flux2 generate` with the same settings; also kept on disk."""
    r = served.client.images.generate(model="klein-4b", prompt="a red fox", size="32x32",
                                      response_format="b64_json", extra_body={"seed": 5, "steps": 1})
    got = base64.b64decode(r.data[0].b64_json)
    assert got == fox
    assert got in [p.read_bytes() for p in served.out.glob("*-5.png")]
    r = served.client.images.generate(prompt="a red fox", n=2, response_format="url", output_format="jpeg",
                                      extra_body={"seed": 9, **SMALL})
    assert [d.model_extra["seed"] for d in r.data] == [9, 10]
    with urllib.request.urlopen(r.data[1].url) as f:  # result URLs are secrets: no key needed
        assert Image.open(f).format == "JPEG"
    assert [(m.id, m.model_extra["loaded"]) for m in served.client.models.list()] == [
        ("klein-4b", True), ("klein-base-4b", False)]
    assert call(served, "GET", "/healthz", key=None)[2]["status"] == "ok"


def test_openai_edit_with_references_and_mask_equals_flux2_generate(served, tiny_repo, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    ref, picture = (png(rng.integers(0, 256, (80, 64, 3), np.uint8)) for _ in range(2))
    mask = np.zeros((80, 64), np.uint8)
    mask[16:48, 16:48] = 255
    monkeypatch.chdir(tmp_path)  # the PNGs record the files as given: here, their bare names
    for name, data in (("ref.png", ref), ("picture.png", picture), ("mask.png", png(mask))):
        (tmp_path / name).write_bytes(data)
    r = served.client.images.edit(image=[("ref.png", ref, "image/png")], prompt="a red fox", size="32x32",
                                  extra_body={"seed": 5, "steps": 1})
    expected = cli_png(tiny_repo, tmp_path / "ref-cli.png", "--ref", "ref.png")
    assert base64.b64decode(r.data[0].b64_json) == expected
    r = served.client.images.edit(image=("picture.png", picture, "image/png"), mask=("mask.png", png(mask)),
                                  prompt="a red fox", size="32x32", extra_body={"seed": 5, "steps": 1})
    expected = cli_png(tiny_repo, tmp_path / "mask-cli.png", "--image", "picture.png", "--mask", "mask.png")
    assert base64.b64decode(r.data[0].b64_json) == expected


def sse(served, job_id):
    """The (event, data) pairs of a job's event stream, to its end."""
    req = urllib.request.Request(f"{served.url}/v1/jobs/{job_id}/events",
                                 headers={"Authorization": f"Bearer {KEY}"})
    events, name = [], None
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_job_events_arrive_in_order(served):
    body = {"prompt": "a red fox", "n": 2, "seed": 1, "size": "32x32", "steps": 3}
    status, _, job = call(served, "POST", "/v1/jobs", body)
    assert status == 202 and job["status"] in ("queued", "running")
    events = sse(served, job["id"])
    names = [n for n, _ in events]
    assert names[:2] == ["queued", "started"] and names[-1] == "done" and names.count("image") == 2
    progress = [d for n, d in events if n == "progress"]
    assert [d["step"] for d in progress] == list(range(1, 7)) and {d["total"] for d in progress} == {6}
    assert all(d["elapsed"] >= 0 and d["eta"] >= 0 for d in progress) and progress[-1]["eta"] == 0
    done = events[-1][1]
    assert done["status"] == "succeeded" and [i["seed"] for i in done["images"]] == [1, 2]


def test_previews_every_few_steps_leave_the_image_as_it_was(served):
    """A preview decodes the latents pooled to at most 16 tokens a side: 288 px wide (18 tokens) → 144."""
    body = {"prompt": "a red fox", "size": "288x32", "steps": 3, "seed": 5}
    _, _, job = call(served, "POST", "/v1/jobs", {**body, "preview_every": 2})
    events = sse(served, job["id"])
    previews = [d for n, d in events if n == "preview"]
    assert [d["step"] for d in previews] == [2]  # not at the last step: the image itself comes next
    head, data = previews[0]["url"].split(",")
    assert head == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (144, 32)
    _, _, plain = call(served, "POST", "/v1/images/generations", body)
    with urllib.request.urlopen(served.url + events[-1][1]["images"][0]["url"]) as f:
        assert f.read() == base64.b64decode(plain["data"][0]["b64_json"])


def test_cancel_stops_within_a_step_and_the_queue_runs_in_order(served):
    _, _, long = call(served, "POST", "/v1/jobs", {"prompt": "a red fox", "size": "32x32", "steps": 1000})
    wait_for(served, long["id"], until=("running",))
    while call(served, "GET", f"/v1/jobs/{long['id']}")[2]["step"] < 2:
        time.sleep(0.01)
    queued = [call(served, "POST", "/v1/jobs", {"prompt": "a red fox", **SMALL})[2]["id"] for _ in range(5)]
    status, _, at_cancel = call(served, "DELETE", f"/v1/jobs/{long['id']}")
    assert status == 200
    job = wait_for(served, long["id"])
    assert job["status"] == "cancelled" and job["step"] <= at_cancel["step"] + 1 and not job["images"]
    finished = [wait_for(served, i) for i in queued]
    assert all(j["status"] == "succeeded" for j in finished)
    starts = [j["started"] for j in finished]
    assert starts == sorted(starts)
    assert call(served, "DELETE", f"/v1/jobs/{queued[0]}")[0] == 409


def test_a_full_queue_answers_429(served, monkeypatch):
    monkeypatch.setattr(served.srv, "max_queue", 2)
    _, _, long = call(served, "POST", "/v1/jobs", {"prompt": "a red fox", "size": "32x32", "steps": 1000})
    wait_for(served, long["id"], until=("running",))
    waiting = [call(served, "POST", "/v1/jobs", {"prompt": "a red fox", **SMALL})[2]["id"] for _ in range(2)]
    status, headers, body = call(served, "POST", "/v1/jobs", {"prompt": "a red fox", **SMALL})
    assert status == 429 and int(headers["Retry-After"]) >= 1 and body["error"]["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        served.client.images.generate(prompt="a red fox", extra_body=SMALL)
    status, _, cancelled = call(served, "DELETE", f"/v1/jobs/{waiting[0]}")
    assert status == 200 and cancelled["status"] == "cancelled"
    call(served, "DELETE", f"/v1/jobs/{long['id']}")
    assert wait_for(served, waiting[1])["status"] == "succeeded"


def multipart(fields: dict, files: list) -> tuple[bytes, dict]:
    boundary = "flux2testboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
              f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n"
              for k, name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/images/generations", {"prompt": "x", "size": "33x32"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "n": 9}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    ("/v1/images/generations", {"size": "32x32"}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "steps": "many"}, 400, "steps"),
    ("/v1/images/generations", {"prompt": "x", "negative_prompt": "blur"}, 400, "negative_prompt"),
    ("/v1/images/generations", {"prompt": "x", "seeds": 1}, 400, "seeds"),
    ("/v1/jobs", b'{"prompt": "x",', 400, None),
    ("/v1/jobs", b"[1, 2]", 400, None),
    ("/v1/images/edits", ({"prompt": "x"}, [("image[]", "notes.png", b"not a picture")]), 400, "image[0]"),
    ("/v1/images/edits", ({"prompt": "x"}, [("image", "huge.png", bytes(2**20 + 1))]), 413, None),
    ("/v1/images/edits", ({"prompt": "x"}, []), 400, "image"),
    ("/v1/images/edits", b"--x\r\nnot a form", 400, None),
    ("/v1/images/generations", {"prompt": "x"}, 401, None),
    ("/v1/images/generations", {"prompt": "x"}, 403, None),
    ("/v1/jobs", {"prompt": "x"}, 403, "host"),
])
def test_bad_input_is_a_4xx_with_an_openai_error_and_writes_nothing(served, path, body, status, param):
    before = sorted(served.out.iterdir())
    jobs = len(served.srv.jobs)
    headers = {"Content-Type": "multipart/form-data; boundary=x"} if path.endswith("edits") else None
    if isinstance(body, tuple):
        body, headers = multipart(*body)
    key = "wrong" if status == 401 else KEY
    if status == 403:  # a page elsewhere posting through the browser; a name rebound to 127.0.0.1
        headers = {"Host": "rebound.example"} if param == "host" else {"Origin": "https://example.com"}
        param = None
    got, _, answer = call(served, "POST", path, None if isinstance(body, bytes) else body, key=key,
                          raw=body if isinstance(body, bytes) else None, headers=headers)
    assert got == status, answer
    error = answer["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert sorted(served.out.iterdir()) == before and len(served.srv.jobs) == jobs
    assert call(served, "GET", "/healthz")[2]["status"] == "ok"


def test_a_wrong_key_is_refused_by_the_openai_client(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="a red fox", extra_body=SMALL)


def test_serve_command(tiny_repo, monkeypatch, tmp_path):
    """flux2 serve loads the model before listening (a bad file is one error line), warns when it listens
    beyond loopback without a key, and hands the app to uvicorn."""
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw))
    out = tmp_path / "out"
    serve = ["serve", "--model-path", str(tiny_repo)]
    r = CliRunner().invoke(main, [*serve, "--host", "0.0.0.0", "--port", "9000", "--output-dir", str(out)])
    assert r.exit_code == 0, r.output
    assert "warning: listening on 0.0.0.0 without --api-key" in r.output and out.is_dir()
    assert "model klein-4b (the file name" in r.output  # -m left out: the files' variant, as generate says
    assert ran == {"host": "0.0.0.0", "port": 9000, "log_level": "warning"}
    r = CliRunner().invoke(main, [*serve, "--api-key", "k"])
    assert r.exit_code == 0 and "warning" not in r.output
    ran.clear()
    r = CliRunner().invoke(main, [*serve, "--transformer", str(tiny_repo / "vae" / "config.json")])
    assert r.exit_code == 2 and r.output.splitlines()[-1].startswith("error: ") and not ran, r.output
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        r = CliRunner().invoke(main, [*serve, "--port", port])
    assert r.exit_code == 2 and r.output.startswith(f"error: cannot listen on 127.0.0.1:{port}") and not ran


def test_rapid_submissions_lose_nothing(served):
    """200 submissions from 8 threads against a queue of 16: every accepted job finishes, the rest got 429."""
    answers = []

    def submit(count):
        for _ in range(count):
            status, _, body = call(served, "POST", "/v1/jobs", {"prompt": "a red fox", **SMALL})
            answers.append((status, body))

    threads = [threading.Thread(target=submit, args=(25,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 200 and {status for status, _ in answers} <= {202, 429}
    accepted = [body["id"] for status, body in answers if status == 202]
    assert 16 <= len(accepted) < 200
    assert all(wait_for(served, i)["status"] == "succeeded" for i in accepted)
    assert all(body["error"]["code"] == "queue_full" for status, body in answers if status == 429)


def test_loras_per_request_equal_flux2_generate(served, fox, tiny_repo, tmp_path, monkeypatch):
    """A request's loras are applied for it (and recorded as generate records them); the next request
    without any runs the plain model again."""
    from flux2_mlx.config import transformer_shapes
    from flux2_mlx.weights import save_safetensors

    rng = np.random.default_rng(1)
    layer = "double_blocks.0.img_attn.qkv"
    rows, cols = transformer_shapes(served.srv.pipe.spec.transformer)[f"{layer}.weight"]
    save_safetensors(tmp_path / "style.safetensors", {  # rank 4 on one fused QKV, in ai-toolkit's names
        f"diffusion_model.{layer}.lora_A.weight": rng.standard_normal((4, cols), np.float32),
        f"diffusion_model.{layer}.lora_B.weight": rng.standard_normal((rows, 4), np.float32)})
    monkeypatch.chdir(tmp_path)
    body = {"prompt": "a red fox", "size": "32x32", "steps": 1, "seed": 5}
    styled = cli_png(tiny_repo, tmp_path / "cli.png", "--lora", "style.safetensors:0.7")
    for loras, expected in (([{"file": "style.safetensors", "scale": 0.7}], styled), ([], fox)):
        status, _, r = call(served, "POST", "/v1/images/generations", {**body, "loras": loras})
        assert status == 200, r
        assert base64.b64decode(r["data"][0]["b64_json"]) == expected
    assert styled != fox
    status, _, r = call(served, "POST", "/v1/images/generations", {**body, "loras": ["missing.safetensors"]})
    assert status == 400 and "missing.safetensors" in r["error"]["message"]


def test_models_switch_when_a_request_names_another(served, tiny_repo, tmp_path):
    """klein-base-4b (true CFG, a negative prompt) is loaded when a request names it, the job's events say
    so, the PNG is generate's; a request naming no model stays on it. (Last in the module: it leaves the
    server on klein base.)"""
    base = {"prompt": "a red fox", "size": "32x32", "steps": 1, "seed": 5, "model": "klein-base-4b",
            "negative_prompt": "blurry"}
    _, _, job = call(served, "POST", "/v1/jobs", base)
    events = sse(served, job["id"])
    assert ("model", {"id": job["id"], "model": "klein-base-4b", "previous": "klein-4b"}) in events
    expected = cli_png(tiny_repo, tmp_path / "base.png", "--model", "klein-base-4b", "--transformer",
                       served.base, "--negative-prompt", "blurry")
    assert events[-1][0] == "done", events
    with urllib.request.urlopen(served.url + events[-1][1]["images"][0]["url"]) as f:
        assert f.read() == expected
    _, _, job = call(served, "POST", "/v1/jobs", {**base, "model": None})
    assert "model" not in [n for n, _ in sse(served, job["id"])]
    assert call(served, "GET", "/healthz")[2]["model"] == "klein-base-4b"
