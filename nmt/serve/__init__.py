"""`nmt serve`: trained models behind an HTTP API that LibreTranslate and OpenNMT-py clients
speak, with a web page to try them (`nmt.serve.api`)."""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from nmt.errors import ConfigError, DataError
from nmt.files import VocabInfo
from nmt.multilingual import direction_languages
from nmt.serve.api import ServedModel, ServeSettings, create_app
from nmt.translate import LanguageChoice, load_text_translator


def load_served_models(model_dirs: Sequence[Path], decode_options: dict | None = None, checkpoint: str | None = None,
                       device: str = "auto", quantize: bool = False, engine: str = "nmt") -> list[ServedModel]:
    """Each directory loaded once, as `nmt translate` loads it; a multilingual model serves each
    direction it was trained on."""
    served = []
    for d in map(Path, model_dirs):
        info = VocabInfo.read(d) if (d / VocabInfo.NAME).is_file() else None  # exports hold one when multilingual
        if info is None or not info.multilingual:
            served.append(ServedModel(load_text_translator([d], decode_options, checkpoint, device, quantize, engine), str(d), engine))
            continue
        choices = [LanguageChoice(tgt, src) for src, tgt in map(direction_languages, info.directions)]
        first = load_text_translator([d], decode_options, checkpoint, device, quantize, engine, choices[0])
        served.extend(ServedModel(first.for_languages(info, d, choice), str(d), engine) for choice in choices)
    return served


def read_api_keys(path: Path) -> frozenset[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is no key
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the API keys in {path} ({e})") from None
    keys = frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise DataError(f"{path} holds no API key")
    return keys


def serve(model_dirs: Sequence[Path], settings: ServeSettings, decode_options: dict | None = None,
          checkpoint: str | None = None, device: str = "auto", quantize: bool = False, engine: str = "nmt",
          echo: Callable[[str], None] = print) -> None:
    """Load the models and serve them until Ctrl-C (uvicorn stops cleanly on SIGINT and SIGTERM)."""
    import uvicorn

    models = load_served_models(model_dirs, decode_options, checkpoint, device, quantize, engine)
    app = create_app(models, settings)
    sock = _listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    for model in models:
        echo(f"model {model.source}->{model.target}: {model.name} ({model.engine})")
    echo(f"serving at http://{shown}:{port}/ (LibreTranslate API: POST /translate; OpenNMT-py API: "
         f"POST /translator/translate); Ctrl-C stops")
    server = uvicorn.Server(uvicorn_config(app, settings))
    # The form parser warns of each malformed multipart body: a client's error, answered with a 400.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops gracefully, then raises the Ctrl-C again for the caller
        pass
    echo("stopped")


class BackgroundServer:
    """The app served by uvicorn on a thread, on a free loopback port (benchmarks, tests)."""

    def __init__(self, models: Sequence[ServedModel], settings: ServeSettings):
        import uvicorn

        self.sock = _listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(create_app(models, settings), settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            self.thread.join(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def uvicorn_config(app, settings: ServeSettings):
    """uvicorn's settings: quiet, and a stop that waits for the requests in flight no longer than a
    request may take (then closes the connections left, a client that never finishes included)."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=max(1, math.ceil(settings.timeout_s)))


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:  # getaddrinfo would take it modulo 65,536
        raise ConfigError(f"--port must be between 0 and 65535 (got {port})")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot listen on {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
