"""`flux2 serve`: a local HTTP server for apps. OpenAI's images API (generations, edits), a job queue with
progress events, and a web page, on Starlette + uvicorn (`pip install 'flux2-mlx[serve]'`).

One worker thread loads the pipeline and runs one job at a time, so MLX and torch only ever run on that
thread; request handlers check the input, queue jobs and read their events.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import gc
import io
import json
import math
import re
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .config import ModelSpec, default_strength
from .images import read_image
from .lora import split_spec

MAX_IMAGES = 8  # n, as OpenAI's API allows at most 10 and a local GPU makes them one by one
MAX_STEPS = 1000
KEEP_JOBS = 100  # finished jobs (and their images) kept in memory for the gallery and /files
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
STATIC = Path(__file__).with_name("static")
# OpenAI request fields that mean nothing for a local FLUX.2 model; apps send them, so they are ignored.
IGNORED = {"background", "moderation", "output_compression", "partial_images", "quality", "style", "user",
           "safety_identifier", "input_fidelity", "complexity"}
OURS = {"seed", "steps", "guidance", "negative_prompt", "strength", "loras", "preview_every"}
PREVIEW_TOKENS = 16  # a preview decodes the latents pooled to at most this many tokens a side (256 px)
FIELDS = {"prompt", "model", "n", "size", "response_format", "output_format", "stream"} | OURS | IGNORED
FINISHED = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, self.status, headers=self.headers)


@dataclasses.dataclass
class Params:
    """One request's settings, checked. uploads: (file name, PIL image); with a mask the first is the picture
    to inpaint, the rest references."""

    prompt: str
    model: str
    n: int = 1
    width: int | None = None
    height: int | None = None
    response_format: str = "b64_json"
    output_format: str = "png"
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    strength: float | None = None
    loras: list = dataclasses.field(default_factory=list)
    preview_every: int = 0
    uploads: list = dataclasses.field(default_factory=list)
    mask: tuple | None = None

    def files(self, part: int) -> dict:
        """The uploads as prepare_inputs and the PNG's settings take them: images (references), image (the
        picture to inpaint) and mask; part 0 gives their file names, 1 their PIL images."""
        items = [upload[part] for upload in self.uploads]
        if self.mask is None:
            return dict(images=items or None, image=None, mask=None)
        return dict(images=items[1:] or None, image=items[0], mask=self.mask[part])

    def settings(self) -> dict:
        """What the job page and the gallery show."""
        names = [name for name, _ in self.uploads] + ([self.mask[0]] if self.mask else [])
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("uploads", "mask")}
        return {**out, "files": names}


@dataclasses.dataclass
class Job:
    id: str
    params: Params
    inputs: object  # pipeline.Inputs, prepared when the request came in; dropped once the job ends
    seeds: list[int]
    size: str = ""
    settings: dict = dataclasses.field(default_factory=dict)
    created: float = dataclasses.field(default_factory=time.time)
    status: str = "queued"
    step: int = 0
    total: int = 0
    started: float | None = None
    elapsed: float = 0.0
    eta: float | None = None
    cancel: bool = False
    error: ApiError | None = None
    results: list = dataclasses.field(default_factory=list)  # dicts: token (the /files name), seed, data
    events: list = dataclasses.field(default_factory=list)  # (name, data) in order; SSE ids are indexes
    waiters: list = dataclasses.field(default_factory=list)  # (event loop, future): requests awaiting one
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __post_init__(self):
        self.size, self.settings = f"{self.inputs.width}x{self.inputs.height}", self.params.settings()

    def emit(self, name: str, **data) -> None:
        """Add an event (on the worker thread or the event loop) and wake the requests waiting for one."""
        with self.lock:
            self.events.append((name, {"id": self.id, **data}))
            waiters, self.waiters = self.waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_wake, future)

    async def more_than(self, count: int) -> None:
        """Return once the job has more than `count` events."""
        loop = asyncio.get_running_loop()
        while True:
            with self.lock:  # checked and registered together: an event added in between wakes the future
                if len(self.events) > count:
                    return
                future = loop.create_future()
                self.waiters.append((loop, future))
            await future

    def release(self) -> None:
        """Drop the prepared and uploaded images (up to 10 references a job) once they cannot be used."""
        self.inputs = None
        self.params = dataclasses.replace(self.params, uploads=[], mask=None)


def _number(fields: dict, name: str, kind, lo, hi=None, lo_open=False):
    """fields[name] as an int or float in [lo, hi] (JSON numbers, or the strings of a multipart form)."""
    value = fields.get(name)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (bool, list, dict)):
            raise ValueError
        number = kind(value) if kind is float else int(str(value))
        if kind is float and not math.isfinite(number):
            raise ValueError
    except ValueError:
        raise ApiError(400, f"{name} must be {'a whole number' if kind is int else 'a number'}, got "
                            f"{json.dumps(value)[:40]}", name) from None
    if number < lo or (lo_open and number == lo) or (hi is not None and number > hi):
        span = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else '∞'}]"
        raise ApiError(400, f"{name} must be in {span}, got {number}", name)
    return number


def _loras(value) -> list[tuple[str, float]]:
    """loras: a list of "file[:scale]" strings or {"file", "scale"} objects (files on the server's disk or
    owner/repo/file.safetensors on Hugging Face)."""
    if value in (None, ""):
        return []
    if isinstance(value, str):  # a multipart form sends JSON text
        try:
            value = json.loads(value)
        except ValueError:
            value = [value]
    if not isinstance(value, list):
        raise ApiError(400, "loras must be a list of \"file[:scale]\" or {\"file\", \"scale\"}", "loras")
    out = []
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("file"), str):
            name, scale = item["file"], item.get("scale", 1.0)
        elif isinstance(item, str):
            name, scale = split_spec(item)
            scale = 1.0 if scale is None else scale
        else:
            raise ApiError(400, f"loras: {json.dumps(item)[:60]} is not \"file[:scale]\" or {{\"file\", "
                                f"\"scale\"}}", "loras")
        out.append((name, _number({"scale": scale}, "scale", float, -math.inf)))
    return out


def parse_params(fields: dict, uploads: list, mask, specs: dict[str, ModelSpec], default: str) -> Params:
    """A request's fields (JSON or multipart strings) checked against the model they name (one of `specs`;
    none named: `default`)."""
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; this server takes: {', '.join(sorted(FIELDS))}",
                       unknown[0])
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "prompt is required: a non-empty string", "prompt")
    model = fields.get("model") or default
    if not isinstance(model, str) or model not in specs:
        raise ApiError(404, f"model {model!r} is not served here; this server runs {', '.join(specs)}",
                       "model", "model_not_found")
    spec = specs[model]
    if fields.get("stream") in (True, "true"):
        raise ApiError(400, "streaming partial images is not supported; POST /v1/jobs and read "
                            "/v1/jobs/{id}/events for progress", "stream")
    p = Params(prompt, model, uploads=uploads, mask=mask)
    p.n = _number(fields, "n", int, 1, MAX_IMAGES) or 1
    size = fields.get("size") or "auto"
    if size != "auto":
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", str(size))
        if not match:
            raise ApiError(400, f"size must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\", got "
                                f"{json.dumps(size)[:40]}", "size")
        p.width, p.height = int(match[1]), int(match[2])
    for name, choices in (("response_format", ("b64_json", "url")), ("output_format", tuple(FORMATS))):
        value = fields.get(name) or getattr(p, name)
        if value not in choices:
            raise ApiError(400, f"{name} must be one of {', '.join(choices)}, got {json.dumps(value)[:40]}",
                           name)
        setattr(p, name, value)
    p.seed = _number(fields, "seed", int, 0, 2**32 - 1)
    p.steps = _number(fields, "steps", int, 1, MAX_STEPS)
    p.guidance = _number(fields, "guidance", float, 0)
    if spec.guidance_mode == "none":  # guidance-distilled: as `flux2 generate`, which warns and drops it
        p.guidance = None
    p.strength = _number(fields, "strength", float, 0, 1, lo_open=True)
    if p.strength is not None and mask is None:
        raise ApiError(400, "strength needs an image to start from: send image and mask to /v1/images/edits",
                       "strength")
    negative = fields.get("negative_prompt")
    if negative not in (None, ""):
        if spec.guidance_mode != "cfg":
            raise ApiError(400, f"{spec.name} takes no negative prompt (only klein-base-4b/9b do)",
                           "negative_prompt")
        if not isinstance(negative, str):
            raise ApiError(400, "negative_prompt must be a string", "negative_prompt")
        p.negative_prompt = negative
    p.loras = _loras(fields.get("loras"))
    p.preview_every = _number(fields, "preview_every", int, 0, MAX_STEPS) or 0
    return p


def uploaded_image(name: str, data: bytes, what: str):
    """(name, PIL image), fully decoded now (images.read_image) so that a broken or non-image upload is
    refused up front."""
    try:
        return name, read_image(data, what)
    except ValueError:
        raise ApiError(400, f"{what} ({name}) is not a readable image (PNG, JPEG, WebP, …)", what,
                       "invalid_image") from None


class ImageServer:
    """The queue, the worker thread that owns the pipeline, and the HTTP app (`app`).

    load(name): makes that model's pipeline (called on the worker thread); specs: the models requests may
    name, the first loaded at start; another is loaded (the one before freed) when a job names it, and a
    request that names none gets the last one named. output_dir: where every image is also saved as a PNG
    (None: kept in memory only). hosts: the only host names requests may be addressed to (a loopback
    server's own names), or None for any."""

    def __init__(self, load, specs: list[ModelSpec], *, api_key: str | None = None,
                 output_dir: Path | None = None, max_queue: int = 16, max_upload: int = 50 * 2**20,
                 hosts: set[str] | None = None):
        self.load, self.api_key, self.output_dir = load, api_key, output_dir
        self.specs = {spec.name: spec for spec in specs}
        self.default = specs[0].name
        self.max_queue, self.max_upload = max_queue, max_upload
        self.pipe = self.load_error = None
        self.ready = threading.Event()
        self.cond = threading.Condition()  # guards jobs and queue; the worker waits on it
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.last_duration = 1.0  # seconds of the last job: the Retry-After estimate
        self.files: dict[str, tuple[bytes, str]] = {}  # token → (bytes, media type)
        self.worker = threading.Thread(target=self._work, name="flux2-worker", daemon=True)
        api = [("/v1/images/generations", self.generations, ["POST"]),
               ("/v1/images/edits", self.edits, ["POST"]),
               ("/v1/jobs", self.submit, ["POST"]), ("/v1/jobs", self.list_jobs, ["GET"]),
               ("/v1/jobs/{id}", self.job_status, ["GET"]), ("/v1/jobs/{id}", self.cancel, ["DELETE"]),
               ("/v1/jobs/{id}/events", self.events, ["GET"]), ("/v1/models", self.models, ["GET"])]
        # The page, its files, health and result files need no key: a result's URL is a 128-bit secret.
        public = [Route("/", self.page), Route("/static/{name}", self.static), Route("/healthz", self.health),
                  Route("/files/{name}", self.file)]
        routes = [Route(path, self._guard(fn), methods=methods) for path, fn, methods in api]
        self.app = Starlette(routes=public + routes)
        if hosts is not None:
            self.app = _only_hosts(self.app, hosts)

    # ---- the worker ----

    def start(self) -> None:
        """Start the worker, which loads the model first; wait_ready() tells whether that worked."""
        self.worker.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; re-raise its loading error."""
        self.ready.wait(timeout)
        if self.load_error is not None:
            raise self.load_error

    def _work(self) -> None:
        try:
            self.pipe = self.load(self.default)
        except Exception as e:  # noqa: BLE001 - handed to wait_ready; each job then tries to load again
            self.load_error = e
        self.ready.set()
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                job = self.running = self.queue.popleft()
                job.status, job.started = "running", time.time()
            self._run(job)
            job.release()
            with self.cond:
                self.running = None
                self.last_duration = time.time() - job.started
                self._prune()

    def _run(self, job: Job) -> None:
        from .weights import WeightsError

        try:
            if self.pipe is None or self.pipe.spec.name != job.params.model:
                self._switch(job)
            self._generate(job)
            job.status = "succeeded"
            job.emit("done", **self._summary(job))
        except _Cancelled:
            job.status = "cancelled"
            job.emit("cancelled", step=job.step, total=job.total)
        except (ValueError, WeightsError, OSError) as e:  # bad input found only while running (a LoRA file)
            self._fail(job, ApiError(400, str(e)))
        except ApiError as e:
            self._fail(job, e)
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the job says what happened
            self._fail(job, ApiError(500, f"{type(e).__name__}: {e}", code="server_error"))

    def _switch(self, job: Job) -> None:
        """Load the job's model in place of the one held, which is freed first: two rarely fit."""
        old, self.pipe = self.pipe, None
        job.emit("model", model=job.params.model, previous=old and old.spec.name)
        if old is not None:
            backend = old.backend
            del old
            gc.collect()  # the pipeline's arrays, before the backend returns their memory
            backend.free()
        self.pipe = self.load(job.params.model)
        self.load_error = None

    def _fail(self, job: Job, error: ApiError) -> None:
        job.error, job.status = error, "failed"
        job.emit("error", message=error.message, status=error.status)

    def _generate(self, job: Job) -> None:
        """One job as `flux2 generate` runs it (generation.images), its steps turned into job events."""
        from . import hub
        from .cli import save_png
        from .generation import Phase, Result, Step, denoise_steps, images
        from .pipeline import GenerationRequest

        pipe, p, inputs = self.pipe, job.params, job.inputs
        loras = [(name, hub.lora_file(name), scale) for name, scale in p.loras]
        if [(str(f), s) for _, f, s in loras] != [(str(f), s) for f, s in pipe.loras]:
            pipe.set_loras([(f, s) for _, f, s in loras])
        lora_meta = [{**record, "file": name} for (name, _, _), record in zip(loras, pipe.lora_records)]
        strength = default_strength() if p.strength is None else p.strength
        request = GenerationRequest(inputs, job.seeds[0], prompt=p.prompt, negative_prompt=p.negative_prompt,
                                    strength=strength, steps=p.steps, guidance=p.guidance)
        job.total = denoise_steps(pipe, request) * len(job.seeds)
        job.emit("started", total=job.total, queue_wait=round(job.started - job.created, 3))
        plan = pipe.plan(inputs.width, inputs.height, request.guidance, inputs)
        edit = dict(width=p.width, height=p.height, **p.files(0), mask_crop=None, mask_blur=0.0, expand=None)
        begin = None
        for event in images(pipe, request, plan, job.seeds, edit, lora_meta):
            if isinstance(event, Phase) and begin is None and event.name == "denoise":
                begin = time.perf_counter()  # elapsed and ETA count the denoising, not the prompt's encoding
            elif isinstance(event, Step):
                job.step += 1
                job.elapsed = time.perf_counter() - begin
                job.eta = job.elapsed / job.step * (job.total - job.step)
                job.emit("progress", step=job.step, total=job.total, image=event.index,
                         elapsed=round(job.elapsed, 3), eta=round(job.eta, 3))
                if job.cancel:  # between steps: the step just made is the last
                    raise _Cancelled
                if p.preview_every and job.step % p.preview_every == 0 and job.step < job.total:
                    job.emit("preview", step=job.step, image=event.index, url=preview(pipe, event.latents,
                                                                                       inputs))
            elif isinstance(event, Result):
                if self.output_dir is not None:
                    save_png(self.output_dir / f"{job.id}-{event.seed}.png", event.png)
                self._keep(job, event.seed, event.png, event.image)

    def _keep(self, job: Job, seed: int, png: bytes, image) -> None:
        fmt, media = FORMATS[job.params.output_format]
        data = png
        if fmt != "PNG":  # settings travel in the PNG only; --output-dir keeps the PNG
            buf = io.BytesIO()
            image.save(buf, format=fmt, quality=95)
            data = buf.getvalue()
        token = f"{secrets.token_hex(16)}.{job.params.output_format}"
        with self.cond:
            self.files[token] = (data, media)
        job.results.append(dict(token=token, seed=seed, data=data))
        job.emit("image", index=len(job.results) - 1, seed=seed, url=f"/files/{token}")

    def _prune(self) -> None:
        """Forget the oldest finished jobs and their files beyond KEEP_JOBS (called holding cond)."""
        finished = [j for j in self.jobs.values() if j.status in FINISHED]
        for job in finished[:max(0, len(finished) - KEEP_JOBS)]:
            del self.jobs[job.id]
            for r in job.results:
                self.files.pop(r["token"], None)

    # ---- requests ----

    def _guard(self, fn):
        """The API key check and OpenAI-style errors around an endpoint."""
        async def endpoint(request: Request):
            try:
                # A web page elsewhere may POST here through the visitor's browser (forms need no CORS
                # preflight); browsers name that page's origin: only this server's own page is let in.
                origin = request.headers.get("origin")
                host = request.headers.get("host")
                if request.method != "GET" and origin and urlsplit(origin).netloc != host:
                    raise ApiError(403, f"requests from web pages at {origin} are refused; only this "
                                        f"server's own page may send them", code="cross_origin")
                if self.api_key is not None:
                    given = request.headers.get("authorization", "")
                    if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                        raise ApiError(401, "a wrong or missing API key; send 'Authorization: Bearer KEY'",
                                       code="invalid_api_key")
                return await fn(request)
            except ApiError as e:
                return e.response()
            except Exception as e:  # noqa: BLE001 - a bug answers as the API does; the server keeps serving
                return ApiError(500, f"{type(e).__name__}: {e}", code="server_error").response()
        return endpoint

    async def _body(self, request: Request) -> bytes:
        """The request body; past max_upload a 413, the rest of the body read and dropped unkept (a client
        still sending would otherwise see a reset connection instead of the answer)."""
        limit = self.max_upload
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            raise ApiError(413, f"the request is larger than the server's limit of {limit / 2**20:g} MB "
                                f"(flux2 serve --max-upload-mb)", code="request_too_large")
        return b"".join(chunks)

    async def _read(self, request: Request) -> Params:
        """A JSON or multipart request's Params, its uploads decoded; all checked before anything queues."""
        body = await self._body(request)
        kind = request.headers.get("content-type", "")
        uploads, mask = [], None
        if kind.startswith("multipart/form-data"):
            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(max_part_size=self.max_upload)
            except HTTPException as e:  # Starlette's word for a malformed form
                raise ApiError(400, f"a malformed multipart form: {e.detail}", code="invalid_form") from None
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            try:
                for key, value in form.multi_items():
                    if isinstance(value, str):
                        continue
                    data = await value.read()
                    name = Path(value.filename or key).name
                    if key in ("image", "image[]"):
                        uploads.append(uploaded_image(name, data, f"image[{len(uploads)}]"))
                    elif key == "mask":
                        mask = uploaded_image(name, data, "mask")
                    else:
                        raise ApiError(400, f"unknown file field {key!r}; send image (or image[]) and mask",
                                       key)
            finally:
                await form.close()  # the uploads' temporary files
        else:
            try:
                fields = json.loads(body)
            except (ValueError, RecursionError):
                raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
            if not isinstance(fields, dict):
                raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        if mask is not None and not uploads:
            raise ApiError(400, "a mask needs the image it covers: send image too", "mask")
        return parse_params(fields, uploads, mask, self.specs, self.default)

    async def _queue(self, request: Request, need_images: bool = False) -> Job:
        from .pipeline import prepare_inputs

        p = await self._read(request)
        if need_images and not p.uploads:
            raise ApiError(400, "image is required: one or more reference images (image or image[])", "image")
        try:  # reads and scales the images: off the event loop
            inputs = await asyncio.to_thread(prepare_inputs, p.model, p.width, p.height, **p.files(1))
        except (ValueError, OSError) as e:  # a size, a reference too small or too narrow, a mask's shape
            raise ApiError(400, str(e), "size" if "width and height" in str(e) or " MP" in str(e) else None)
        first = secrets.randbelow(2**31) if p.seed is None else p.seed
        job = Job(secrets.token_hex(8), p, inputs, [first + i for i in range(p.n)])
        with self.cond:
            if len(self.queue) >= self.max_queue:
                wait = max(1, math.ceil(self.last_duration * (len(self.queue) + 1)))
                raise ApiError(429, f"the queue is full ({self.max_queue} jobs waiting); retry in {wait} s",
                               code="queue_full", headers={"Retry-After": str(wait)})
            self.jobs[job.id] = job
            self.queue.append(job)
            self.default = p.model  # models switch only when a request names another
            job.emit("queued", position=len(self.queue))
            self.cond.notify()
        return job

    async def _finished(self, job: Job) -> Job:
        seen = len(job.events)
        while job.status not in FINISHED:  # a job's status changes before the event that tells it
            await job.more_than(seen)
            seen = len(job.events)
        return job

    def _images_response(self, request: Request, job: Job) -> JSONResponse:
        """OpenAI's images response: b64_json or url per image, plus our seed."""
        if job.error is not None:
            return job.error.response()
        if job.status == "cancelled":
            return ApiError(409, "the job was cancelled", code="cancelled").response()
        p, base = job.params, str(request.base_url).rstrip("/")
        data = [{"b64_json": base64.b64encode(r["data"]).decode()} if p.response_format == "b64_json"
                else {"url": f"{base}/files/{r['token']}"} for r in job.results]
        for item, r in zip(data, job.results):
            item.update(seed=r["seed"], revised_prompt=None)
        return JSONResponse(dict(created=int(job.created), data=data, output_format=p.output_format,
                                 size=job.size))

    async def generations(self, request: Request):
        job = await self._queue(request)
        return self._images_response(request, await self._finished(job))

    async def edits(self, request: Request):
        job = await self._queue(request, need_images=True)
        return self._images_response(request, await self._finished(job))

    async def submit(self, request: Request):
        job = await self._queue(request)
        return JSONResponse(self._summary(job), 202)

    def _summary(self, job: Job) -> dict:
        with self.cond:
            position = next((i + 1 for i, j in enumerate(self.queue) if j is job), 0)
        error = job.error and {"message": job.error.message, "status": job.error.status}
        return dict(id=job.id, object="job", status=job.status, created=job.created, started=job.started,
                    step=job.step,
                    total=job.total, elapsed=round(job.elapsed, 3), eta=job.eta and round(job.eta, 3),
                    queue_position=position, settings=job.settings, seeds=job.seeds, size=job.size,
                    error=error,
                    images=[dict(url=f"/files/{r['token']}", seed=r["seed"]) for r in job.results])

    def _job(self, request: Request) -> Job:
        job = self.jobs.get(request.path_params["id"])
        if job is None:
            raise ApiError(404, f"no job {request.path_params['id']!r}", "id", "job_not_found")
        return job

    async def job_status(self, request: Request):
        return JSONResponse(self._summary(self._job(request)))

    async def list_jobs(self, request: Request):
        with self.cond:
            jobs = list(self.jobs.values())
        return JSONResponse({"object": "list", "data": [self._summary(j) for j in reversed(jobs)]})

    async def cancel(self, request: Request):
        """A queued job leaves the queue; a running one stops after the step it is making."""
        job = self._job(request)
        with self.cond:
            if job.status in FINISHED:
                raise ApiError(409, f"job {job.id} has already {job.status}", "id", "job_finished")
            if job in self.queue:
                self.queue.remove(job)
                job.release()
                job.status = "cancelled"
                job.emit("cancelled", step=0, total=job.total)
            job.cancel = True
        return JSONResponse(self._summary(job))

    async def events(self, request: Request):
        """Server-sent events: queued, started, progress (step, total, elapsed, eta), image, then one of
        done, error, cancelled. A reconnecting client's Last-Event-ID resumes after that event."""
        job = self._job(request)
        last = request.headers.get("last-event-id", "-1")
        start = int(last) + 1 if last.lstrip("-").isdigit() else 0

        async def stream():
            sent = start
            while True:
                await job.more_than(sent)
                while sent < len(job.events):
                    name, data = job.events[sent]
                    yield f"id: {sent}\nevent: {name}\ndata: {json.dumps(data)}\n\n"
                    sent += 1
                    if name in ("done", "error", "cancelled"):
                        return

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def models(self, request: Request):
        """The models requests may name, the loaded one first, with their defaults."""
        loaded = self.pipe and self.pipe.spec.name
        specs = sorted(self.specs.values(), key=lambda spec: spec.name != loaded)
        return JSONResponse({"object": "list", "data": [dict(
            id=spec.name, object="model", created=0, owned_by="black-forest-labs", loaded=spec.name == loaded,
            default_steps=spec.default_steps, default_guidance=spec.default_guidance,
            guidance_mode=spec.guidance_mode) for spec in specs]})

    async def health(self, request: Request):
        status = "error" if self.load_error is not None else "ok" if self.ready.is_set() else "loading"
        with self.cond:
            queued, running = len(self.queue), self.running and self.running.id
        loaded = self.pipe and self.pipe.spec.name
        return JSONResponse(dict(status=status, model=loaded, queued=queued, running=running),
                            503 if status == "error" else 200)

    async def file(self, request: Request):
        found = self.files.get(request.path_params["name"])
        if found is None:
            return ApiError(404, "no such file (results are kept for the last jobs only)").response()
        return Response(found[0], media_type=found[1])

    async def page(self, request: Request):
        return FileResponse(STATIC / "index.html")

    async def static(self, request: Request):
        path = STATIC / request.path_params["name"]
        if path.parent != STATIC or not path.is_file():
            return ApiError(404, "no such file").response()
        return FileResponse(path)


def preview(pipe, latents, inputs) -> str:
    """A data: URL of a small JPEG of the current latents: pooled to at most PREVIEW_TOKENS tokens a side
    and decoded, a few hundredths of a full decode's work. Noisy early on, as the latents are."""
    import numpy as np

    h, w = inputs.height // 16, inputs.width // 16
    fy, fx = math.ceil(h / PREVIEW_TOKENS), math.ceil(w / PREVIEW_TOKENS)
    grid = np.asarray(latents).reshape(h, w, -1)[: h // fy * fy, : w // fx * fx]
    pooled = grid.reshape(h // fy, fy, w // fx, fx, -1).mean((1, 3))
    image = pipe.decode(pooled.reshape(1, -1, pooled.shape[-1]), w // fx * 16, h // fy * 16)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _only_hosts(app, hosts: set[str]):
    """Refuse requests addressed to other host names. DNS rebinding: a web page at a name that an attacker
    points at 127.0.0.1 would be same-origin to a loopback server, and read and drive it."""
    async def checked(scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if urlsplit(f"//{host}").hostname not in hosts:
                error = ApiError(403, f"this server answers to {', '.join(sorted(hosts))}, not {host!r}",
                                 code="unknown_host")
                return await error.response()(scope, receive, send)
        await app(scope, receive, send)
    return checked


def _wake(future) -> None:
    if not future.done():  # a request that went away cancelled it
        future.set_result(None)


class _Cancelled(Exception):
    """A job's DELETE, seen between two steps."""
