"""`nmt serve`: the LibreTranslate and OpenNMT-py APIs, their errors and limits, the batching
worker, and stopping on Ctrl-C."""

import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TRANSFORMER, prepare_toy_data, toy_pairs, train_tiny
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmt.alignment import AttentionMap
from nmt.config import DecodeConfig
from nmt.errors import ConfigError, DataError
from nmt.files import VocabInfo
from nmt.models.attention import AttentionChoice
from nmt.search import Hypothesis
from nmt.serve import load_served_models, read_api_keys
from nmt.serve.api import ServedModel, ServeSettings, create_app
from nmt.serve.batching import BatchingWorker, Work
from nmt.translate import Translations

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny xx->yy Transformer, and a copy of it that says it translates zz->yy."""
    root = tmp_path_factory.mktemp("serve")
    data = prepare_toy_data(root, train=200)
    model = train_tiny(data, root / "xx-yy", TINY_TRANSFORMER)
    copy = root / "zz-yy"
    shutil.copytree(model, copy)
    info = VocabInfo.read(copy)
    dataclasses.replace(info, src_lang="zz").write(copy)
    return model, copy


@pytest.fixture(scope="module")
def models(model_dirs):
    return load_served_models(model_dirs, device="cpu")


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models)) as client:
        yield client


def _lines(count: int, seed: int = 5) -> list[str]:
    return [src for src, _ in toy_pairs(count, seed=seed)]


def _error(response, status: int, *fragments) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_translate_answers_one_line_per_input_line_as_translate_does(client, models):
    lines = [*_lines(4), "", _lines(1, seed=9)[0]]
    expected = models[0].translator.translate(lines).texts
    response = client.post("/translate", json={"q": "\n".join(lines), "source": "xx", "target": "yy"})
    assert response.status_code == 200, response.text
    assert response.json() == {"translatedText": "\n".join(texts[0] for texts in expected)}
    assert response.json()["translatedText"].split("\n")[4] == ""


def test_form_bodies_and_lists_give_the_same_translations(client):
    lines = _lines(3)
    as_json = client.post("/translate", json={"q": lines, "source": "xx", "target": "yy"}).json()["translatedText"]
    assert isinstance(as_json, list) and len(as_json) == 3
    form = client.post("/translate", data={"q": lines, "source": "xx", "target": "yy"})
    assert form.status_code == 200, form.text
    assert form.json()["translatedText"] == as_json
    multipart = client.post("/translate", data={"q": lines[0], "source": "xx", "target": "yy"},
                            files={"unused": ("a.txt", b"x")})
    assert multipart.json()["translatedText"] == as_json[0]


def test_alternatives_are_the_n_best_of_beam_search(client, models):
    translator = models[0].translator
    line = _lines(1, seed=7)[0]
    decode = dataclasses.replace(translator.decode, nbest=3, beam=max(3, translator.decode.beam))
    expected = translator.translate([line], decode=decode).texts[0]
    response = client.post("/translate", json={"q": line, "source": "xx", "target": "yy", "alternatives": 2}).json()
    distinct = [text for k, text in enumerate(expected[1:]) if text != expected[0] and text not in expected[1 : k + 1]]
    assert [response["translatedText"], *response["alternatives"]] == [expected[0], *distinct]
    # An empty text has one translation, itself: no alternatives, as LibreTranslate drops those
    # equal to the translation or to each other.
    listed = client.post("/translate", json={"q": [line, ""], "source": "xx", "target": "yy", "alternatives": 2}).json()
    assert listed["alternatives"] == [distinct, []]


def test_models_are_picked_by_language_pair(client, models):
    assert client.get("/languages").json() == [
        {"code": "xx", "name": "xx", "targets": ["yy"]}, {"code": "zz", "name": "zz", "targets": ["yy"]}]
    line = _lines(1)[0]
    for source in ("xx", "zz"):
        assert client.post("/translate", json={"q": line, "source": source, "target": "yy"}).status_code == 200
    _error(client.post("/translate", json={"q": line, "source": "yy", "target": "xx"}), 400, "yy->xx", "xx->yy, zz->yy")
    assert client.post("/translate", json={"q": line, "source": "ZZ", "target": "Yy"}).json() == \
        client.post("/translate", json={"q": line, "source": "zz", "target": "yy"}).json()  # codes compare without case
    # "auto" only where one source language serves the target: here two do
    _error(client.post("/translate", json={"q": line, "source": "auto", "target": "yy"}), 400, "auto->yy")


def test_opennmt_api_gives_src_tgt_n_best_and_score(client, models):
    lines = _lines(3)
    expected = models[1].translator.translate(lines)
    response = client.post("/translator/translate", json=[{"src": line, "id": 1} for line in lines])
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 1 and [r["tgt"] for r in results[0]] == [t[0] for t in expected.texts]
    for result, line, hyps in zip(results[0], lines, expected.hypotheses):
        assert result["src"] == line and result["n_best"] == 1
        assert result["pred_score"] == pytest.approx(hyps[0].score, abs=1e-4)
    assert client.get("/translator/models").json()[1]["source"] == "zz"
    _error(client.post("/translator/translate", json=[{"src": "w1", "id": 7}]), 400, "id 7")
    _error(client.post("/translator/translate", json={"src": "w1"}), 422)


def test_opennmt_api_gives_n_best_results_for_every_segment_the_empty_one_too(model_dirs):
    """Clients read result k of segment i at i * n_best + k: an empty segment gives n_best too."""
    served = load_served_models(model_dirs[:1], {"beam": 2, "nbest": 2}, device="cpu")
    lines = [_lines(1, seed=3)[0], "", _lines(1, seed=4)[0]]
    expected = served[0].translator.translate(lines)
    with TestClient(create_app(served)) as client:
        response = client.post("/translator/translate", json=[{"src": line} for line in lines])
    results = response.json()[0]
    assert [(r["src"], r["tgt"], r["n_best"]) for r in results] == [
        (lines[0], expected.texts[0][0], 2), (lines[0], expected.texts[0][1], 2), ("", "", 2), ("", "", 2),
        (lines[2], expected.texts[2][0], 2), (lines[2], expected.texts[2][1], 2)]
    assert [r["pred_score"] for r in results[2:4]] == [0.0, 0.0]
    assert results[1]["pred_score"] == pytest.approx(expected.hypotheses[0][1].score, abs=1e-4)


def test_attention_has_a_row_per_output_piece_over_the_source_pieces(client, models):
    line = _lines(1, seed=11)[0]
    expected = models[0].translator.translate([line], attention=AttentionChoice()).attention_maps[0]
    response = client.post("/translate", json={"q": line + "\n", "source": "xx", "target": "yy", "attention": True}).json()
    assert len(response["attention"]) == 1  # the empty second line has no map
    amap = response["attention"][0]
    assert amap["source"] == expected.source and amap["output"] == expected.output
    assert len(amap["weights"]) == len(amap["output"]) and {len(row) for row in amap["weights"]} == {len(amap["source"])}
    assert all(sum(row) == pytest.approx(1.0, abs=1e-2) for row in amap["weights"])
    assert "decoder layer" in response["attentionDescription"]


def test_errors_are_one_line_json_with_4xx(client):
    ok = {"q": "w1 w2", "source": "xx", "target": "yy"}
    _error(client.post("/translate", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    _error(client.post("/translate", content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)
    _error(client.post("/translate", json=["a list"]), 400, "JSON object")
    _error(client.post("/translate", json={"source": "xx", "target": "yy"}), 422, "q")
    _error(client.post("/translate", json={**ok, "q": 5}), 422, "q")
    _error(client.post("/translate", json={**ok, "alternatives": -1}), 422, "alternatives")
    _error(client.post("/translate", json={**ok, "alternatives": 99}), 422, "alternatives")
    _error(client.post("/translate", json={**ok, "format": "html"}), 400, "html")
    json_type = {"content-type": "application/json"}
    for body in (b'{"q": "\\ud800", "source": "xx", "target": "yy"}', b'{"q": "w1", "source": "\\udc00", "target": "yy"}',
                 b'{"q": "w1", "source": "xx", "target": "yy", "api_key": "\xed\xa0\x80"}'):
        _error(client.post("/translate", content=body, headers=json_type), 400, "surrogate")
    for path in ("/translate", "/translator/translate"):
        _error(client.post(path, content=b"[" * 50_000, headers=json_type), 400, "nested")
    _error(client.post("/translate", content=b'{"q": "w1", "source": "xx", "target": "yy", "alternatives": NaN}',
                       headers={"content-type": "application/json"}), 422, "alternatives")
    form_type = {"content-type": "application/x-www-form-urlencoded"}
    for escaped in ("%ED%A0%80", "%FF%FE"):  # a lone surrogate, bytes that are no UTF-8
        _error(client.post("/translate", content=f"q={escaped}&source=xx&target=yy", headers=form_type), 400, "UTF-8")
    _error(client.post("/translate", json={**ok, "alternatives": True}), 422, "alternatives")
    # A multipart field in a charset that decodes to a lone surrogate (utf-7's +2AA- is U+D800).
    for field in ("q", "source", "api_key"):
        parts = {**ok, field: "+2AA-"}
        body = "".join(f'--XX\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in parts.items())
        _error(client.post("/translate", content=(body + "--XX--\r\n").encode(),
                           headers={"content-type": "multipart/form-data; boundary=XX; charset=utf-7"}), 400, "surrogate")
    # A language code is echoed on one short line.
    _error(client.post("/translate", json={**ok, "source": "xx\nInjected"}), 400, "'xx\\nInjected'")
    assert len(_error(client.post("/translate", json={**ok, "target": "y" * 100_000}), 400, "'yyy", "'...")) < 200
    _error(client.post("/translator/translate", json=[{"src": "w1", "id": True}]), 422, "id")
    _error(client.get("/no-such-page"), 404)
    assert client.get("/health").json()["max_alternatives"] == ServeSettings().max_alternatives
    _error(client.get("/translate"), 405)


def test_limits_answer_413(models):
    limits = ServeSettings(max_chars=50, max_line_chars=20, max_lines=3)
    with TestClient(create_app(models, limits)) as client:
        request = {"source": "xx", "target": "yy"}
        _error(client.post("/translate", json={**request, "q": "w1 " * 17}), 413, "characters")
        _error(client.post("/translate", json={**request, "q": "w1 w2\n" * 8}), 413, "lines")
        _error(client.post("/translate", json={**request, "q": "w1 " * 8}), 413, "a line has 24 characters")
        _error(client.post("/translate", json={**request, "q": "w" * (limits.max_body_bytes + 1)}), 413, "bytes")
        _error(client.post("/translator/translate", json=[{"src": "w1"}] * 4), 413, "4 segments")
        assert client.post("/translate", json={**request, "q": "w1 w2\nw3"}).status_code == 200
        assert client.post("/translate", json={**request, "q": "w1\nw2\nw3"}).status_code == 200  # at the limit
        assert client.post("/translator/translate", json=[{"src": "w1"}] * 3).status_code == 200
    # A character outside the BMP is 12 bytes as a JSON escape pair or percent-encoded: as many
    # as the limit allows still fit the body.
    limits = ServeSettings(max_chars=20_000, max_line_chars=20_000)
    with TestClient(create_app([ServedModel(SlowTranslator(), "fake")], limits)) as client:
        request = {"q": "\U0001F600" * 20_000, "source": "xx", "target": "yy"}
        assert client.post("/translate", content=json.dumps(request), headers={"content-type": "application/json"}).status_code == 200
        assert client.post("/translate", data=request).status_code == 200


def test_api_keys_are_required_when_given(models):
    with TestClient(create_app(models, ServeSettings(api_keys=frozenset({"k1", "k2"})))) as client:
        request = {"q": "w1", "source": "xx", "target": "yy"}
        _error(client.post("/translate", json=request), 403, "API key is required")
        _error(client.post("/translate", json={"q": 5}), 403, "API key is required")  # no schema hints without a key
        _error(client.post("/translate", json={**request, "api_key": "nope"}), 403, "invalid API key")
        assert client.post("/translate", json={**request, "api_key": "k2"}).status_code == 200
        assert client.post("/translate", data={**request, "api_key": "k1"}).status_code == 200
        assert client.post("/translate?api_key=k1", json=request).status_code == 200
        assert client.post("/translate", json=request, headers={"X-API-Key": "k1"}).status_code == 200
        segments = [{"src": "w1"}]
        _error(client.post("/translator/translate", json=segments), 403)
        assert client.post("/translator/translate", json=segments, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert client.get("/health").json()["api_key_required"] is True
        assert client.get("/languages").status_code == 200
    with pytest.raises(ConfigError, match="must not be empty"):
        ServeSettings(api_keys=frozenset({"k1", " "}))


def test_a_keys_file_skips_comments_blank_lines_and_a_byte_order_mark(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_bytes("\ufeffk1\r\n# a comment\n\n  k2  \n   # an indented comment\n".encode())
    assert read_api_keys(keys) == {"k1", "k2"}
    keys.write_text("# only comments\n\n  # and blanks\n")  # a server open to all is never what was asked
    with pytest.raises(DataError, match="holds no API key"):
        read_api_keys(keys)


class SlowTranslator:
    """A TextTranslator that takes `seconds` per call and counts the calls running at once."""

    def __init__(self, seconds: float = 0.0, decode=None):
        from nmt.config import DecodeConfig

        self.decode = decode or DecodeConfig(beam=1)
        self.languages = ("xx", "yy")
        self.seconds = seconds
        self.calls: list[list[str]] = []
        self.running = 0
        self.most_running = 0
        self.lock = threading.Lock()

    def translate(self, lines, prefixes=None, attention=None, first_line=1, progress=False, decode=None):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
            self.calls.append(list(lines))
        if any("boom" in line for line in lines):
            raise RuntimeError("boom")
        nbest = (decode or self.decode).nbest
        texts = [[line.upper() + "!" * k for k in range(nbest)] for line in lines]
        maps = None if attention is None else [AttentionMap(first_line + i, [], [], np.zeros((0, 0))) for i in range(len(lines))]
        return Translations([[Hypothesis([], 0.0)] for _ in lines], texts, [], maps)

    def describe_attention(self, choice):
        return "none"

    def too_long(self, lines):
        return []


def test_a_slow_translation_answers_503_and_the_server_keeps_answering():
    slow = SlowTranslator(seconds=0.5)
    with TestClient(create_app([ServedModel(slow, "slow")], ServeSettings(timeout_s=0.1))) as client:
        _error(client.post("/translate", json={"q": "a", "source": "xx", "target": "yy"}), 503, "0.1 s")
        slow.seconds = 0.0
        time.sleep(0.6)
        response = client.post("/translate", json={"q": "b", "source": "xx", "target": "yy"})
        assert response.json() == {"translatedText": "B"}


def test_the_worker_batches_waiting_jobs_in_order_one_call_at_a_time():
    slow = SlowTranslator(seconds=0.05)
    worker = BatchingWorker(wait_ms=20, max_lines=6)
    work, other = Work(slow, 1, False), Work(slow, 2, False)
    futures = [(worker.submit(other if i == 3 else work, [f"s{i}a", f"s{i}b"]), i) for i in range(8)]
    for future, i in futures:
        nbest = 2 if i == 3 else 1
        assert future.result(5).texts == [[f"S{i}A" + "!" * k for k in range(nbest)], [f"S{i}B" + "!" * k for k in range(nbest)]]
    worker.close()
    assert slow.most_running == 1
    assert len(slow.calls) < 8 and max(len(call) for call in slow.calls) <= 6
    # every call holds jobs in the order they came
    flat = [line for call in slow.calls for line in call if line != "s3a" and line != "s3b"]
    assert flat == [f"s{i}{half}" for i in range(8) if i != 3 for half in "ab"]


def test_the_oldest_waiting_request_is_served_first_whatever_its_kind():
    """Requests of other kinds (n-best, attention) wait for a batch of their own; the next batch
    is the oldest request's kind, so that no kind overtakes an older one."""
    slow = SlowTranslator(seconds=0.1)
    worker = BatchingWorker(wait_ms=50)
    busy = worker.submit(Work(slow, 3, False), ["busy"])  # a kind of its own; the others gather behind it
    time.sleep(0.02)
    one, two = Work(slow, 1, False), Work(slow, 2, False)
    jobs = [worker.submit(work, [line]) for work, line in ((two, "a"), (one, "b"), (two, "c"), (one, "d"))]
    for job in (busy, *jobs):
        job.result(5)
    worker.close()
    assert slow.calls == [["busy"], ["a", "c"], ["b", "d"]]


def test_the_worker_never_mixes_models_and_takes_a_job_longer_than_a_batch():
    first, second = SlowTranslator(seconds=0.1), SlowTranslator()
    worker = BatchingWorker(wait_ms=50, max_lines=2)
    busy = worker.submit(Work(first, 1, False), ["busy"])  # the others gather behind it
    time.sleep(0.08)  # past the 50 ms wait: translating
    jobs = [worker.submit(Work(translator, 1, False), [line])
            for translator, line in ((first, "a"), (second, "b"), (first, "c"), (second, "d"))]
    longer = worker.submit(Work(second, 1, False), ["e", "f", "g"])  # more lines than a batch holds: alone
    assert [job.result(5).texts for job in (busy, *jobs, longer)] == [
        [["BUSY"]], [["A"]], [["B"]], [["C"]], [["D"]], [["E"], ["F"], ["G"]]]
    worker.close()
    assert first.calls == [["busy"], ["a", "c"]] and second.calls == [["b", "d"], ["e", "f", "g"]]


def test_closing_the_worker_translates_what_waits_and_ends_its_thread():
    slow = SlowTranslator(seconds=0.2)
    worker = BatchingWorker(wait_ms=1)
    busy = worker.submit(Work(slow, 1, False), ["busy"])
    time.sleep(0.05)
    waiting = [worker.submit(Work(slow, 1, False), [line]) for line in ("a", "b")]
    started = time.monotonic()
    worker.close()
    assert time.monotonic() - started < 2 and not worker._thread.is_alive()
    assert [job.result(0).texts for job in (busy, *waiting)] == [[["BUSY"]], [["A"]], [["B"]]]


@pytest.mark.parametrize("failing", [True, False], ids=["retried-one-by-one", "one-batch"])
def test_requests_batched_together_keep_their_own_line_numbers_and_failures(failing):
    slow = SlowTranslator(seconds=0.1)
    worker = BatchingWorker(wait_ms=50)
    busy = worker.submit(Work(slow, 1, False), ["busy"])  # the others gather behind it
    time.sleep(0.02)
    work = Work(slow, 1, True)
    groups = [["a", "b"], *([["boom"]] if failing else []), ["c", "d", "e"]]
    jobs = [worker.submit(work, lines) for lines in groups]
    assert busy.result(5).texts == [["BUSY"]]
    assert [m.line for m in jobs[0].result(5).attention_maps] == [1, 2]
    assert [m.line for m in jobs[-1].result(5).attention_maps] == [1, 2, 3]  # counted from its own first line
    if failing:
        with pytest.raises(RuntimeError, match="boom"):
            jobs[1].result(5)
    worker.close()
    assert [line for lines in groups for line in lines] in slow.calls  # tried together first


def test_a_stalled_upload_gets_408_and_holds_neither_the_server_nor_its_stop():
    import socket

    from nmt.serve import BackgroundServer

    translator = SlowTranslator(seconds=0.0)
    server = BackgroundServer([ServedModel(translator, "m")], ServeSettings(timeout_s=0.5))
    with server, socket.create_connection(("127.0.0.1", server.port)) as stalled:
        stalled.sendall(b"POST /translate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: 1000\r\n\r\n{\"q\": \"a")  # and no more
        stalled.settimeout(10)
        answer = b""
        while b"}" not in answer:  # the headers and the JSON body may come in separate packets
            received = stalled.recv(4096)
            assert received, answer
            answer += received
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "did not all arrive within 0.5 s" in answer, answer
        body = json.dumps({"q": "b", "source": "xx", "target": "yy"}).encode()
        request = urllib.request.Request(server.url + "/translate", body, {"content-type": "application/json"})
        assert json.loads(urllib.request.urlopen(request, timeout=10).read()) == {"translatedText": "B"}
        with socket.create_connection(("127.0.0.1", server.port)) as idle:  # a second one, open as the server stops
            idle.sendall(b"POST /translate HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
            time.sleep(0.1)
            stopping = time.monotonic()
            server.__exit__(None, None, None)
            assert not server.thread.is_alive() and time.monotonic() - stopping < 5


def test_a_request_whose_client_left_is_not_translated():
    import socket

    from nmt.serve import BackgroundServer

    slow = SlowTranslator(seconds=0.6)
    with BackgroundServer([ServedModel(slow, "slow")], ServeSettings()) as server:
        def post(text: str):
            body = json.dumps({"q": text, "source": "xx", "target": "yy"}).encode()
            request = urllib.request.Request(server.url + "/translate", body, {"content-type": "application/json"})
            return urllib.request.urlopen(request, timeout=10).read()

        first = threading.Thread(target=post, args=("first",))
        first.start()
        time.sleep(0.2)  # the worker is busy with "first"
        body = json.dumps({"q": "gone", "source": "xx", "target": "yy"}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as gone:
            gone.sendall(b"POST /translate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.1)
        first.join(10)
        assert json.loads(post("after")) == {"translatedText": "AFTER"}
    translated = [line for call in slow.calls for line in call]
    assert "first" in translated and "gone" not in translated


def test_a_client_that_leaves_before_its_body_ends_gets_499_and_nothing_logged(models, caplog):
    import asyncio

    parts = [{"type": "http.request", "body": b'{"q":', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/translate", "raw_path": b"/translate", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    asyncio.run(create_app(models)(scope, receive, send))
    assert sent[0]["status"] == 499
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text


def test_a_cancelled_job_is_skipped():
    slow = SlowTranslator(seconds=0.2)
    worker = BatchingWorker(wait_ms=0)
    first = worker.submit(Work(slow, 1, False), ["first"])
    time.sleep(0.05)  # the worker is busy with the first job
    cancelled = worker.submit(Work(slow, 1, False), ["cancelled"])
    assert cancelled.cancel()
    assert first.result(5).texts == [["FIRST"]]
    worker.close()
    assert ["cancelled"] not in slow.calls


def test_openapi_schema_and_a_page_with_nothing_from_the_network(client):
    schema = client.get("/openapi.json").json()
    assert {"/translate", "/languages", "/translator/translate", "/health"} <= set(schema["paths"])
    body = schema["paths"]["/translate"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-www-form-urlencoded"} <= set(body)
    page = client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text) and "https://" not in page.text


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
FIELDS = st.fixed_dictionaries({}, optional={
    "q": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=4) | JSON_VALUES,
    "source": st.sampled_from(["xx", "zz", "yy", "auto", ""]) | JSON_VALUES,
    "target": st.sampled_from(["yy", "xx"]) | JSON_VALUES,
    "format": st.sampled_from(["text", "html"]) | JSON_VALUES,
    "alternatives": st.integers(-2, 12) | JSON_VALUES,
    "attention": st.booleans() | JSON_VALUES,
    "api_key": JSON_VALUES,
})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=FIELDS | JSON_VALUES, raw=st.binary(max_size=40), form=st.booleans())
def test_no_request_makes_the_server_fail(client, body, raw, form):
    responses = [client.post("/translator/translate", json=body), client.post("/translate", content=raw)]
    if form and isinstance(body, dict):
        fields = {k: v if isinstance(v, (str, list)) else json.dumps(v) for k, v in body.items()}
        fields = {k: [str(x) for x in v] if isinstance(v, list) else v for k, v in fields.items()}
        responses.append(client.post("/translate", data=fields))
    else:
        responses.append(client.post("/translate", json=body))
    for response in responses:
        assert response.status_code < 500, response.text
        assert response.status_code == 200 or "error" in response.json()
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.slow
def test_serve_prints_its_address_and_stops_on_ctrl_c(model_dirs):
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", str(model_dirs[0]), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True,
    )
    try:
        lines = [process.stdout.readline(), process.stdout.readline()]
        assert "xx->yy" in lines[0], lines
        url = re.search(r"http://[^/]+/", lines[1]).group(0)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "health", timeout=10) as answer:
            assert json.load(answer)["status"] == "ok"
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, process.stderr.read()
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()


def test_serve_refuses_two_models_of_one_pair_in_one_line(model_dirs):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["serve", str(model_dirs[0]), str(model_dirs[0]), "--device", "cpu"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "both translate xx->yy" in result.output


@pytest.mark.slow
def test_bench_serve_checks_every_answer(model_dirs, tmp_path):
    from nmt.serve.bench import bench_serve

    source = tmp_path / "src.txt"
    source.write_text("".join(line + "\n" for line in [*_lines(9), ""]), encoding="utf-8")
    report = bench_serve(model_dirs[0], source, clients=(1, 3), device="cpu", echo=lambda line: None)
    for mode in ("one_at_a_time", "batched"):
        assert [r["clients"] for r in report[mode]] == [1, 3]
        assert all(r["sentences"] == 10 and r["wrong"] == 0 and r["failed"] == 0 for r in report[mode])
    assert set(report["speedup"]) == {"1", "3"}


def test_bench_serve_reports_no_ratio_where_nothing_was_answered(tmp_path, monkeypatch):
    """Every request refused (a line over the server's limit, say): the rows say so, no crash."""
    import contextlib
    from types import SimpleNamespace

    import nmt.serve.bench as bench

    refused = bench.LoadResult(clients=1, sentences=1, seconds=1.0, sentences_per_second=0.0, p50_ms=1.0, p99_ms=1.0,
                               wrong=0, failed=1)
    fake = SimpleNamespace(translate=lambda lines: SimpleNamespace(texts=[["x"] for _ in lines]), languages=("xx", "yy"),
                           decode=SimpleNamespace(beam=1))
    monkeypatch.setattr(bench, "load_text_translator", lambda *args, **kwargs: fake)
    monkeypatch.setattr(bench, "_server", lambda *args: contextlib.nullcontext("http://127.0.0.1:9"))
    monkeypatch.setattr(bench, "run_clients", lambda *args: refused)
    (tmp_path / "src.txt").write_text("w1\n", encoding="utf-8")
    lines = []
    report = bench.bench_serve(tmp_path / "model", tmp_path / "src.txt", clients=(1,), echo=lines.append)
    assert report["speedup"] == {"1": None} and "n/a (no answers)" in lines[-1]


def test_bench_serve_warms_each_server_up_before_timing_it(tmp_path, monkeypatch):
    import contextlib
    from types import SimpleNamespace

    import nmt.serve.bench as bench

    fake = SimpleNamespace(translate=lambda lines: SimpleNamespace(texts=[["x"] for _ in lines]), languages=("xx", "yy"),
                           decode=SimpleNamespace(beam=1))
    calls = []

    def run_clients(url, sources, expected, pair, clients):
        calls.append((len(sources), clients))
        return bench.LoadResult(clients, len(sources), 1.0, float(len(calls)), 1.0, 1.0, 0, 0)

    monkeypatch.setattr(bench, "load_text_translator", lambda *args, **kwargs: fake)
    monkeypatch.setattr(bench, "_server", lambda *args: contextlib.nullcontext("http://127.0.0.1:9"))
    monkeypatch.setattr(bench, "run_clients", run_clients)
    (tmp_path / "src.txt").write_text("w1\n" * 40, encoding="utf-8")
    report = bench.bench_serve(tmp_path / "model", tmp_path / "src.txt", clients=(1, 8), echo=lambda line: None)
    warm_up = (bench.WARM_UP_LINES, 1)
    assert calls == [warm_up, (40, 1), (40, 8)] * 2  # each server: untimed lines first, then each client count
    assert [r["sentences_per_second"] for mode in ("one_at_a_time", "batched") for r in report[mode]] == [2.0, 3.0, 5.0, 6.0]


def test_bench_serve_counts_requests_that_get_no_answer_as_failed():
    import socket

    from nmt.serve.bench import run_clients

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_clients(f"http://127.0.0.1:{port}", ["a", "b", "c"], ["A", "B", "C"], {}, clients=2)
    assert (result.failed, result.wrong, result.sentences, result.sentences_per_second) == (3, 0, 3, 0.0)


@pytest.mark.slow
def test_a_ctranslate2_export_serves_the_same_greedy_translations(model_dirs, tmp_path):
    from nmt.export import export_model

    export_model(model_dirs[0], tmp_path / "ct2")
    served = load_served_models([tmp_path / "ct2"], {"beam": 1}, device="cpu", engine="ctranslate2")
    native = load_served_models([model_dirs[0]], {"beam": 1}, device="cpu")[0].translator
    lines = [*_lines(5, seed=13), ""]
    with TestClient(create_app(served)) as client:
        response = client.post("/translate", json={"q": "\n".join(lines), "source": "xx", "target": "yy", "attention": True})
        assert response.status_code == 200, response.text
        assert response.json()["translatedText"].split("\n") == [t[0] for t in native.translate(lines).texts]
        assert len(response.json()["attention"]) == 5
        assert client.get("/health").json()["models"][0]["engine"] == "ctranslate2"


def test_a_request_that_gave_up_leaves_no_unread_error(caplog):
    import asyncio
    import concurrent.futures
    import gc

    from nmt.serve.api import _unless_gone

    class Connected:
        async def is_disconnected(self) -> bool:
            return False

    async def give_up_then_fail():
        job = concurrent.futures.Future()
        job.set_running_or_notify_cancel()  # the worker has begun it: it cannot be cancelled
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_unless_gone(asyncio.wrap_future(job), Connected()), 0.1)
        job.set_exception(RuntimeError("late"))
        await asyncio.sleep(0.05)  # the loop hears of it
        gc.collect()

    asyncio.run(give_up_then_fail())
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_limits_hold_exactly_at_their_bounds():
    slow = SlowTranslator()
    limits = ServeSettings(max_chars=20, max_alternatives=2)
    with TestClient(create_app([ServedModel(slow, "fake")], limits)) as client:
        request = {"q": "a", "source": "xx", "target": "yy"}
        assert client.post("/translate", json={**request, "alternatives": 2}).json() == {
            "translatedText": "A", "alternatives": ["A!", "A!!"]}
        _error(client.post("/translate", json={**request, "alternatives": 3}), 422, "at most 2")
        # A body of exactly max_body_bytes (spaces after the JSON object) is read; one byte more is not.
        body = json.dumps(request).encode()
        at_limit = body + b" " * (limits.max_body_bytes - len(body))
        json_type = {"content-type": "application/json"}
        assert client.post("/translate", content=at_limit, headers=json_type).json() == {"translatedText": "A"}
        _error(client.post("/translate", content=at_limit + b" ", headers=json_type), 413, "bytes")


def test_one_q_in_a_urlencoded_form_is_a_string_as_in_json(client):
    line = _lines(1)[0]
    as_json = client.post("/translate", json={"q": line, "source": "xx", "target": "yy"}).json()
    form = client.post("/translate", data={"q": line, "source": "xx", "target": "yy"})
    assert form.json() == as_json and isinstance(as_json["translatedText"], str)


def test_an_opennmt_id_one_past_the_last_model_is_a_400(client, models):
    _error(client.post("/translator/translate", json=[{"src": "w1", "id": len(models)}]), 400, "no model with id")
    assert client.post("/translator/translate", json=[{"src": "w1", "id": len(models) - 1}]).status_code == 200


def test_alternatives_widen_a_narrower_beam():
    from nmt.config import DecodeConfig

    greedy = SlowTranslator(decode=DecodeConfig(beam=1))
    assert Work(greedy, 3, False).decode().beam == 3  # n-best needs as many beams
    assert Work(SlowTranslator(decode=DecodeConfig(beam=5)), 3, False).decode().beam == 5


def test_a_batch_fills_to_exactly_max_lines_and_pending_counts_the_gathered_jobs():
    slow = SlowTranslator(seconds=1.0)
    worker = BatchingWorker(wait_ms=50, max_lines=6)
    busy = worker.submit(Work(slow, 2, False), ["busy"])  # a kind of its own; the others gather behind it
    work = Work(slow, 1, False)
    jobs = [worker.submit(work, [f"s{i}a", f"s{i}b"]) for i in range(3)]
    time.sleep(0.4)  # gathered (50 ms), while the first call runs (1 s)
    assert worker.pending == 3
    for job in (busy, *jobs):
        job.result(10)
    worker.close()
    assert slow.calls == [["busy"], ["s0a", "s0b", "s1a", "s1b", "s2a", "s2b"]]


def test_a_slice_of_a_batch_keeps_its_own_numbered_lines():
    from nmt.serve.batching import _slice

    result = Translations([[Hypothesis([], 0.0)] for _ in range(4)], [["a"], ["b"], ["c"], ["d"]], [2, 4], None, [1, 3])
    assert _slice(result, 0, 2).truncated == [2] and _slice(result, 0, 2).unknown_in_prefix == [1]
    assert _slice(result, 2, 4).truncated == [2] and _slice(result, 2, 4).unknown_in_prefix == [1]
    assert _slice(result, 1, 3).truncated == [1] and _slice(result, 1, 3).unknown_in_prefix == [2]


def test_alternatives_leave_out_copies_of_the_best_and_of_each_other():
    from nmt.serve.api import _distinct

    assert _distinct(["a", "b", "a", "c", "b"], "b") == ["a", "c"]


def test_attention_maps_stop_at_the_weight_limit(models):
    """An answer holds the maps of its first lines up to --max-attention-weights in all; a long
    text still gets its translation."""
    lines = _lines(3, seed=13)
    maps = models[0].translator.translate(lines, attention=AttentionChoice()).attention_maps
    sizes = [m.weights.size for m in maps]
    request = {"q": "\n".join(lines), "source": "xx", "target": "yy", "attention": True}
    for limit, shown in ((sizes[0] + sizes[1], [1, 2]), (sizes[0] + sizes[1] - 1, [1]), (sizes[0] - 1, [])):
        with TestClient(create_app(models, ServeSettings(max_attention_weights=limit))) as client:
            answer = client.post("/translate", json=request).json()
        assert [m["line"] for m in answer["attention"]] == shown
        assert len(answer["translatedText"].split("\n")) == 3


def test_a_line_past_the_models_longest_input_is_refused_not_cut(model_dirs):
    """Translating its first pieces only would answer a part as if it were the whole; the
    request is refused before any of it is translated."""
    short = load_served_models(model_dirs[:1], {"max_input_tokens": 4}, device="cpu")
    translated = []
    translate = short[0].translator.translate
    short[0].translator.translate = lambda lines, **options: translated.append(lines) or translate(lines, **options)
    with TestClient(create_app(short)) as client:
        request = {"source": "xx", "target": "yy"}
        assert client.post("/translate", json={**request, "q": "w1 w2"}).status_code == 200
        _error(client.post("/translate", json={**request, "q": "w1 w2\n" + "w3 " * 10}), 413, "line 2", "4 pieces")
        _error(client.post("/translate", json={**request, "q": ["w1\nw2", "w1\n" + "w3 " * 10]}), 413, "text 2, line 2")
        _error(client.post("/translator/translate", json=[{"src": "w1"}, {"src": "w2 " * 10}]), 413, "segment 2")
        long = "w3 " * 10
        _error(client.post("/translate", json={**request, "q": ["w1\n" + long]}), 413, "text 1, line 2")
        _error(client.post("/translate", json={**request, "q": "w1\n" + long + "\n" + long}), 413, "line 2")  # the first
    assert translated == [["w1 w2"]]
    # several models: a segment is numbered among all of them, and checked against its own model's limit
    mixed = load_served_models(model_dirs[1:], {"max_input_tokens": 100}, device="cpu") + short
    with TestClient(create_app(mixed)) as client:
        segments = [{"src": "w1", "id": 1}, {"src": "w3 " * 10, "id": 0}, {"src": "w2 " * 10, "id": 1}]
        _error(client.post("/translator/translate", json=segments), 413, "segment 3")


def test_auto_source_answers_the_language_it_took(models):
    with TestClient(create_app(models[:1])) as client:
        one = client.post("/translate", json={"q": "w1", "source": "auto", "target": "yy"}).json()
        assert one["detectedLanguage"] == {"language": "xx", "confidence": 100.0}
        listed = client.post("/translate", json={"q": ["w1", "w2"], "source": "auto", "target": "yy"}).json()
        assert listed["detectedLanguage"] == [{"language": "xx", "confidence": 100.0}] * 2
        assert "detectedLanguage" not in client.post("/translate", json={"q": "w1", "source": "xx", "target": "yy"}).json()


def test_other_origins_are_let_in_only_when_named(models):
    preflight = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    with TestClient(create_app(models)) as client:
        assert "access-control-allow-origin" not in client.options("/translate", headers=preflight).headers
    with TestClient(create_app(models, ServeSettings(cors_origins=("https://example.org",)))) as client:
        assert client.options("/translate", headers=preflight).headers["access-control-allow-origin"] == "https://example.org"
        answer = client.post("/translate", json={"q": "w1", "source": "xx", "target": "yy"}, headers={"Origin": "https://example.org"})
        assert answer.headers["access-control-allow-origin"] == "https://example.org"
        other = client.options("/translate", headers={**preflight, "Origin": "https://elsewhere.org"})
        assert "access-control-allow-origin" not in other.headers
    for never_sent in ("https://example.org/", "example.org", "https://example.org/page"):
        with pytest.raises(ConfigError, match="scheme://host"):
            ServeSettings(cors_origins=(never_sent,))


class RefusingTranslator(SlowTranslator):
    """Refuses a line holding "refused" as a translator refuses options it cannot honour."""

    def translate(self, lines, *args, **kwargs):
        if any("refused" in line for line in lines):
            raise ConfigError("this engine cannot do that")
        return super().translate(lines, *args, **kwargs)


def test_requests_as_clients_write_them(models):
    def fake(source: str, target: str) -> ServedModel:
        translator = RefusingTranslator()
        translator.languages = (source, target)
        return ServedModel(translator, f"{source}-{target}")

    served = [fake("pt-BR", "yy"), fake("xx", "zz"), fake("xx", "aa")]
    with TestClient(create_app(served, ServeSettings(cors_origins=("*",)))) as client:
        def translated(response):
            assert response.status_code == 200, response.text
            return response.json()["translatedText"]

        assert translated(client.post("/translate", json={"q": "a", "source": " pt_br ", "target": "YY"})) == "A"
        assert client.get("/languages").json()[1] == {"code": "xx", "name": "xx", "targets": ["aa", "zz"]}
        form = {"content-type": "Application/X-WWW-Form-Urlencoded; charset=UTF-8"}
        assert translated(client.post("/translate", content="q=a&source=xx&target=zz", headers=form)) == "A"
        # A repeated field: q a list of texts, any other its first value.
        assert translated(client.post("/translate", content="q=a&q=b&source=xx&source=yy&target=zz", headers=form)) == ["A", "B"]
        multipart = client.post("/translate", data={"q": ["a", "b"], "source": "xx", "target": "zz"}, files={"f": ("f.txt", b"x")})
        assert translated(multipart) == ["A", "B"]
        _error(client.post("/translate", json={"q": ["a", "b"], "source": "xx", "target": "zz", "attention": True}),
               422, "q as one string")
        _error(client.post("/translate", json={"q": "refused", "source": "xx", "target": "zz"}), 400, "cannot do that")
        _error(client.post("/translator/translate", json=[{"src": "a", "id": -1}]), 400, "no model with id -1")
        preflight = {"Origin": "https://anywhere.example", "Access-Control-Request-Method": "POST"}
        assert client.options("/translate", headers=preflight).headers["access-control-allow-origin"] == "*"


def test_every_reference_of_the_openapi_schema_resolves(client):
    schema = client.get("/openapi.json").json()

    def references(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    found = list(references(schema))
    assert found
    for ref in found:
        target = schema
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]  # a KeyError names the reference that points nowhere
    body = schema["paths"]["/translator/translate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["items"]["properties"]["src"]["type"] == "string"


def test_opennmt_extras_health_head_and_model_names(client, models):
    assert client.get("/translator/health").json()["status"] == "ok"
    assert client.head("/").status_code == 200
    assert [m["name"] for m in client.get("/translator/models").json()] == ["xx-yy", "zz-yy"]  # no server path
    huge = b'{"q": "w1", "source": "xx", "target": "yy", "alternatives": ' + b"9" * 5000 + b"}"
    message = _error(client.post("/translate", content=huge, headers={"content-type": "application/json"}), 400, "5000 digits")
    assert "sys." not in message


class Echo:
    """A TextTranslator that writes each line in capitals after `mark`; an empty line has no
    attention map, as the real translators give none."""

    def __init__(self, languages=("xx", "yy"), mark=""):
        self.decode, self.languages, self.mark, self.calls = DecodeConfig(beam=1), languages, mark, []

    def translate(self, lines, prefixes=None, attention=None, first_line=1, progress=False, decode=None):
        self.calls.append(list(lines))
        nbest = (decode or self.decode).nbest
        texts = [[(self.mark + line.upper()) if line else "" for _ in range(nbest)] for line in lines]
        maps = None
        if attention is not None:
            maps = [AttentionMap(first_line + i, ["a", "</s>"], ["A", "</s>"], np.full((2, 2), 0.5)) if line else None
                    for i, line in enumerate(lines)]
        return Translations([[Hypothesis([7], -1.0)] if line else [] for line in lines], texts, [], maps)

    def describe_attention(self, choice):
        return "fake"

    def too_long(self, lines):
        return []


def test_opennmt_results_keep_the_order_of_the_segments_across_models():
    models = [ServedModel(Echo(("xx", "yy")), "first"), ServedModel(Echo(("zz", "yy"), mark="2:"), "second")]
    with TestClient(create_app(models)) as client:
        segments = [{"src": "a", "id": 0}, {"src": "b", "id": 1}, {"src": "c"}, {"src": "d", "id": 1}]
        answer = client.post("/translator/translate", json=segments)
        assert answer.status_code == 200, answer.text
        assert [(r["src"], r["tgt"]) for r in answer.json()[0]] == [("a", "A"), ("b", "2:B"), ("c", "C"), ("d", "2:D")]


def test_an_opennmt_segment_with_a_line_break_is_one_sentence():
    echo = Echo()
    with TestClient(create_app([ServedModel(echo, "m")], ServeSettings(max_lines=1))) as client:
        answer = client.post("/translator/translate", json=[{"src": "w1\nw2"}])
        assert answer.status_code == 200, answer.text
        assert answer.json()[0][0]["tgt"] == "W1 W2" and echo.calls == [["w1 w2"]]


def test_attention_maps_go_on_past_an_empty_line():
    with TestClient(create_app([ServedModel(Echo(), "m")])) as client:
        answer = client.post("/translate", json={"q": "a\n\nb", "source": "xx", "target": "yy", "attention": True}).json()
    assert answer["translatedText"] == "A\n\nB"
    assert [m["line"] for m in answer["attention"]] == [1, 3]


def test_an_empty_q_in_a_form_is_an_empty_text_as_in_json():
    """`q=` in a form is an empty text, as `"q": ""` is in JSON."""
    with TestClient(create_app([ServedModel(Echo(), "m")])) as client:
        as_json = client.post("/translate", json={"q": "", "source": "xx", "target": "yy"})
        form = client.post("/translate", data={"q": "", "source": "xx", "target": "yy"})
    assert as_json.status_code == form.status_code == 200, form.text
    assert form.json() == as_json.json() == {"translatedText": ""}


def test_the_bearer_scheme_is_read_in_any_case():
    """The scheme of an Authorization header has no case (RFC 7235)."""
    with TestClient(create_app([ServedModel(Echo(), "m")], ServeSettings(api_keys=frozenset({"k1"})))) as client:
        for scheme in ("Bearer", "bearer", "BEARER"):
            answer = client.post("/translator/translate", json=[{"src": "a"}], headers={"Authorization": f"{scheme} k1"})
            assert answer.status_code == 200, (scheme, answer.text)


def test_closing_translates_the_waiting_jobs_of_every_kind_and_ends_the_thread():
    slow = SlowTranslator(seconds=0.2)
    worker = BatchingWorker(wait_ms=1)
    busy = worker.submit(Work(slow, 1, False), ["busy"])
    time.sleep(0.05)
    waiting = [worker.submit(Work(slow, nbest, False), [line]) for nbest, line in ((1, "a"), (2, "b"))]
    worker.close()
    assert not worker._thread.is_alive()
    assert [job.result(0).texts for job in (busy, *waiting)] == [[["BUSY"]], [["A"]], [["B", "B!"]]]


def test_closing_an_idle_worker_ends_its_thread_at_once():
    worker = BatchingWorker()
    started = time.monotonic()
    worker.close()
    assert not worker._thread.is_alive() and time.monotonic() - started < 2


def test_a_job_that_comes_within_the_wait_joins_the_first_jobs_batch():
    slow = SlowTranslator()
    worker = BatchingWorker(wait_ms=2000)  # far beyond the 50 ms sleep, even on a busy machine
    first = worker.submit(Work(slow, 1, False), ["a"])
    time.sleep(0.05)
    second = worker.submit(Work(slow, 1, False), ["b"])
    assert [first.result(5).texts, second.result(5).texts] == [[["A"]], [["B"]]]
    worker.close()
    assert slow.calls == [["a", "b"]]


def test_jobs_that_waited_behind_a_batch_start_without_a_second_wait():
    class Timed(SlowTranslator):
        def translate(self, lines, *args, **kwargs):
            self.starts.append(time.monotonic())
            return super().translate(lines, *args, **kwargs)

    slow = Timed(seconds=0.3)
    slow.starts = []
    worker = BatchingWorker(wait_ms=3000)
    jobs = [worker.submit(Work(slow, nbest, False), ["x"]) for nbest in (1, 2)]  # two kinds: two batches
    for job in jobs:
        job.result(20)
    worker.close()
    assert slow.starts[1] - slow.starts[0] < 0.3 + 2.0  # the second began when the first ended, not 3 s later


def test_an_error_of_any_kind_goes_to_its_request_and_the_worker_goes_on():
    class Refusing(SlowTranslator):
        def translate(self, lines, *args, **kwargs):
            if "bad" in lines:
                raise ConfigError("refused")  # an NmtError, not a RuntimeError
            return super().translate(lines, *args, **kwargs)

    worker = BatchingWorker(wait_ms=1)
    translator = Refusing()
    with pytest.raises(ConfigError, match="refused"):
        worker.submit(Work(translator, 1, False), ["bad"]).result(5)
    assert worker.submit(Work(translator, 1, False), ["ok"]).result(5).texts == [["OK"]]
    worker.close()
