"""`prx-data download` against a loopback HTTP server: every URL one ledger row with the right reason."""
from __future__ import annotations

import hashlib
import json
import socket
import tarfile
import threading
import time

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_server import Route, encode, hostile_cases, loopback_server, noise, trickle_server

from contract import ledger
from pipeline.cli import main as prx_data
from pipeline.download import engine, net
from contract.shards import read_shard

SLOW = 2.5   # seconds the slow route waits; the download timeout is 1 s
BASE = ["--executor", "local", "--no-progress", "--timeout", "1", "--threads", "8"]


def write_list(path, urls, captions=None, **extra):
    cols = {"url": urls, "caption": captions if captions is not None else [f"caption {i}" for i in range(len(urls))]}
    cols.update(extra)
    pq.write_table(pa.table(cols), path)
    return str(path)


def download(urls_file, out, *flags):
    rc = prx_data(["download", "--urls", str(urls_file), "--out", str(out), *BASE, *flags])
    assert rc == 0
    return ledger.read_folder(str(out))


def rows_by_url(table) -> dict[str, dict]:
    rows = table.to_pylist()
    by = {r["input_id"]: r for r in rows}
    assert len(by) == len(rows), "one row per URL"
    return by


def samples(out) -> dict[str, dict[str, bytes]]:
    found = {}
    for path in sorted(out.glob("*.tar")):
        for s in read_shard(str(path)):
            assert not hasattr(s, "reason"), s
            assert s.key not in found
            found[s.key] = s.members
    return found


@pytest.fixture
def resolve(monkeypatch):
    """resolve({"name": "127.0.0.1"}): fake DNS for names in the map; gaierror for `*.invalid`."""
    real = socket.getaddrinfo

    def install(names: dict[str, str]):
        def fake(host, port, *args, **kwargs):
            if host in names:
                return real(names[host], port, *args, **kwargs)
            if isinstance(host, str) and host.endswith(".invalid"):
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", fake)

    return install


# ------------------------------------------------------------------------------ every hostile answer
def test_every_url_gets_one_row_with_the_right_reason(tmp_path, photos, resolve):
    resolve({})
    cases = hostile_cases(photos, SLOW)
    with loopback_server() as srv:
        urls = [srv.add(c.path, c.route) for c in cases]
        urls += [srv.url("/x.jpg", host="no-such-host.invalid"), "ftp://example.com/a.jpg", "not a url", ""]
        expected = [c.reason for c in cases] + ["dns_error", "invalid_url", "invalid_url", "invalid_url"]
        listed = write_list(tmp_path / "urls.parquet", urls)
        table = download(listed, tmp_path / "raw", "--allow-private-network", "--max-image-bytes", "200000",
                         "--max-image-pixels", "4000000", "--min-image-size", "16", "--shard-size", "10")
        agents = dict(srv.user_agents)

    assert table.num_rows == len(urls)
    assert table.column("input_id").to_pylist() == urls  # ledger rows follow the list's order
    got = table.column("reason").to_pylist()
    assert got == expected, [(u, g, e) for u, g, e in zip(urls, got, expected) if g != e]
    for r in table.to_pylist():
        assert r["outcome"] == ledger.REASONS[r["reason"]][0]

    # kept samples: the served bytes as they are, keyed by content, named by their real format
    kept = samples(tmp_path / "raw")
    bodies = {srv_url: c for srv_url, c in zip(urls, cases)}
    for r in table.to_pylist():
        if r["outcome"] != ledger.KEPT:
            continue
        case = bodies[r["input_id"]]
        members = kept[r["key"]]
        body = case.route.body if case.route.location is None else \
            next(c.route.body for c in cases if c.path == case.route.location)
        assert members[case.ext] == body, case.name
        assert r["key"] == hashlib.sha256(body).hexdigest()[:32]
        meta = json.loads(members["json"])
        assert meta["url"] == meta["input_id"] == r["input_id"]
        assert meta["sha256"] == hashlib.sha256(body).hexdigest()
        assert meta["orig_key"].isdigit() and meta["source"] == "urls"
        assert members["txt"].decode() == f"caption {urls.index(r['input_id'])}"
    assert len(kept) == got.count("")
    # an honest user agent, on every request (redirects too)
    assert list(agents) == [net.DEFAULT_USER_AGENT]


def test_byte_cap_holds_while_streaming(tmp_path):
    with loopback_server() as srv:
        body = encode(noise(300, 300, 3), "PNG")
        urls = [srv.add("/stream.png", Route(body=body, send_length=False)),
                srv.add("/fits.png", Route(body=encode(noise(20, 20, 4), "PNG")))]
        table = download(write_list(tmp_path / "u.parquet", urls), tmp_path / "raw", "--allow-private-network",
                         "--max-image-bytes", str(len(body) // 2))
    assert table.column("reason").to_pylist() == ["too_large", ""]
    assert "while streaming" in table.column("detail").to_pylist()[0]


def test_user_agent_is_configurable(tmp_path):
    with loopback_server() as srv:
        urls = [srv.add("/a.png", Route(body=encode(noise(20, 20), "PNG")))]
        download(write_list(tmp_path / "u.parquet", urls), tmp_path / "raw", "--allow-private-network",
                 "--user-agent", "my-lab-crawler/1.0 (+mailto:data@example.org)")
        assert dict(srv.user_agents) == {"my-lab-crawler/1.0 (+mailto:data@example.org)": 1}


# ------------------------------------------------------------------------------ the private-address guard
def test_private_address_guard_refuses_loopback_in_every_spelling(tmp_path, photos, resolve):
    resolve({"photos.example.test": "127.0.0.1"})
    with loopback_server() as srv:
        srv.add("/a.jpg", Route(body=encode(noise(32, 32), "JPEG")))
        p = srv.port
        urls = [f"http://localhost:{p}/a.jpg", f"http://127.0.0.1:{p}/a.jpg", f"http://127.1:{p}/a.jpg",
                f"http://[::1]:{p}/a.jpg", f"http://0x7f000001:{p}/a.jpg", f"http://photos.example.test:{p}/a.jpg",
                f"http://2130706433:{p}/a.jpg"]
        table = download(write_list(tmp_path / "u.parquet", urls), tmp_path / "raw")
        hits = sum(srv.hits.values())
    assert table.column("reason").to_pylist() == ["private_address"] * len(urls)
    assert set(table.column("outcome").to_pylist()) == {ledger.REJECTED}
    details = table.column("detail").to_pylist()
    assert all("is loopback" in d for d in details), details
    assert "photos.example.test -> 127.0.0.1" in details[5]  # the resolved address, not the name, decided
    assert hits == 0  # refused before connecting


def test_private_address_guard_checks_every_redirect_hop(tmp_path, monkeypatch):
    """A 'public' server (its port exempted from the guard) redirects to loopback: the second hop is refused."""
    with loopback_server() as public, loopback_server() as private:
        target = private.add("/secret.jpg", Route(body=encode(noise(32, 32, 5), "JPEG")))
        hop = public.add("/hop.jpg", Route(location=target))
        direct = public.add("/fine.jpg", Route(body=encode(noise(32, 32, 6), "JPEG")))
        real = net.peer_blocked
        monkeypatch.setattr(net, "peer_blocked", lambda sa: None if sa[1] == public.port else real(sa))
        table = download(write_list(tmp_path / "u.parquet", [hop, direct]), tmp_path / "raw")
        assert public.hits["/hop.jpg"] == 1 and private.hits["/secret.jpg"] == 0
    assert table.column("reason").to_pylist() == ["private_address", ""]
    assert "-> 127.0.0.1 is loopback" in table.column("detail").to_pylist()[0]


def test_allow_private_network_lets_loopback_through(tmp_path):
    with loopback_server() as srv:
        srv.add("/a.jpg", Route(body=encode(noise(32, 32), "JPEG")))
        urls = [f"http://localhost:{srv.port}/a.jpg"]
        table = download(write_list(tmp_path / "u.parquet", urls), tmp_path / "raw", "--allow-private-network")
    assert table.column("outcome").to_pylist() == [ledger.KEPT]


@pytest.mark.parametrize("ip,blocked", [
    ("127.0.0.1", True), ("127.255.0.9", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True), ("::1", True),
    ("fe80::1%eth0", True), ("fd00::1", True), ("fec0::1", True), ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", True),
    ("93.184.216.34", False), ("8.8.8.8", False), ("2606:4700:4700::1111", False),
])
def test_address_policy(ip, blocked):
    assert (net.address_blocked(ip) is not None) is blocked


@pytest.mark.parametrize("message,reason", [
    ("HTTP Error 404: Not Found", "http_404"), ("HTTP Error 503: Service Unavailable", "http_5xx"),
    ("HTTP Error 418: I'm a teapot", "http_error"), ("HTTP Error 429: Too Many Requests", "http_429"),
    ("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.", "redirect_loop"),
    ("<urlopen error timed out>", "timeout"), ("The read operation timed out", "timeout"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("Remote end closed connection without response", "connection_error"),
    ("IncompleteRead(100 bytes read, 900 more expected)", "incomplete_body"),
    ("<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>", "tls_error"),
    ("Use of image disallowed by X-Robots-Tag directive", "opted_out"),
    ("<urlopen error [prx:private_address] a -> 10.0.0.1 is private>", "private_address"),
    ("[prx:decode_error:0123abcd] broken", "decode_error"), ("something else entirely", "download_error"),
])
def test_error_strings_map_to_reasons(message, reason):
    assert net.reason_for(message) == reason


# ------------------------------------------------------------------------------ report, retry, resume
def test_report_and_retry_failed_replace_only_failed_rows(tmp_path, capsys):
    with loopback_server() as srv:
        bodies = {i: encode(noise(24, 24, 10 + i), "PNG") for i in range(6)}
        for i, b in bodies.items():
            srv.add(f"/{i}.png", Route(body=b) if i % 2 == 0 else Route(503, b"busy"))
        srv.add("/gone.png", Route(404, b""))
        srv.add("/optout.png", Route(body=encode(noise(24, 24, 99), "PNG"), headers={"X-Robots-Tag": "noai"}))
        urls = [srv.url(f"/{i}.png") for i in range(6)] + [srv.url("/gone.png"), srv.url("/optout.png")]
        listed = write_list(tmp_path / "u.parquet", urls, [f"cap {i}" for i in range(len(urls))],
                            license=["cc-by"] * len(urls))
        out = tmp_path / "raw"
        flags = ["--allow-private-network", "--shard-size", "3", "--extra-cols", "license"]
        first = rows_by_url(download(listed, out, *flags))
        assert [first[u]["reason"] for u in urls] == ["", "http_5xx", "", "http_5xx", "", "http_5xx",
                                                      "http_404", "opted_out"]
        tar_before = (out / "000000.tar").read_bytes()

        assert prx_data(["download-report", str(out)]) == 0
        text = capsys.readouterr().out
        assert "failed:http_5xx" in text and "127.0.0.1" in text and "failed_urls.parquet" in text
        failed = pq.read_table(out / "_report" / "failed_urls.parquet").to_pylist()
        assert [f["url"] for f in failed] == [urls[i] for i in (1, 3, 5, 6)]
        assert failed[0]["caption"] == "cap 1" and failed[0]["license"] == "cc-by"
        assert failed[0]["reason"] == "http_5xx"

        for i in (1, 3, 5):
            srv.routes[f"/{i}.png"] = Route(body=bodies[i])
        srv.routes["/gone.png"] = Route(body=encode(noise(24, 24, 77), "PNG"))
        before = dict(srv.hits)
        second = rows_by_url(download(listed, out, *flags, "--retry-failed"))
        retried = {p: n - before.get(p, 0) for p, n in srv.hits.items() if n - before.get(p, 0)}
    assert retried == {"/1.png": 1, "/3.png": 1, "/5.png": 1, "/gone.png": 1}  # only the failed URLs again
    assert [second[u]["reason"] for u in urls] == [""] * 7 + ["opted_out"]
    assert all(second[u]["key"] == first[u]["key"] for u in urls if first[u]["outcome"] == ledger.KEPT)
    kept = samples(out)
    assert len(kept) == 7 and all(json.loads(m["json"])["source_meta"] == {"license": "cc-by"} for m in kept.values())
    assert kept[second[urls[1]]["key"]]["txt"] == b"cap 1"
    assert ledger.read_folder(str(out)).num_rows == len(urls)
    assert (out / "000000.tar").read_bytes() != tar_before
    stage = json.loads((out / "_stage.json").read_text())
    assert stage["status"] == "complete" and stage["counts"]["kept"] == 7


def test_resume_redoes_only_the_interrupted_shard_without_duplicates(tmp_path, monkeypatch):
    with loopback_server() as srv:
        urls = [srv.add(f"/{i}.png", Route(body=encode(noise(16, 16, i), "PNG"))) for i in range(10)]
        srv.add("/dup.png", Route(body=encode(noise(16, 16, 8), "PNG")))  # same shard as /8.png
        urls.append(srv.url("/dup.png"))
        listed = write_list(tmp_path / "u.parquet", urls)
        flags = ["--allow-private-network", "--shard-size", "4"]
        real = engine.fetch

        def dies_on_shard_1(pairs, shard_id, settings):
            got = real(pairs, shard_id, settings)
            if shard_id == 1:
                raise KeyboardInterrupt  # killed mid-shard, after its downloads
            return got

        monkeypatch.setattr(engine, "fetch", dies_on_shard_1)
        assert prx_data(["download", "--urls", listed, "--out", str(tmp_path / "raw"), *BASE, *flags]) == 130
        assert (tmp_path / "raw" / "000000.tar").exists() and not (tmp_path / "raw" / "000001.tar").exists()
        monkeypatch.setattr(engine, "fetch", real)
        hits_before = dict(srv.hits)
        table = download(listed, tmp_path / "raw", *flags)
        again = {p: n - hits_before.get(p, 0) for p, n in srv.hits.items() if n - hits_before.get(p, 0)}
        rerun = download(listed, tmp_path / "fresh", *flags)
    assert sorted(again) == sorted(f"/{i}.png" for i in range(4, 10)) + ["/dup.png"]  # shard 0 not fetched again
    assert table.column("input_id").to_pylist() == urls
    assert table.column("reason").to_pylist() == [""] * 10 + ["duplicate_exact"]
    assert len(samples(tmp_path / "raw")) == 10
    for name in ("000000.tar", "000001.tar", "000002.tar"):  # a rerun writes the same bytes
        assert (tmp_path / "raw" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert rerun.column("key").to_pylist() == table.column("key").to_pylist()


# ------------------------------------------------------------------------------ inputs, resizing, Dask
@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "txt"])
def test_url_list_formats(tmp_path, fmt):
    with loopback_server() as srv:
        urls = [srv.add(f"/{i}.png", Route(body=encode(noise(16, 16, 40 + i), "PNG"))) for i in range(3)]
        path = tmp_path / f"list.{fmt}"
        if fmt == "txt":
            path.write_text("\n".join(urls) + "\n")
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps({"link": u, "alt": f"alt {i}", "w": i}) + "\n"
                                    for i, u in enumerate(urls)))
        else:
            sep = "," if fmt == "csv" else "\t"
            path.write_text(sep.join(["link", "alt", "w"]) + "\n" +
                            "".join(sep.join([u, f"alt {i}", str(i)]) + "\n" for i, u in enumerate(urls)))
        cols = [] if fmt == "txt" else ["--url-col", "link", "--caption-col", "alt", "--extra-cols", "w"]
        table = download(path, tmp_path / "raw", "--allow-private-network", "--source", "web", *cols)
    assert table.column("outcome").to_pylist() == [ledger.KEPT] * 3
    kept = samples(tmp_path / "raw")
    metas = sorted((json.loads(m["json"]) for m in kept.values()), key=lambda m: m["url"])
    assert [m["url"] for m in metas] == sorted(urls) and {m["source"] for m in metas} == {"web"}
    if fmt != "txt":
        assert sorted(m["txt"].decode() for m in kept.values()) == ["alt 0", "alt 1", "alt 2"]
        assert [m["source_meta"]["w"] for m in metas] == [0, 1, 2]


def test_resize_mode_keeps_the_original_bytes_hash_as_key(tmp_path, photos):
    body = encode(photos["astronaut"], "PNG")
    with loopback_server() as srv:
        urls = [srv.add("/astro.png", Route(body=body))]
        table = download(write_list(tmp_path / "u.parquet", urls), tmp_path / "raw", "--allow-private-network",
                         "--resize-mode", "keep_ratio", "--image-size", "64")
    (key,) = table.column("key").to_pylist()
    assert key == hashlib.sha256(body).hexdigest()[:32]
    members = samples(tmp_path / "raw")[key]
    meta = json.loads(members["json"])
    assert "jpg" in members and min(meta["width"], meta["height"]) == 64
    assert meta["resized"] == {"mode": "keep_ratio", "image_size": 64}


def test_limit_and_no_reencoding_by_default(tmp_path, photos):
    body = encode(photos["coffee"], "JPEG", quality=97)
    with loopback_server() as srv:
        urls = [srv.add(f"/{i}.jpg", Route(body=body if i == 0 else encode(noise(8 + i, 8), "PNG")))
                for i in range(5)]
        table = download(write_list(tmp_path / "u.parquet", urls), tmp_path / "raw", "--allow-private-network",
                         "--limit", "2")
    assert table.num_rows == 2
    assert samples(tmp_path / "raw")[hashlib.sha256(body).hexdigest()[:32]]["jpg"] == body


@pytest.mark.slow  # a Dask cluster of worker processes
def test_dask_executor_distributes_shards(tmp_path):
    with loopback_server() as srv:
        urls = [srv.add(f"/{i}.png", Route(body=encode(noise(16, 16, 60 + i), "PNG"))) for i in range(6)]
        urls.append(srv.url("/missing.png"))
        listed = write_list(tmp_path / "u.parquet", urls)
        rc = prx_data(["download", "--urls", listed, "--out", str(tmp_path / "raw"), "--executor", "dask",
                       "--processes", "2", "--no-progress", "--shard-size", "3", "--allow-private-network"])
    assert rc == 0
    table = ledger.read_folder(str(tmp_path / "raw"))
    assert sorted(table.column("reason").to_pylist()) == [""] * 6 + ["http_404"]
    assert sorted(p.name for p in (tmp_path / "raw").glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    with tarfile.open(tmp_path / "raw" / "000000.tar") as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())


# ------------------------------------------------------------------ byte cap, user agent, URL lists, the server
class _FakeResponse:
    def __init__(self, body: bytes, length: int | None = None):
        self._body, self.headers, self.closed = body, {}, False
        if length is not None:
            self.headers["Content-Length"] = str(length)

    def read(self, amt=None):
        amt = len(self._body) if amt is None else amt
        out, self._body = self._body[:amt], self._body[amt:]
        return out

    def close(self):
        self.closed = True


def test_byte_cap_counts_partial_reads_too():
    r = net.CappedResponse(_FakeResponse(b"x" * 100), max_bytes=50)
    assert r.read(40) == b"x" * 40
    with pytest.raises(net.DownloadRefused, match="while streaming"):
        r.read(40)
    r = net.CappedResponse(_FakeResponse(b"x" * 30, length=60), max_bytes=None)
    assert r.read(10) == b"x" * 10
    with pytest.raises(net.DownloadRefused, match="after 30 of 60 bytes"):
        r.read()


def test_user_agent_token_from_any_user_agent(tmp_path):
    from contract.config import build_config
    from pipeline.stages.download import DownloadConfig, DownloadStage

    for agent, token in (("/odd", None), ("  ", None), ("MyBot/2.0 (+https://x.org)", "mybot")):
        cfg = build_config(DownloadConfig, {"urls": "u.txt", "out": str(tmp_path), "user_agent": agent})
        assert DownloadStage(cfg).settings().user_agent_token == token


def test_unreadable_url_list_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "urls.parquet"
    bad.write_bytes(b"this is not parquet at all")
    assert prx_data(["download", "--urls", str(bad), "--out", str(tmp_path / "raw"), *BASE]) == 2
    assert "cannot be read as parquet" in capsys.readouterr().err
    jsonl = tmp_path / "urls.jsonl"
    jsonl.write_text('{"url": "http://a/1.jpg"}\n{"url": \n')
    assert prx_data(["download", "--urls", str(jsonl), "--out", str(tmp_path / "raw2"), *BASE]) == 2
    assert "cannot be read as jsonl" in capsys.readouterr().err


def test_compressed_list_suffix_is_case_insensitive(tmp_path):
    import gzip

    from pipeline.download.urllist import read_rows

    path = tmp_path / "LIST.TXT.GZ"
    path.write_bytes(gzip.compress(b"http://a.example/1.jpg\nhttp://a.example/2.jpg\n"))
    assert [r.url for r in read_rows(str(path))] == ["http://a.example/1.jpg", "http://a.example/2.jpg"]


def test_image_server_that_never_started_stops_at_once():
    from pipeline.download.serve import ImageServer

    stopper = threading.Thread(target=ImageServer().stop, daemon=True)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive(), "stop() of a server that never started waits for a loop that never ran"


# ------------------------------------------------------------------------------ a slow-loris server
def test_a_server_that_trickles_bytes_is_cut_off_at_the_url_deadline(tmp_path, photos):
    """A server that sends its answer one byte every 0.2 s never trips the 0.5 s socket timeout (--timeout): the
    1 s --url-deadline cuts it off. Its URL gets a `timeout` row naming the deadline, the other URL is kept,
    and the run ends long before the trickle would have."""
    body = encode(np.ascontiguousarray(photos["astronaut"][::8, ::8]), "JPEG", quality=80)
    answer = b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    trickle_seconds = len(answer) * 0.2
    assert trickle_seconds > 300
    with trickle_server(answer, interval=0.2) as slow, loopback_server() as srv:
        urls = [slow.url("/loris.jpg"), srv.add("/fine.png", Route(body=encode(noise(24, 24, 3), "PNG")))]
        start = time.monotonic()
        table = download(write_list(tmp_path / "u.parquet", urls), tmp_path / "raw", "--allow-private-network",
                         "--timeout", "0.5", "--url-deadline", "1")
        took = time.monotonic() - start
        connections = list(slow.connections)
    (conn,) = connections   # asked once: a timeout is not retried within the run
    assert conn["cut"] and conn["bytes_sent"] < len(answer)
    assert 0.75 < conn["seconds"] < 1 + 1.5, conn   # cut at the 1 s deadline: not by the socket timeout, not late
    rows = rows_by_url(table)
    assert rows[urls[0]]["outcome"] == ledger.FAILED and rows[urls[0]]["reason"] == "timeout"
    assert "--url-deadline 1" in rows[urls[0]]["detail"], rows[urls[0]]
    assert rows[urls[1]]["outcome"] == ledger.KEPT
    assert took < 60, f"the run took {took:.0f} s; the trickle alone would take {trickle_seconds:.0f} s"
