"""The Ray Serve application: a FastAPI ingress and one model deployment for every model.

- ``Synthesizer`` hosts every card of the registry (``@serve.multiplexed``: models load on
  first use, least recently used ones are dropped) and batches slices across concurrent
  requests (``@serve.batch``). Replicas, autoscaling, CPUs/GPUs come from the Serve config
  (``platform/serve.yaml``); it uses a GPU when its replica has one.
- ``Ingress`` answers HTTP: it unpacks and reads the upload (``serve.exam``), asks the
  synthesizer for each contrast, writes the results back on the MRF geometry
  (``serve.dicomout``) and serves the viewer page.

``build_app(args)`` is the application builder: ``serve run serve.app:build_app models=models``,
the Serve config's ``import_path`` and ``qsnet serve`` all go through it.
"""


import asyncio
import hmac
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect
from ray import serve
from ray.exceptions import TaskCancelledError

from serve.catalog import CONTRASTS, load_catalog, public_card, select
from serve.dicomout import check_uid_root
from serve.exam import Limits, RequestError, model_input, read_exam, unpack

log = logging.getLogger("ray.serve")
API_KEYS_ENV = "QSNET_API_KEYS"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def api_keys(configured=None) -> list[str]:
    """Bearer tokens: ``$QSNET_API_KEYS`` (comma-separated) and those of the Serve config."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if isinstance(configured, str):
        configured = configured.split(",")
    keys += [str(k).strip() for k in (configured or []) if str(k).strip()]
    return keys


def check_bind(host: str, keys: list[str]) -> None:
    if not keys and host not in LOOPBACK:
        raise ValueError(f"refusing to serve on {host} without API keys: set {API_KEYS_ENV} (comma-separated bearer "
                         "tokens) or api_keys in the Serve config, or bind to 127.0.0.1")


# Module-level helpers the deployments call sit above them: Serve pickles the ingress class
# when it is decorated, and a name defined later in the module is missing in the replica.
def _png(img: np.ndarray) -> str:
    import base64

    import matplotlib.image as mpimg

    a = np.asarray(img, np.float32)
    hi = float(np.percentile(a, 99.5)) or 1.0
    out = io.BytesIO()
    mpimg.imsave(out, np.clip(a / hi, 0, 1), cmap="gray", vmin=0, vmax=1, format="png")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _viewer_doc(exam, stored: dict, record: dict, zip_bytes: bytes) -> dict:
    import base64

    from serve.dicomout import LABELS

    panels = {"MRF T1 (ms)": exam.t1, "MRF T2 (ms)": exam.t2}
    panels.update({f"{LABELS[c]} (synthetic)": v for c, v in stored.items()})
    return {"slices": int(exam.t1.shape[0]),
            "panels": {name: [_png(v[k]) for k in range(v.shape[0])] for name, v in panels.items()},
            "synthesis": record, "zip_base64": base64.b64encode(zip_bytes).decode()}


@serve.deployment(name="Synthesizer", max_ongoing_requests=64)
class Synthesizer:
    """Every model of the registry; slices of concurrent requests go through one forward."""

    def __init__(self, models: str, cards: list[str] | None = None, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005):
        import torch

        self.catalog, _ = load_catalog(models, cards)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Every torch call of the replica (loads and forwards) runs on this one thread. GNU
        # OpenMP keeps a team of worker threads per calling thread, and once a second thread has
        # run parallel torch work, every CPU forward in the process runs about 1.5x slower
        # (benchmarks/README.md). The event loop's thread and asyncio's default pool are two.
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qsnet-torch")
        self._torch_callers: set[int] = set()
        self.max_batch_size = int(max_batch_size)
        self._forward_batch.set_max_batch_size(self.max_batch_size)
        self._forward_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.forwards = 0

    @serve.multiplexed(max_num_models_per_replica=16)
    async def get_model(self, model_id: str):
        from train import registry

        if model_id not in self.catalog:
            raise KeyError(model_id)
        return await self._in_torch_thread(self._load, registry, model_id)

    async def _in_torch_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._torch, fn, *args)

    def _load(self, registry, model_id: str):
        self._torch_callers.add(threading.get_ident())
        return registry.load(self.catalog[model_id], device=self.device)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _forward_batch(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        out: list = [None] * len(items)
        by_model: dict[str, list[int]] = {}
        for i, (mid, _) in enumerate(items):
            by_model.setdefault(mid, []).append(i)
        for mid, idx in by_model.items():
            model = await self.get_model(mid)
            x = np.stack([items[i][1] for i in idx])
            y = await self._in_torch_thread(self._run, model, x)
            for j, i in enumerate(idx):
                out[i] = y[j]
        return out

    def _run(self, model, x: np.ndarray) -> np.ndarray:
        import torch

        self.forwards += 1
        self._torch_callers.add(threading.get_ident())
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(self.device)).float()[:, 0].cpu().numpy()

    async def synthesize(self, model_id: str, x: np.ndarray) -> np.ndarray:
        """``x`` (Z, 2, H, W) -> (Z, H, W): each slice joins the batch of whatever else is waiting."""
        ys = await asyncio.gather(*[self._forward_batch((model_id, x[k])) for k in range(len(x))])
        return np.stack(ys)

    async def stats(self) -> dict:
        return {"forwards": self.forwards, "device": self.device, "max_batch_size": self.max_batch_size,
                "torch_calling_threads": len(self._torch_callers)}


api = FastAPI(title="qsnet", version="0.1.0",
              description="MRF T1/T2 maps in, synthetic T1w, T2w, T1-FLAIR, T2-FLAIR and SWI out (QS-Net). "
                          "Send a zip of one exam's MRF map series; get one DICOM series per contrast back on "
                          "the MRF geometry, in the original study.")


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError):
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:3])
    return JSONResponse(RequestError(422, "bad_parameter", where).body(), status_code=422)


def _openapi():
    from fastapi.openapi.utils import get_openapi

    if api.openapi_schema:
        return api.openapi_schema
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["status", "code", "message"], "properties": {
            "status": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"}}}}}
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    api.openapi_schema = schema
    return schema


api.openapi = _openapi


def _sweep_uploads(older_than_s: float = 3600.0) -> None:
    """Remove request folders a replica that died mid-request left behind: they hold uploaded
    exams (patient data), and no request runs for an hour."""
    now = time.time()
    for p in Path(tempfile.gettempdir()).glob("qsnet-serve-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# More slots than uploads (Limits.max_concurrent_uploads): the rest answer probes and listings.
@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, synthesizer, models: str, cards: list[str] | None = None,
                 api_keys_: list[str] | str | None = None, limits: dict | None = None, sites: str | None = None,
                 uid_root: str | None = None):
        from ingest.reader import quiet_process
        from ingest.service import load_sites

        # every pydicom read here is an upload's: quiet for the replica's life, not per request,
        # as requests run in threads side by side (pydicom's validation warnings quote values)
        quiet_process()
        self.synth = synthesizer
        self.catalog, self.skipped = load_catalog(models, cards)
        self.keys = api_keys(api_keys_)
        self.limits = Limits.from_dict(limits)
        self.uploads = asyncio.Semaphore(self.limits.max_concurrent_uploads)
        self.sites = load_sites(Path(sites) if sites else None)
        self.uid_root = check_uid_root(uid_root)
        self.viewer = (Path(__file__).parent / "viewer.html").read_text()
        for why in self.skipped:
            log.warning("not served: %s", why)
        _sweep_uploads()

    # ------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> None:
        if not self.keys:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        # bytes: compare_digest refuses a str with non-ASCII characters (a 500 instead of a 401)
        given = token.encode("utf-8", "surrogateescape")
        if not token or not any(hmac.compare_digest(given, k.encode("utf-8")) for k in self.keys):
            raise RequestError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")

    async def _body(self, request: Request) -> tuple[bytes, dict]:
        """The zip and form fields: a raw zip body or a multipart form with a 'file' field.

        Both are read through one byte counter with an idle timeout: a multipart form parsed
        straight from the socket would be spooled whole, past the limit, before any check, and
        an upload that stalls would hold one of the ingress's slots for ever."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limits.max_request_bytes:
            raise RequestError(413, "request_too_large", f"the body is {length} bytes; the limit is "
                               f"{self.limits.max_request_bytes}")
        chunks, n = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=self.limits.idle_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise RequestError(408, "request_timeout", f"no bytes of the body for "
                                   f"{self.limits.idle_timeout_s:g} s; send it again") from None
            except ClientDisconnect:
                # nginx's 499: the client closed the connection; no one reads this answer, the log does
                raise RequestError(499, "client_disconnected", f"the client hung up after {n} bytes of "
                                   "the body") from None
            except TaskCancelledError:
                # Behind Serve's proxy a hang-up can come as the proxy cancelling the task that
                # relays the body; so can a request timeout or a shutdown: not blamed on anyone
                raise RequestError(499, "client_disconnected", f"the body stopped after {n} bytes: Serve "
                                   "cancelled the request (client gone, request timeout or shutdown)") from None
            n += len(chunk)
            if n > self.limits.max_request_bytes:
                raise RequestError(413, "request_too_large", f"the body is over the limit of "
                                   f"{self.limits.max_request_bytes} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, fields = await self._form(request, raw)
        else:
            data, fields = raw, {}
        if not data:
            raise RequestError(400, "empty_body", "empty body: send the exam as a zip")
        return data, fields

    @staticmethod
    async def _form(request: Request, raw: bytes) -> tuple[bytes, dict]:
        from starlette.exceptions import HTTPException
        from starlette.formparsers import MultiPartException

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except (HTTPException, MultiPartException) as exc:
            raise RequestError(400, "bad_multipart", f"the multipart form cannot be read "
                               f"({getattr(exc, 'detail', None) or getattr(exc, 'message', None) or exc})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "no_file", "multipart form without a 'file' field holding the zip")
        return await upload.read(), {k: v for k, v in form.items() if isinstance(v, str)}

    # ------------------------------------------------------------------ routes
    @api.get("/healthz", summary="Liveness: the ingress answers")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: models listed and the model deployment answers",
             responses={503: _ERR})
    async def readyz(self):
        if not self.catalog:
            return JSONResponse(RequestError(503, "no_models", "no servable model card").body(), status_code=503)
        try:
            stats = await asyncio.wait_for(self.synth.stats.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure of the model deployment means not ready
            return JSONResponse(RequestError(503, "model_deployment_down", f"{type(exc).__name__}").body(),
                                status_code=503)
        return {"status": "ready", "models": len(self.catalog), "device": stats["device"]}

    @api.get("/v1/models", summary="The served model cards", responses={401: _ERR})
    async def models(self, request: Request) -> dict:
        self._auth(request)
        return {"models": [public_card(c) for c in self.catalog.values()], "not_served": self.skipped}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def viewer_page(self):
        return HTMLResponse(self.viewer)

    @api.post(
        "/v1/synthesize", summary="Synthesise clinical contrasts from one exam's MRF maps",
        responses={200: {"description": "format=dicom: a zip with one DICOM series per contrast "
                         "(<contrast>/IM0001.dcm ...) and synthesis.json; format=nifti: <contrast>.nii.gz files "
                         "and synthesis.json; format=viewer: JSON with PNG slices and the DICOM zip (base64)",
                         "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}},
                                     "application/json": {"schema": {"type": "object"}}}},
                   400: _ERR, 401: _ERR, 404: _ERR, 408: _ERR, 413: _ERR, 422: _ERR, 503: _ERR},
        openapi_extra={"security": [{"bearer": []}], "requestBody": {"required": True, "content": {
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary"}, "contrasts": {"type": "string"},
                "site": {"type": "string"}, "model": {"type": "string"}, "format": {"type": "string"}}}}}}})
    async def synthesize(
        self, request: Request,
        contrasts: str | None = Query(None, description="comma-separated, of t1w,t2w,t1flair,t2flair,swi "
                                      "(default: all five)"),
        site: str | None = Query(None, description="the exam's site (default: recognised from the DICOM)"),
        model: str | None = Query(None, description="architecture (qsnet), <stage>/<arch>, or a card id"),
        format: str | None = Query(None, description="dicom, nifti or viewer (default dicom; nifti for NIfTI or "
                                   "store uploads)"),
    ):
        rid = uuid.uuid4().hex[:12]
        t0 = time.perf_counter()
        status = 500
        turn = False
        try:
            self._auth(request)
            try:
                turn = await asyncio.wait_for(self.uploads.acquire(), timeout=self.limits.queue_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(503, "busy", f"{self.limits.max_concurrent_uploads} exams are being taken in; "
                                   "send it again in a few seconds") from None
            body, fields = await self._body(request)
            contrasts = fields.get("contrasts", contrasts)
            site = fields.get("site", site) or None
            model = fields.get("model", model) or None
            fmt = fields.get("format", format)
            wanted = [c.strip().lower() for c in (contrasts or ",".join(CONTRASTS)).split(",") if c.strip()]
            unknown = [c for c in wanted if c not in CONTRASTS]
            if unknown or not wanted:
                raise RequestError(422, "unknown_contrast", f"unknown contrast(s) {unknown or contrasts!r}; "
                                   f"choose from {', '.join(CONTRASTS)}")
            if fmt not in (None, "dicom", "nifti", "viewer"):
                raise RequestError(422, "unknown_format", f"format {fmt!r}: dicom, nifti or viewer")
            answer, media, info = await self._synthesize(body, list(dict.fromkeys(wanted)), site, model, fmt)
            status = 200
            log.info("synthesize %s: %d contrast(s), %s input, %.2f s", rid, len(wanted), info["input"],
                     time.perf_counter() - t0)
            # the stages' wall times (W3C Server-Timing): decode = unzip + ingest, model = the forwards
            headers = {"X-Request-Id": rid, "Server-Timing": ", ".join(
                f"{k[:-2]};dur={1000 * v:.1f}" for k, v in info.items() if k.endswith("_s"))}
            if media == "application/zip":
                headers["Content-Disposition"] = f'attachment; filename="qsnet-{rid}.zip"'
            return Response(answer, media_type=media, headers=headers)
        except RequestError as exc:
            status = exc.status
            log.info("synthesize %s: refused %d %s", rid, exc.status, exc.code)
            headers = {"X-Request-Id": rid}
            if exc.status == 503:
                headers["Retry-After"] = "5"
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
        except asyncio.CancelledError:
            # Serve cancels a request whose client hung up, whose request_timeout_s ran out, or
            # whose replica is shutting down: which one is not known here, so not blamed on anyone
            status = 499
            log.warning("synthesize %s: cancelled by Serve after %.2f s (client gone, request timeout or "
                        "shutdown)", rid, time.perf_counter() - t0)
            raise
        except Exception as exc:  # noqa: BLE001 - never a traceback (it could quote headers) to the client
            # where, not what: an exception's message can quote header values
            import traceback

            frames = traceback.extract_tb(exc.__traceback__)[-4:]
            log.error("synthesize %s: failed (%s at %s)", rid, type(exc).__name__,
                      " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)))
            return JSONResponse(RequestError(500, "internal_error", f"request {rid} failed; see the server log "
                                             "for this id").body(), status_code=500, headers={"X-Request-Id": rid})
        finally:
            if turn:
                self.uploads.release()
            if status >= 500 and status != 503:
                log.warning("synthesize %s: status %d after %.2f s", rid, status, time.perf_counter() - t0)

    async def _synthesize(self, body: bytes, wanted: list[str], site: str | None, model: str | None,
                          fmt: str | None) -> tuple[bytes, str, dict]:
        timing = {}
        tmp = Path(tempfile.mkdtemp(prefix="qsnet-serve-"))
        threads: list = []

        async def in_thread(fn, *args):
            # shielded: a client that goes away cancels this request, not the thread, which
            # still writes the upload into tmp; the cleanup below waits for it
            fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            threads.append(fut)
            return await asyncio.shield(fut)

        try:
            t = time.perf_counter()
            exam = await in_thread(self._read, body, tmp, site)
            timing["decode_s"] = time.perf_counter() - t
            if fmt is None:
                fmt = "dicom" if exam.kind == "dicom" else "nifti"
            if fmt in ("dicom", "viewer") and exam.kind != "dicom":
                raise RequestError(422, "dicom_needs_dicom", f"format={fmt} writes into the uploaded study: send "
                                   "DICOM, or ask for format=nifti")
            # before any model runs: an exam that ingest reads but whose T1 map series cannot carry
            # a write-back (enhanced multi-frame, a mosaic) is refused now, not after the forwards
            heads = await in_thread(self._heads, exam) if fmt != "nifti" else None
            try:
                cards = {c: select(self.catalog, c, exam.site, model) for c in wanted}
            except LookupError as exc:
                raise RequestError(404, "no_model", str(exc)) from None
            t = time.perf_counter()
            by_contract, prepared = {}, {}  # contrasts whose models share an input contract share one input
            for c, card in cards.items():
                key = json.dumps(card["input"], sort_keys=True)
                if key not in by_contract:
                    by_contract[key] = await in_thread(model_input, exam, card["input"])
                prepared[c] = by_contract[key]
            timing["prepare_s"] = time.perf_counter() - t
            t = time.perf_counter()

            async def one(c):
                x = np.ascontiguousarray(np.moveaxis(prepared[c]["input"], 0, 1), np.float32)
                mid = cards[c]["id"]
                return c, await self.synth.options(multiplexed_model_id=mid).synthesize.remote(mid, x)

            preds = dict(await asyncio.gather(*[one(c) for c in wanted]))
            timing["model_s"] = time.perf_counter() - t
            answer, media = await in_thread(self._encode, exam, cards, prepared, preds, fmt, heads, timing)
            return answer, media, {"input": exam.kind, **timing}
        except MemoryError:
            raise RequestError(413, "too_large_to_process", "the exam does not fit in this replica's memory") from None
        finally:
            running = [f for f in threads if not f.done()]
            if running:  # cancelled mid-thread: the uploaded exam goes when the thread is done with it
                asyncio.gather(*running, return_exceptions=True).add_done_callback(
                    lambda _: shutil.rmtree(tmp, ignore_errors=True))
            else:
                shutil.rmtree(tmp, ignore_errors=True)

    def _read(self, body: bytes, tmp: Path, site: str | None):
        root = unpack(body, tmp / "upload", self.limits)
        return read_exam(root, self.sites, site, work=tmp / "store", limits=self.limits)

    def _heads(self, exam) -> tuple[dict, dict]:
        from serve.dicomout import source_headers

        try:
            return source_headers(exam.affine, exam.t1.shape[0], exam.sources["mrf_t1"], exam.sources["mrf_t2"],
                                  self.uid_root)
        except ValueError as exc:
            raise RequestError(422, "cannot_write_back", f"{exc}; ask for format=nifti") from None

    def _encode(self, exam, cards, prepared, preds, fmt, heads, timing) -> tuple[bytes, str]:
        from serve.dicomout import dicom_series, nifti_bytes, to_stored

        t0 = time.perf_counter()
        record = {"qsnet": "0.1.0", "input": exam.kind, "site": exam.site, "contrasts": {}, "notes": exam.notes[:50]}
        stored = {}
        for c, p in prepared.items():
            try:
                stored[c] = to_stored(preds[c], p["brain"], p["inversion"])
            except ValueError as exc:
                raise RequestError(500, "model_failed", f"model {cards[c]['id']} for {c}: {exc}") from None
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for c, card in cards.items():
                record["contrasts"][c] = {"model": card["id"], "weights_sha256": card["weights_sha256"]}
                if fmt == "nifti":
                    zf.writestr(f"{c}.nii.gz", nifti_bytes(stored[c], exam.affine, exam.nifti_forms))
                    continue
                try:
                    # one number per contrast whatever else the request asks for: a later request
                    # on the same study gives the same contrast the same number
                    files = dicom_series(stored[c], *heads, c, card, series_number=9900 + CONTRASTS.index(c),
                                         uid_root=self.uid_root)
                except ValueError as exc:
                    raise RequestError(422, "cannot_write_back", str(exc)) from None
                for name, data in files:
                    zf.writestr(f"{c}/{name}", data)
                record["contrasts"][c]["series_files"] = len(files)
            timing["encode_s"] = time.perf_counter() - t0
            record["timing_s"] = {k: round(v, 4) for k, v in timing.items()}
            zf.writestr("synthesis.json", json.dumps(record, indent=1) + "\n")
        if fmt != "viewer":
            return buf.getvalue(), "application/zip"
        return json.dumps(_viewer_doc(exam, stored, record, buf.getvalue())).encode(), "application/json"


def build_app(args: dict):
    """The application from builder arguments (``serve run serve.app:build_app models=models``,
    or a Serve config's ``args``): models (registry folder), cards (ids, optional), api_keys,
    limits, sites, uid_root (the organisation's root for new DICOM UIDs), max_batch_size,
    batch_wait_timeout_s, host (checked: no keys, no public bind)."""
    args = dict(args or {})
    models = str(args.get("models", "models"))
    cards = args.get("cards")
    if isinstance(cards, str):
        cards = [c for c in cards.split(",") if c]
    keys = api_keys(args.get("api_keys"))
    check_bind(str(args.get("host", os.environ.get("QSNET_SERVE_HOST", "127.0.0.1"))), keys)
    catalog, skipped = load_catalog(models, cards)
    if not catalog:
        raise ValueError(f"{models}: no servable model card" + (f" ({'; '.join(skipped[:3])})" if skipped else ""))
    limits = args.get("limits")
    Limits.from_dict(limits)  # a bad limit fails at deploy time, not on the first request
    check_uid_root(args.get("uid_root"))
    from ingest.deid import load_key

    load_key()  # a pseudonym key that is too short fails at deploy time, not on every DICOM upload
    # per-deployment options (replicas, autoscaling, actor resources) when not given by a Serve
    # config's `deployments` (which `serve run config.yaml` applies itself)
    opts = args.get("deployments") or {}
    unknown = set(opts) - {"Synthesizer", "Ingress"}
    if unknown:
        raise ValueError(f"deployments: unknown name(s) {sorted(unknown)}; the app has Synthesizer and Ingress")
    synth = Synthesizer.options(**opts.get("Synthesizer", {})).bind(
        models, cards, int(args.get("max_batch_size", 32)), float(args.get("batch_wait_timeout_s", 0.005)))
    return Ingress.options(**opts.get("Ingress", {})).bind(synth, models, cards, args.get("api_keys"), limits,
                                                           args.get("sites"), args.get("uid_root"))
