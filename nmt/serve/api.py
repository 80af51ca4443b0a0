"""The HTTP API of `nmt serve`: LibreTranslate's `/translate` and `/languages`, OpenNMT-py's
`/translator/translate`, `/health`, and the web page at `/`.

Every error answers JSON `{"error": "one line"}` with a 4xx status (LibreTranslate's form):
400 for a body that is not JSON or a form, or a request no model can serve; 403 for a missing or
wrong API key; 413 past a limit; 422 for fields of the wrong kind; 503 when the translation
does not finish within the timeout (and 499, which no one reads, to a client that has left).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nmt.alignment import AttentionMap
from nmt.data import text_lines
from nmt.errors import ConfigError, NmtError
from nmt.models.attention import AttentionChoice
from nmt.serve.batching import BatchingWorker, Work
from nmt.translate import TextTranslator, Translations

log = logging.getLogger("nmt.serve")


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 5000
    api_keys: frozenset[str] = frozenset()  # empty: no key needed
    max_chars: int = 5000  # characters per request, all lines together
    max_line_chars: int = 1000
    max_lines: int = 100  # lines per request (OpenNMT-py API: segments)
    max_alternatives: int = 8
    timeout_s: float = 30.0  # a request not translated by then answers 503
    batch_wait_ms: float = 5.0  # how long the worker waits for more requests to batch with
    max_batch_lines: int = 256
    # Weights of the attention maps of one answer: the maps of the lines past it are left out,
    # as an answer of tens of megabytes would hold every other request up.
    max_attention_weights: int = 250_000
    cors_origins: tuple[str, ...] = ()  # web pages of other origins that may call the API ("*": any)

    def __post_init__(self):
        if any(not key.strip() for key in self.api_keys):
            raise ConfigError("an API key must not be empty")
        counts = (self.max_chars, self.max_line_chars, self.max_lines, self.max_batch_lines, self.max_attention_weights)
        # NaN passes no comparison and would be taken; a wait past TIMEOUT_MAX stops the worker.
        longest = f"{threading.TIMEOUT_MAX:.0f} s"
        if min(counts) < 1 or not 0 < self.timeout_s <= threading.TIMEOUT_MAX:
            raise ConfigError(f"the limits and --max-batch-lines must be positive, --timeout too and at most {longest}")
        for origin in self.cors_origins:  # browsers send scheme://host[:port]: a path or a final / never matches
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ConfigError(f"--cors-origin {origin!r}: give scheme://host[:port] (no path), or * for any")
        if self.max_alternatives < 0 or not 0 <= self.batch_wait_ms <= 1000 * threading.TIMEOUT_MAX:
            raise ConfigError(f"--max-alternatives must be 0 or more, --batch-wait-ms too and at most {longest}")

    @property
    def max_body_bytes(self) -> int:
        # A character outside the BMP takes 12 bytes as a JSON escape pair (\ud83d\ude00) or
        # percent-encoded in a form (%F0%9F%98%80).
        return 12 * self.max_chars + 65536


@dataclass
class ServedModel:
    translator: TextTranslator
    name: str  # its directory, as given
    engine: str = "nmt"

    @property
    def source(self) -> str:
        return self.translator.languages[0]

    @property
    def target(self) -> str:
        return self.translator.languages[1]


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---- request and response bodies ---------------------------------------------------------------

def _not_boolean(value):
    if isinstance(value, bool):  # pydantic would read true as 1
        raise ValueError("a whole number is needed, not true or false")
    return value


Number = Annotated[int, BeforeValidator(_not_boolean)]  # "2" from a form is still read as 2


class TranslateRequest(BaseModel):
    """LibreTranslate's request; `attention` is this server's own addition."""

    model_config = ConfigDict(extra="ignore")
    q: str | list[str] = Field(description="Text (one or more lines) or a list of texts.")
    source: str = Field(description="Source language code, or 'auto' when only one source language serves the target.")
    target: str
    format: Literal["text", "html"] = "text"
    alternatives: Number = Field(0, ge=0, description="How many other translations to give besides the best.")
    api_key: str | None = None
    attention: bool = Field(False, description="Also return the cross-attention of each line's translation (q a string).")


class AttentionLine(BaseModel):
    line: int  # 1-based line of q
    source: list[str]  # source pieces, </s> last
    output: list[str]  # output pieces, </s> last
    weights: list[list[float]]  # one row per output piece over the source pieces


class DetectedLanguage(BaseModel):
    language: str
    confidence: float  # 0 to 100, as LibreTranslate's


class TranslateResponse(BaseModel):
    translatedText: str | list[str]  # noqa: N815 - LibreTranslate's name
    alternatives: list[str] | list[list[str]] | None = None
    detectedLanguage: DetectedLanguage | list[DetectedLanguage] | None = None  # noqa: N815 - with source "auto"
    attention: list[AttentionLine] | None = None
    attentionDescription: str | None = None  # noqa: N815


class Language(BaseModel):
    code: str
    name: str
    targets: list[str]


class OpenNMTSegment(BaseModel):
    model_config = ConfigDict(extra="ignore")
    src: str
    id: Number | None = None  # the model's number in GET /translator/models (default: the first)


class OpenNMTResult(BaseModel):
    src: str
    tgt: str
    n_best: int
    pred_score: float


class ErrorResponse(BaseModel):
    error: str


_SEGMENTS = TypeAdapter(list[OpenNMTSegment])
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 403, 413, 422, 503)}


def _inlined(schema, defs: dict | None = None):
    """`schema` with each `{"$ref": "#/$defs/Name"}` replaced by the definition: pydantic's
    standalone schema refers to its own `$defs`, which the OpenAPI document does not have."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inlined(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inlined(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inlined(v, defs) for v in schema]
    return schema


def _json_body(schema: dict, form: bool) -> dict:
    schema = _inlined(schema)
    content = {"application/json": {"schema": schema}}
    if form:
        content["application/x-www-form-urlencoded"] = {"schema": schema}
        content["multipart/form-data"] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}}


# ---- the app ------------------------------------------------------------------------------------

def create_app(models: Sequence[ServedModel], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The ASGI app serving `models`, picked by language pair. Its worker thread starts now and
    stops when the app shuts down."""
    pairs = _pairs(models)
    worker = BatchingWorker(settings.batch_wait_ms, settings.max_batch_lines)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="nmt", summary="Neural machine translation", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    _add_error_handlers(app)
    if settings.cors_origins:  # off unless asked for: any page a user visits could use a local server
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    async def run(work: Work, lines: list[str], request: Request) -> Translations:
        future = worker.submit(work, lines)
        try:
            return await asyncio.wait_for(_unless_gone(asyncio.wrap_future(future), request), settings.timeout_s)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            future.cancel()
            raise RequestError(503, f"the translation took more than {settings.timeout_s:g} s; try again later") from None
        except NmtError as e:
            raise RequestError(400, str(e)) from None

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("nmt.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    @app.get("/translator/health", include_in_schema=False)  # OpenNMT-py's
    async def health() -> dict:
        return {
            "status": "ok",
            "models": [{"source": m.source, "target": m.target, "engine": m.engine} for m in models],
            "pending": worker.pending,
            "api_key_required": bool(settings.api_keys),
            "max_alternatives": settings.max_alternatives,
        }

    @app.get("/languages", response_model=list[Language])
    async def languages() -> list[Language]:
        sources = sorted({m.source for m in models})
        return [Language(code=s, name=s, targets=sorted(m.target for m in models if m.source == s)) for s in sources]

    @app.post("/translate", response_model=TranslateResponse, response_model_exclude_none=True, responses=_ERRORS,
              openapi_extra=_json_body(TranslateRequest.model_json_schema(), form=True))
    async def translate(request: Request) -> TranslateResponse:
        fields = await _read_fields(request, settings)
        _check_key(settings, fields.get("api_key"), request)
        body = _validate(TranslateRequest, fields)
        model = _pick_model(pairs, body.source, body.target)
        return await _translate_libre(body, model, settings, functools.partial(run, request=request))

    @app.get("/translator/models")
    async def opennmt_models() -> list[dict]:
        # The folder's name only: the path on the server is no client's business.
        return [{"model_id": i, "source": m.source, "target": m.target, "name": Path(m.name).resolve().name}
                for i, m in enumerate(models)]

    @app.post("/translator/translate", response_model=list[list[OpenNMTResult]], responses=_ERRORS,
              openapi_extra=_json_body(_SEGMENTS.json_schema(), form=False))
    async def opennmt_translate(request: Request) -> list[list[OpenNMTResult]]:
        data = _parse_json(await _read_body(request, settings))
        _check_key(settings, None, request)
        segments = _validate(_SEGMENTS, data)
        return [await _translate_opennmt(segments, models, settings, functools.partial(run, request=request))]

    return app


async def _unless_gone(waiting: asyncio.Future, request: Request, poll_s: float = 0.05):
    """The result of `waiting`; a 499 as soon as the client has closed its connection, with the
    translation cancelled unless it has started (a page that translates as one types leaves
    many requests behind)."""
    try:
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=poll_s)
            if not waiting.done() and await request.is_disconnected():
                raise RequestError(499, "the client closed the connection")
        return waiting.result()
    finally:  # gone, or timed out: the worker's job is dropped unless it has begun
        if not waiting.done():
            waiting.cancel()
        elif not waiting.cancelled():
            waiting.exception()  # read: asyncio logs an exception no one read as "never retrieved"


def _pairs(models: Sequence[ServedModel]) -> dict[tuple[str, str], ServedModel]:
    """The models by their language codes as requests are matched (see `_code`)."""
    pairs: dict[tuple[str, str], ServedModel] = {}
    for model in models:
        pair = (_code(model.source), _code(model.target))
        if pair in pairs:
            raise NmtError(f"{pairs[pair].name} and {model.name} both translate {model.source}->{model.target}: serve one of them")
        pairs[pair] = model
    return pairs


def _code(language: str) -> str:
    """Codes compare without case, `_` read as `-` (EN, pt_BR)."""
    return language.strip().lower().replace("_", "-")


def _shown(code: str) -> str:
    """A requested language code as an error message echoes it: on one short line."""
    return code if code.isprintable() and len(code) <= 20 else repr(code[:20]) + ("..." if len(code) > 20 else "")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(e).__name__})"}, status_code=500)


# ---- reading a request --------------------------------------------------------------------------

async def _read_body(request: Request, settings: ServeSettings) -> bytes:
    """The body, refused (413) past `max_body_bytes` before it is all read, and (408) when it has
    not all come within the request timeout: a stalled upload would hold its connection, and the
    server's shutdown, for as long as its client liked."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body has {int(declared)} bytes; the limit is {limit}")
    try:
        return await asyncio.wait_for(_body_up_to(request, limit), settings.timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not all arrive within {settings.timeout_s:g} s") from None


async def _body_up_to(request: Request, limit: int) -> bytes:
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"the request body has more than {limit} bytes")
    except ClientDisconnect:  # left before sending the whole body: nothing to answer or log
        raise RequestError(499, "the client closed the connection") from None
    return bytes(body)


def _json_int(digits: str) -> int:
    if len(digits) > 1000:  # Python refuses past 4,300 digits with advice for programmers
        raise ValueError(f"a number of {len(digits)} digits")
    return int(digits)


def _parse_json(body: bytes):
    try:
        data = json.loads(body, parse_int=_json_int)
    except ValueError as e:  # also invalid UTF-8
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "the body is not valid JSON (nested too deeply)") from None
    return _valid_unicode(data)


def _valid_unicode(data):
    """`data`, refused if it holds a lone surrogate, which no answer can hold either: a \\ud800
    escape or its bytes in JSON, or a multipart field in a charset that makes one (utf-7)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, "the body holds a lone surrogate (not valid Unicode)") from None
    return data


async def _read_fields(request: Request, settings: ServeSettings) -> dict:
    """The fields of a JSON object or a form body (LibreTranslate takes both); a repeated form
    field `q` is a list."""
    body = await _read_body(request, settings)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        try:
            # strict: a %-escaped byte that is no UTF-8 (or a lone surrogate) is refused as well
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise RequestError(400, "the form body is not valid UTF-8") from None
        return {k: v if k == "q" and len(v) > 1 else v[0] for k, v in fields.items()}
    if kind == "multipart/form-data":
        return await _multipart_fields(request, body)
    data = _parse_json(body)
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object (or a form)")
    return data


async def _multipart_fields(request: Request, body: bytes) -> dict:
    async def receive() -> dict:  # the body read already, given again to the form parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form()
    except Exception:  # noqa: BLE001 - any malformed multipart body
        raise RequestError(400, "the multipart form body could not be read") from None
    fields = {}
    for key in form:
        values = [v for v in form.getlist(key) if isinstance(v, str)]
        if values:
            fields[key] = values if key == "q" and len(values) > 1 else values[0]
    return _valid_unicode(fields)


def _validate(schema, data):
    try:
        if isinstance(schema, TypeAdapter):
            return schema.validate_python(data)
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise RequestError(422, f"{where}: {first['msg']}{more}") from None


def _check_key(settings: ServeSettings, body_key: str | None, request: Request) -> None:
    """The key from the body, the `api_key` query parameter, `X-API-Key` or a bearer token."""
    if not settings.api_keys:
        return
    bearer = request.headers.get("authorization", "")
    candidates = [body_key, request.query_params.get("api_key"), request.headers.get("x-api-key"),
                  bearer[7:] if bearer.lower().startswith("bearer ") else None]
    known = [hashlib.sha256(k.encode()).digest() for k in settings.api_keys]
    for key in candidates:
        # Digests of equal length, each compared in full: the time taken tells nothing of the keys.
        if isinstance(key, str) and any([hmac.compare_digest(hashlib.sha256(key.encode()).digest(), k) for k in known]):
            return
    given = any(isinstance(key, str) and key for key in candidates)
    raise RequestError(403, "invalid API key" if given else "an API key is required (api_key)")


def _pick_model(pairs: dict[tuple[str, str], ServedModel], source: str, target: str) -> ServedModel:
    wanted = (_code(source), _code(target))
    if wanted[0] == "auto":  # no language identification: only a target with a single source
        sources = [s for s, t in pairs if t == wanted[1]]
        if len(sources) == 1:
            wanted = (sources[0], wanted[1])
    if wanted not in pairs:
        served = ", ".join(sorted(f"{m.source}->{m.target}" for m in pairs.values()))
        raise RequestError(400, f"no model translates {_shown(source)}->{_shown(target)}; this server translates {served}")
    return pairs[wanted]


def _check_text(texts: list[str], settings: ServeSettings, unit: str = "lines") -> list[list[str]]:
    """Each text's lines, within the limits (413)."""
    lines = [text_lines(text) for text in texts]
    count = sum(len(text) for text in lines)
    chars = sum(len(text) for text in texts)
    if count > settings.max_lines:
        raise RequestError(413, f"the request has {count} {unit}; the limit is {settings.max_lines}")
    if chars > settings.max_chars:
        raise RequestError(413, f"the request has {chars} characters; the limit is {settings.max_chars}")
    longest = max((len(line) for text in lines for line in text), default=0)
    if longest > settings.max_line_chars:
        raise RequestError(413, f"a line has {longest} characters; the limit is {settings.max_line_chars}")
    return lines


# ---- translating --------------------------------------------------------------------------------

async def _translate_libre(body: TranslateRequest, model: ServedModel, settings: ServeSettings, run) -> TranslateResponse:
    if body.format != "text":
        raise RequestError(400, f"format {body.format!r} is not supported: send plain text (format 'text')")
    if body.alternatives > settings.max_alternatives:
        raise RequestError(422, f"alternatives: at most {settings.max_alternatives}")
    if body.attention and not isinstance(body.q, str):
        raise RequestError(422, "attention: only with q as one string")
    texts = [body.q] if isinstance(body.q, str) else body.q
    lines = _check_text(texts, settings)
    every_line = [x for text in lines for x in text]
    one = isinstance(body.q, str)
    too_long = model.translator.too_long(every_line)  # refused before any line is translated
    if too_long:
        text, line = _text_and_line(lines, too_long[0])
        _refuse_cut(model.translator, f"line {line}" if one else f"text {text}, line {line}")
    result = await run(Work(model.translator, 1 + body.alternatives, body.attention), every_line)
    best, others, start = [], [], 0
    for text in lines:
        wanted = 1 + body.alternatives  # a line can have fewer (an empty line has one): repeat its best
        nbest = [found + [found[0]] * (wanted - len(found)) for found in result.texts[start : start + len(text)]]
        best.append("\n".join(line[0] for line in nbest))
        others.append(_distinct(["\n".join(line[k] for line in nbest) for k in range(1, wanted)], best[-1]))
        start += len(text)
    response = TranslateResponse(translatedText=best[0] if one else best)
    if body.alternatives:
        response.alternatives = others[0] if one else others
    if _code(body.source) == "auto":  # the only source language served for the target: no identification
        detected = DetectedLanguage(language=model.source, confidence=100.0)
        response.detectedLanguage = detected if one else [detected] * len(texts)
    if body.attention:
        response.attention = _attention_lines(result.attention_maps or [], settings.max_attention_weights)
        response.attentionDescription = model.translator.describe_attention(AttentionChoice())
    return response


def _refuse_cut(translator: TextTranslator, where: str) -> None:
    """A line past the model's longest input is refused (413), not translated in part."""
    raise RequestError(413, f"{where} has more than {translator.decode.max_input_tokens} pieces, the most the model "
                            "takes: split it")


def _text_and_line(lines: list[list[str]], number: int) -> tuple[int, int]:
    """Which text of a request (from 1) and which of its lines the `number`th line of them all is."""
    for text, its_lines in enumerate(lines, 1):
        if number <= len(its_lines):
            return text, number
        number -= len(its_lines)
    raise ValueError(number)


def _distinct(alternatives: list[str], best: str) -> list[str]:
    """The alternatives that differ from the best translation and from each other, in order, as
    LibreTranslate gives them (a short n-best list gives fewer)."""
    return [text for k, text in enumerate(alternatives) if text != best and text not in alternatives[:k]]


def _attention_lines(maps: list[AttentionMap | None], max_weights: int) -> list[AttentionLine]:
    """The maps of the lines, in order, up to `max_weights` weights in all (the lines past it
    have none)."""
    lines, total = [], 0
    for amap in maps:
        if amap is None:  # an empty line
            continue
        total += amap.weights.size
        if total > max_weights:
            break
        weights = np.round(np.asarray(amap.weights, dtype=np.float64), 4).tolist()
        lines.append(AttentionLine(line=amap.line, source=amap.source, output=amap.output, weights=weights))
    return lines


async def _translate_opennmt(segments: list[OpenNMTSegment], models: Sequence[ServedModel], settings: ServeSettings,
                             run) -> list[OpenNMTResult]:
    """Each segment is one sentence (a line break in it is a space), translated by the model
    its `id` names; the results in the order of the segments, n_best of each."""
    sentences = [" ".join(text_lines(s.src)) for s in segments]
    _check_text(sentences, settings, unit="segments")
    by_model: dict[int, list[int]] = {}
    for i, segment in enumerate(segments):
        number = 0 if segment.id is None else segment.id
        if not 0 <= number < len(models):
            raise RequestError(400, f"no model with id {number}; ids 0 to {len(models) - 1} (GET /translator/models)")
        by_model.setdefault(number, []).append(i)
    for number, indices in by_model.items():  # before any segment is translated
        too_long = models[number].translator.too_long([sentences[i] for i in indices])
        if too_long:
            _refuse_cut(models[number].translator, f"segment {indices[too_long[0] - 1] + 1}")
    results: list[list[OpenNMTResult]] = [[] for _ in segments]
    for number, indices in by_model.items():
        translator = models[number].translator
        nbest = translator.decode.nbest
        result = await run(Work(translator, nbest, False), [sentences[i] for i in indices])
        for i, hyps, texts in zip(indices, result.hypotheses, result.texts):
            found = list(zip(texts, [h.score for h in hyps])) or [("", 0.0)]  # an empty segment has no hypothesis
            found += [found[0]] * (nbest - len(found))  # n_best results for every segment, as clients index them
            results[i] = [OpenNMTResult(src=segments[i].src, tgt=t, n_best=nbest, pred_score=s) for t, s in found]
    return [r for segment_results in results for r in segment_results]
