"""spell: a runtime for signed SpellBundles.

A SpellBundle is a versioned automation: a ``spell.yaml`` manifest, a JSON Schema
for its input and step files.  This module installs bundles (from a folder or a
pinned git ref), verifies their Ed25519 signatures against a local trust store,
enforces a local policy, gates billing behind signed entitlement tokens, casts
them on the host or in a hardened docker container, and serves the Execution
API with its receipts page.  The step engine lives in ``spell_runner``, which
uses the standard library only and is imported here for host mode.

It keeps the command line, messages, files and API of spell-runtime 1.2.5 and
fixes its weaknesses; ``docs/compatibility.md`` lists every difference.

Known limitations:
- Locale ("ICU root") ordering is emulated exactly for printable ASCII only;
  other characters sort after it by code point (docs/compatibility.md).
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import spell_runner

__version__ = "0.1.0"


# Constants and limits ########################################################

#: Where the store lives when neither SPELL_HOME nor HOME says otherwise.
DEFAULT_STORE_NAME = ".spell"
#: Folders of the store, created 0700 (they hold inputs, logs and licences).
STORE_DIRS = ("spells", "logs", "trust/publishers", "licenses")
STORE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

#: A manifest is a few KiB; 1 MiB leaves room while refusing junk at once.
MANIFEST_MAX_BYTES = 1024 * 1024
#: Schemas, signatures, trust files, licences and policies are small JSON files.
JSON_FILE_MAX_BYTES = 1024 * 1024
#: Execution logs hold capped step output; 64 MiB bounds `spell log`.
LOG_MAX_BYTES = 64 * 1024 * 1024
#: YAML limits: nesting depth, alias uses and nodes after alias expansion.
YAML_MAX_DEPTH = 64
YAML_MAX_ALIASES = 100
YAML_MAX_NODES = 10_000
#: JSON nesting accepted from any file or request.
JSON_MAX_DEPTH = 200
#: Git may be slow on a large repository, but never hang a CLI forever.
GIT_TIMEOUT_SECONDS = 300
#: Manifest field lengths, in UTF-16 code units as the original counts them.
ID_MAX_LENGTH = 200
VERSION_MAX_LENGTH = 50
#: Longest file name most filesystems allow.
NAME_MAX = 255

RISKS = ("low", "medium", "high", "critical")
BILLING_MODES = ("none", "upfront", "on_success", "subscription")
EXECUTIONS = ("host", "docker")
STEP_KINDS = ("shell", "http")
CHECK_TYPES = ("exit_code", "file_exists", "http_status", "jsonpath_equals")


# Errors ######################################################################


class SpellError(Exception):
    """An expected failure: one line for the CLI, a JSON error for the API.

    ``message`` is the user-facing text (a contract: see docs/compatibility.md);
    the class attributes say how the CLI and the API report it.
    """

    error_code = "SPELL_ERROR"
    http_status = 400
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(SpellError):
    """Bad command-line arguments; the usage of the command follows the line."""

    error_code = "BAD_REQUEST"

    def __init__(self, message: str, usage: str = ""):
        super().__init__(message)
        self.usage = usage


class NotFound(SpellError):
    error_code = "NOT_FOUND"
    http_status = 404


class ManifestError(SpellError):
    error_code = "INVALID_MANIFEST"


class InstallError(SpellError):
    error_code = "INSTALL_FAILED"


class SignatureError(SpellError):
    error_code = "SIGNATURE_INVALID"


class PolicyDenied(SpellError):
    error_code = "POLICY_DENIED"
    http_status = 403


class MissingDependency(SpellError):
    error_code = "MISSING_DEPENDENCY"
    http_status = 500


# Text and JSON helpers #######################################################

#: JavaScript's String.prototype.trim strips these, U+FEFF included.
_JS_SPACE = (
    " \t\n\v\f\r\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")
_BASE64URL_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def js_trim(text: str) -> str:
    """Trim like JavaScript (Unicode spaces and U+FEFF)."""
    return text.strip(_JS_SPACE)


def has_control_chars(text: str) -> bool:
    """True when ``text`` holds U+0000-U+001F or U+007F."""
    return _CONTROL_RE.search(text) is not None


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units, as JavaScript counts ``.length``."""
    return len(text.encode("utf-16-le")) // 2


def b64url_encode(data: bytes) -> str:
    """RFC 4648 section 5 base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url that already passed ``^[A-Za-z0-9_-]+$``, padding it."""
    if not _BASE64URL_RE.match(text):
        raise ValueError("not base64url")
    if len(text) % 4 == 1:
        # One stray character carries no whole byte; drop it as Node does.
        text = text[:-1]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def is_base64url(text: str) -> bool:
    return isinstance(text, str) and _BASE64URL_RE.match(text) is not None


def random_hex(nbytes: int) -> str:
    """``nbytes`` random bytes from the OS as hex (what ``secrets.token_hex``
    does, without importing ``secrets``, ``hmac`` and ``hashlib`` at start-up)."""
    return os.urandom(nbytes).hex()


def id_key(value: str) -> str:
    """Storage key of an id, publisher or licence name: base64url of UTF-8."""
    return b64url_encode(value.encode("utf-8"))


def sanitize(text: str) -> str:
    """Replace each UTF-16 unit outside ``[A-Za-z0-9._-]`` by ``_``."""
    out = []
    for ch in text:
        if ch.isascii() and (ch.isalnum() or ch in "._-"):
            out.append(ch)
        else:
            out.append("_" * (2 if ord(ch) > 0xFFFF else 1))
    return "".join(out)


def escape_text(text: str) -> str:
    """Make a string safe to print on one terminal line.

    Control characters (newlines and escape sequences included) become visible
    escapes, so nothing a bundle says can forge an output line or drive the
    terminal.
    """

    def repl(match: re.Match) -> str:
        ch = match.group(0)
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{ord(ch):02x}")

    return re.sub("[\x00-\x1f\x7f-\x9f\u2028\u2029]", repl, text)


def js_number(value) -> str:
    """A number as JavaScript prints it (``10``, ``1e+21``, ``Infinity``)."""
    return spell_runner.js_string(value)


def dump_json(value) -> str:
    """Pretty JSON as the original writes its files: 2 spaces, trailing newline."""
    return spell_runner.dumps_js(value, indent=2) + "\n"


#: Primary collation ranks of printable ASCII in ICU root order (letters
#: case-folded); verified against Node's localeCompare, see docs/compatibility.md.
_LOCALE_ORDER = (
    " _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789abcdefghijklmnopqrstuvwxyz"
)
_LOCALE_RANK = {ch: i for i, ch in enumerate(_LOCALE_ORDER)}


def locale_key(text: str) -> tuple:
    """Sort key emulating JavaScript ``localeCompare`` (ICU root collation).

    Exact for printable ASCII; other characters rank after it by code point.
    """
    primary = tuple(
        _LOCALE_RANK.get(ch.lower() if ch.isascii() else ch, 1000 + ord(ch))
        for ch in text
    )
    case = tuple(1 if ("A" <= ch <= "Z") else 0 for ch in text)
    return (primary, case)


_SEMVER_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def pick_latest(versions: list[str]) -> str:
    """The original's "latest": plain X.Y.Z numerically first, then the rest.

    Ties and non-semver names fall back to descending locale order.
    """

    def rank(name: str):
        m = _SEMVER_RE.match(name)
        nums = tuple(int(g) for g in m.groups()) if m else ()
        return (1 if m else 0, nums, locale_key(name))

    return max(versions, key=rank)


def parse_json_text(text: str):
    """Parse JSON like JavaScript does: no NaN or Infinity, bounded depth.

    Raises ``ValueError`` with the parser's detail.
    """

    def reject_constant(name: str):
        raise ValueError(f"Unexpected token {name} in JSON")

    try:
        value = json.loads(text, parse_constant=reject_constant)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {JSON_MAX_DEPTH} levels") from None
    _check_depth(value, JSON_MAX_DEPTH)
    return value


def _check_depth(value, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ValueError(f"JSON nested deeper than {limit} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def node_error(exc: OSError, syscall: str, path: str) -> str:
    """An OS error worded as Node does: ``ENOENT: <reason>, <syscall> '<path>'``."""
    code = errno.errorcode.get(exc.errno or 0, "EIO")
    reason = (exc.strerror or "error").lower()
    return f"{code}: {reason}, {syscall} '{path}'"


def require(module: str, package: str):
    """Import a run-time dependency, or say which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(
            f"missing dependency: the Python package '{package}' is not installed "
            f"(install it with: python3 -m pip install {package})"
        ) from None


# Store: paths and files ######################################################


def store_root(env=None) -> str:
    """The store folder: ``$SPELL_HOME``, else ``$HOME/.spell``, read at call time."""
    env = os.environ if env is None else env
    home = env.get("SPELL_HOME", "")
    if home.strip():
        if "\x00" in home:
            raise SpellError("SPELL_HOME must not contain NUL characters")
        return os.path.abspath(home)
    user_home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(os.path.abspath(user_home), DEFAULT_STORE_NAME)


def store_path(*parts: str, env=None) -> str:
    return os.path.join(store_root(env), *parts)


def ensure_dir(path: str) -> None:
    """Create ``path`` and missing parents with mode 0700."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        ensure_dir(parent)
    try:
        os.mkdir(path, STORE_DIR_MODE)
    except FileExistsError:
        pass
    else:
        os.chmod(path, STORE_DIR_MODE)


def ensure_store_dirs(env=None) -> None:
    """Create the four store folders (spec: every install and cast log does)."""
    for name in STORE_DIRS:
        ensure_dir(store_path(name, env=env))


def write_atomic(path: str, data: bytes | str, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write a file so readers see the old content or the new, never half.

    A temporary file beside the target is created exclusively, written, synced
    and renamed over the target; on failure it is removed.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{random_hex(6)}.tmp"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_file(
    path: str, limit: int, what: str, *, follow_symlinks: bool = False
) -> bytes:
    """Read a regular file of at most ``limit`` bytes.

    FIFOs, devices, folders and (unless allowed) symlinks are refused before a
    single byte is read, so ``/dev/zero`` or a FIFO can never hang the caller.
    Raises ``OSError`` when the file cannot be opened, ``SpellError`` otherwise.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SpellError(f"{what} must not be a symlink: {path}") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpellError(f"{what} is not a regular file: {path}")
        if info.st_size > limit:
            raise SpellError(f"{what} is larger than {limit} bytes: {path}")
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise SpellError(f"{what} is larger than {limit} bytes: {path}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json_file(path: str, what: str, *, limit: int = JSON_FILE_MAX_BYTES):
    """Read and parse a JSON file with ``read_file``'s checks.

    Raises ``OSError`` (cannot open), ``SpellError`` (not a regular file, too
    big) or ``ValueError`` (not UTF-8 or not JSON) for the caller to word.
    """
    data = read_file(path, limit, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None
    return parse_json_text(text)


def remove_record(path: str, missing: str) -> None:
    """Delete one file of the store; ``NotFound(missing)`` when it is not there."""
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            raise NotFound(missing) from None
        raise


def iso_now() -> str:
    return spell_runner.iso_now()


# Manifest ####################################################################


class YamlTimestamp(str):
    """A YAML timestamp, kept as its ISO string; it is not a manifest string."""


_yaml_loader = None

#: Plain scalars that YAML 1.2 core (plus timestamps and merge keys, as in the
#: original's YAML library) reads as something other than a string.  The int
#: and float forms follow that library: a sign may precede 0b/0o/0x, "_" may
#: separate digits but never ends a number or follows a leading 0.
_YAML_IMPLICIT = (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    (
        "int",
        r"^[-+]?(?:0b[01_]*[01]|0x[0-9a-fA-F_]*[0-9a-fA-F]|0o[0-7_]*[0-7]"
        r"|0|0[0-9](?:[0-9_]*[0-9])?|[1-9](?:[0-9_]*[0-9])?)$",
        "-+0123456789",
    ),
    (
        "float",
        r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))(?<!_)$",
        "-+0123456789.",
    ),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    (
        "timestamp",
        r"^(?:[0-9]{4}-[0-9]{2}-[0-9]{2}"
        r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}"
        r"(?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?)$",
        "0123456789",
    ),
    ("merge", r"^<<$", "<"),
)
_YAML_TIMESTAMP_RE = re.compile(
    r"^([0-9]{4})-([0-9]{1,2})-([0-9]{1,2})"
    r"(?:(?:[Tt]|[ \t]+)([0-9]{1,2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]*))?"
    r"(?:[ \t]*(Z|([-+])([0-9]{1,2})(?::([0-9]{2}))?))?)?$"
)
#: Integers beyond this lose precision in JavaScript; the original sees floats.
_JS_SAFE_INTEGER = 2**53


def _yaml_int(text: str):
    """A YAML integer as the original reads it (a float past 2**53)."""
    text = text.replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    base = {"0b": 2, "0o": 8, "0x": 16}.get(text[:2], 10)
    value = sign * int(text[2:] if base != 10 else text, base)
    if abs(value) <= _JS_SAFE_INTEGER:
        return value
    try:
        return float(value)
    except OverflowError:
        return sign * float("inf")


def _yaml_float(text: str) -> float:
    text = text.replace("_", "").lower()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    if text == ".inf":
        return sign * float("inf")
    if text == ".nan":
        return float("nan")
    return sign * float(text)


def _yaml_timestamp(text: str) -> YamlTimestamp:
    """A timestamp as the original's ISO string; out-of-range parts roll over.

    The original builds dates with JavaScript's ``Date.UTC``, which carries an
    overflowing month, day or hour into the next unit and reads years 0-99 as
    1900-1999; this does the same.
    """
    import datetime as dt

    m = _YAML_TIMESTAMP_RE.match(text)
    if m is None:
        raise ValueError(f"invalid timestamp: {text}")
    year, month, day = int(m[1]), int(m[2]) - 1, int(m[3])
    if year < 100:
        year += 1900
    hour, minute, second = (int(m[i]) if m[i] else 0 for i in (4, 5, 6))
    millis = int((m[7] or "")[:3].ljust(3, "0"))
    offset = 0
    if m[9]:
        offset = (int(m[10]) * 60 + int(m[11] or 0)) * (1 if m[9] == "+" else -1)
    year += month // 12
    value = dt.datetime(year, month % 12 + 1, 1) + dt.timedelta(
        days=day - 1,
        hours=hour,
        minutes=minute - offset,
        seconds=second,
        milliseconds=millis,
    )
    return YamlTimestamp(value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis:03d}Z")


def _yaml_loader_class():
    """A PyYAML loader with the original's YAML semantics (YAML 1.2 core).

    Only ``true``/``false`` (three casings) are booleans, ``010`` is decimal,
    ``0o``/``0x``/``0b`` prefixes work, timestamps and merge keys are
    recognised, mapping keys become strings as in JavaScript, and a duplicate
    key is an error.  Nesting depth and alias uses are bounded.
    """
    global _yaml_loader  # a cache of an immutable class, built once
    if _yaml_loader is not None:
        return _yaml_loader
    yaml = require("yaml", "PyYAML")
    ConstructorError = yaml.constructor.ConstructorError

    class Loader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self._depth = 0
            self._aliases = 0
            self._nodes = 0

        def compose_node(self, parent, index):
            self._nodes += 1
            if self._nodes > YAML_MAX_NODES:
                # Counted while composing, so a huge document stops early
                # instead of being parsed whole first.
                raise yaml.YAMLError(f"more than {YAML_MAX_NODES} nodes")
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > YAML_MAX_ALIASES:
                    raise yaml.YAMLError(f"more than {YAML_MAX_ALIASES} aliases")
            self._depth += 1
            if self._depth > YAML_MAX_DEPTH:
                raise yaml.YAMLError(f"nesting deeper than {YAML_MAX_DEPTH} levels")
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def _js_key(self, key, mark) -> str:
            if isinstance(key, list) and any(isinstance(k, list) for k in key):
                raise ConstructorError(
                    None, None, "nested arrays are not supported inside keys", mark
                )
            if isinstance(key, list):
                key = [k if not isinstance(k, dict) else "[object Object]" for k in key]
            return spell_runner.js_string(key)

        def construct_mapping(self, node, deep=False):
            if not isinstance(node, yaml.MappingNode):
                raise ConstructorError(
                    None,
                    None,
                    f"expected a mapping node, but found {node.id}",
                    node.start_mark,
                )
            result: dict = {}
            # Keys copied in by "<<" may be overridden once; others never twice.
            overridable: set = set()
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    source = self.construct_object(value_node, deep=True)
                    sources = source if isinstance(source, list) else [source]
                    for item in sources:
                        if not isinstance(item, dict):
                            raise ConstructorError(
                                None,
                                None,
                                "cannot merge mappings; the provided source object "
                                "is unacceptable",
                                value_node.start_mark,
                            )
                        for key, value in item.items():
                            if key not in result:
                                result[key] = value
                                overridable.add(key)
                    continue
                key_obj = self.construct_object(key_node, deep=True)
                key = self._js_key(key_obj, key_node.start_mark)
                if key in result and key not in overridable:
                    raise ConstructorError(
                        None,
                        None,
                        f"duplicated mapping key '{key}'",
                        key_node.start_mark,
                    )
                overridable.discard(key)
                result[key] = self.construct_object(value_node, deep=deep)
            return result

    def construct_set(loader, node):
        data: dict = {}
        yield data
        data.update(dict.fromkeys(loader.construct_mapping(node)))

    def construct_pairs(loader, node):
        data: list = []
        yield data
        for key_node, value_node in _pair_nodes(loader, node):
            data.append(
                [
                    loader._js_key(
                        loader.construct_object(key_node, deep=True),
                        key_node.start_mark,
                    ),
                    loader.construct_object(value_node, deep=True),
                ]
            )

    def construct_ordered(loader, node):
        data: list = []
        yield data
        seen = set()
        for key_node, value_node in _pair_nodes(loader, node):
            key = loader._js_key(
                loader.construct_object(key_node, deep=True), key_node.start_mark
            )
            if key in seen:
                raise ConstructorError(
                    None, None, f"duplicated mapping key '{key}'", key_node.start_mark
                )
            seen.add(key)
            data.append({key: loader.construct_object(value_node, deep=True)})

    def _pair_nodes(loader, node):
        if not isinstance(node, yaml.SequenceNode):
            raise ConstructorError(
                None, None, "expected a sequence of pairs", node.start_mark
            )
        for item in node.value:
            if not isinstance(item, yaml.MappingNode) or len(item.value) != 1:
                raise ConstructorError(
                    None,
                    None,
                    "expected a single mapping item per pair",
                    item.start_mark,
                )
            yield item.value[0]

    def construct_binary(loader, node):
        # JavaScript serialises the original's byte array as {"0": b0, ...}.
        data = yaml.SafeLoader.construct_yaml_binary(loader, node)
        return {str(i): b for i, b in enumerate(data)}

    Loader.yaml_implicit_resolvers = {}
    for name, pattern, first in _YAML_IMPLICIT:
        Loader.add_implicit_resolver(
            f"tag:yaml.org,2002:{name}", re.compile(pattern), first
        )

    def construct_scalar_with(convert):
        def construct(loader, node):
            return convert(loader.construct_scalar(node))

        return construct

    constructors = {
        "int": construct_scalar_with(_yaml_int),
        "float": construct_scalar_with(_yaml_float),
        "timestamp": construct_scalar_with(_yaml_timestamp),
        "set": construct_set,
        "omap": construct_ordered,
        "pairs": construct_pairs,
        "binary": construct_binary,
    }
    for name, func in constructors.items():
        Loader.add_constructor(f"tag:yaml.org,2002:{name}", func)
    _yaml_loader = Loader
    return Loader


def _expanded_size(value, limit: int) -> int:
    """Count nodes as if aliases were copied; stop once past ``limit``."""
    memo: dict[int, int] = {}

    def size(item) -> int:
        if isinstance(item, (dict, list)):
            key = id(item)
            if key in memo:
                return memo[key]
            memo[key] = limit + 1  # a cycle counts as too big
            children = item.items() if isinstance(item, dict) else enumerate(item)
            total = 1
            for _, child in children:
                total += size(child)
                if total > limit:
                    break
            memo[key] = total
            return total
        return 1

    return size(value)


_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value) -> bool:
    """True when a key or string anywhere in ``value`` cannot be UTF-8."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE_RE.search(item):
                return True
        elif isinstance(item, (dict, list)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.keys() if isinstance(item, dict) else ())
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False


def parse_manifest_yaml(data: bytes):
    """Parse manifest bytes; raises ``ManifestError`` with the original's prefix."""
    yaml = require("yaml", "PyYAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"failed to parse spell.yaml: invalid UTF-8 at byte {exc.start}"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    loader_class = _yaml_loader_class()
    try:
        # The reader checks characters as it starts, so it is inside the try.
        loader = loader_class(text)
        try:
            value = loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as exc:
        detail = " ".join(str(exc).split())
        raise ManifestError(f"failed to parse spell.yaml: {detail}") from None
    if _has_lone_surrogate(value):
        raise ManifestError(
            "failed to parse spell.yaml: a string holds a lone surrogate "
            "(not valid Unicode text)"
        )
    if _expanded_size(value, YAML_MAX_NODES) > YAML_MAX_NODES:
        raise ManifestError(
            f"failed to parse spell.yaml: document expands to more than "
            f"{YAML_MAX_NODES} nodes"
        )
    return value


def _is_str(value) -> bool:
    return isinstance(value, str) and not isinstance(value, YamlTimestamp)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_string(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not _is_str(value):
        raise ManifestError(f"missing or invalid string field: {key}")
    if not js_trim(value):
        raise ManifestError(f"field must not be empty: {key}")
    return value


def _require_array(obj: dict, key: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list):
        raise ManifestError(f"missing or invalid array field: {key}")
    return value


def _require_mapping(obj: dict, key: str) -> dict:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise ManifestError(f"missing or invalid object field: {key}")
    return value


def _require_bool(obj: dict, key: str) -> bool:
    value = obj.get(key)
    if not isinstance(value, bool):
        raise ManifestError(f"missing or invalid boolean field: {key}")
    return value


def _path_escapes(root: str, target: str) -> bool:
    """True when ``target`` (absolute, normalised) lies outside ``root``."""
    rel = os.path.relpath(target, root)
    return rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel)


def validate_manifest(raw, root: str) -> dict:
    """Validate a parsed manifest in the original's order and words.

    Returns a normalised copy (``params`` forced to mappings, blank docker
    images dropped) and checks the files it names exist under ``root``.
    """
    if not isinstance(raw, dict):
        raise ManifestError("spell.yaml must be a mapping object")
    fields = {
        key: _require_string(raw, key)
        for key in ("id", "version", "name", "summary", "inputs_schema")
    }
    spell_id, version = fields["id"], fields["version"]
    if utf16_length(spell_id) > ID_MAX_LENGTH:
        raise ManifestError(f"id must be <= {ID_MAX_LENGTH} characters")
    if has_control_chars(spell_id):
        raise ManifestError("id must not contain control characters")
    if utf16_length(version) > VERSION_MAX_LENGTH:
        raise ManifestError(f"version must be <= {VERSION_MAX_LENGTH} characters")
    if has_control_chars(version):
        raise ManifestError("version must not contain control characters")
    if "/" in version or "\\" in version or version in (".", ".."):
        # The version names a folder of the store: it must be one safe name.
        raise ManifestError(
            f"version must not contain '/' or '\\' or be '.' or '..': {version}"
        )

    risk = _require_string(raw, "risk")
    if risk not in RISKS:
        raise ManifestError(f"invalid risk: {risk}")

    permissions = []
    for i, item in enumerate(_require_array(raw, "permissions")):
        if not isinstance(item, dict):
            raise ManifestError(f"permissions[{i}] must be an object")
        connector = _require_string(item, "connector")
        scopes = _require_array(item, "scopes")
        for j, scope in enumerate(scopes):
            if not _is_str(scope) or not js_trim(scope):
                raise ManifestError(
                    f"permissions[{i}].scopes[{j}] must be a non-empty string"
                )
        if not scopes:
            raise ManifestError(f"permissions[{i}].scopes must not be empty")
        permissions.append({"connector": connector, "scopes": list(scopes)})

    effects = []
    for i, item in enumerate(_require_array(raw, "effects")):
        if not isinstance(item, dict):
            raise ManifestError(f"effects[{i}] must be an object")
        effect_type = _require_string(item, "type")
        target = _require_string(item, "target")
        mutates = _require_bool(item, "mutates")
        effects.append({"type": effect_type, "target": target, "mutates": mutates})

    billing_raw = _require_mapping(raw, "billing")
    enabled = _require_bool(billing_raw, "enabled")
    mode = _require_string(billing_raw, "mode")
    currency = _require_string(billing_raw, "currency")
    max_amount = billing_raw.get("max_amount")
    if not _is_number(max_amount) or max_amount != max_amount:
        raise ManifestError("missing or invalid number field: max_amount")
    if mode not in BILLING_MODES:
        raise ManifestError(f"invalid billing.mode: {mode}")
    billing = {
        "enabled": enabled,
        "mode": mode,
        "currency": currency,
        "max_amount": max_amount,
    }

    runtime_raw = _require_mapping(raw, "runtime")
    execution = _require_string(runtime_raw, "execution")
    if execution not in EXECUTIONS:
        raise ManifestError(f"invalid runtime.execution: {execution}")
    platforms = _require_array(runtime_raw, "platforms")
    for i, item in enumerate(platforms):
        if not _is_str(item) or not js_trim(item):
            raise ManifestError(f"runtime.platforms[{i}] must be a non-empty string")
    runtime = {"execution": execution, "platforms": list(platforms)}
    image = runtime_raw.get("docker_image")
    if _is_str(image) and js_trim(image):
        runtime["docker_image"] = image
    elif execution == "docker":
        raise ManifestError(
            "runtime.docker_image is required when runtime.execution=docker"
        )

    steps_raw = _require_array(raw, "steps")
    if not steps_raw:
        raise ManifestError("steps must not be empty")
    steps, names = [], set()
    for i, item in enumerate(steps_raw):
        if not isinstance(item, dict):
            raise ManifestError(f"steps[{i}] must be an object")
        uses = _require_string(item, "uses")
        if uses not in STEP_KINDS:
            raise ManifestError(f"invalid steps[{i}].uses: {uses}")
        name = _require_string(item, "name")
        if name in names:
            raise ManifestError(f"duplicate step name: {name}")
        names.add(name)
        run = _require_string(item, "run")
        steps.append({"uses": uses, "name": name, "run": run})

    checks_raw = _require_array(raw, "checks")
    if not checks_raw:
        raise ManifestError("checks must not be empty")
    checks = []
    for i, item in enumerate(checks_raw):
        if not isinstance(item, dict):
            raise ManifestError(f"checks[{i}] must be an object")
        check_type = _require_string(item, "type")
        if check_type not in CHECK_TYPES:
            raise ManifestError(f"invalid checks[{i}].type: {check_type}")
        params = item.get("params")
        checks.append(
            {"type": check_type, "params": params if isinstance(params, dict) else {}}
        )

    _check_bundle_files(root, fields["inputs_schema"], steps)
    manifest = dict(fields)
    manifest.update(
        risk=risk,
        permissions=permissions,
        effects=effects,
        billing=billing,
        runtime=runtime,
        steps=steps,
        checks=checks,
    )
    return manifest


def _check_exists(path: str) -> None:
    try:
        os.lstat(path)
    except OSError as exc:
        raise ManifestError(node_error(exc, "access", path)) from None


def _check_bundle_files(root: str, inputs_schema: str, steps: list) -> None:
    schema_path = os.path.normpath(os.path.join(root, inputs_schema))
    if _path_escapes(root, schema_path):
        raise ManifestError("inputs_schema escapes bundle root")
    if os.path.basename(schema_path) != "schema.json":
        raise ManifestError("inputs_schema must point to schema.json in v1")
    _check_exists(schema_path)
    _check_exists(os.path.join(root, "schema.json"))
    steps_dir = os.path.join(root, "steps")
    try:
        info = os.stat(steps_dir)
    except OSError as exc:
        raise ManifestError(node_error(exc, "stat", steps_dir)) from None
    if not stat.S_ISDIR(info.st_mode):
        raise ManifestError("steps/ must be a directory")
    for step in steps:
        run_path = os.path.normpath(os.path.join(root, step["run"]))
        if _path_escapes(root, run_path):
            raise ManifestError(f"step '{step['name']}' run path escapes bundle root")
        _check_exists(run_path)


def load_manifest(root: str) -> dict:
    """Load and validate ``<root>/spell.yaml`` (root must be absolute)."""
    path = os.path.join(root, "spell.yaml")
    try:
        data = read_file(path, MANIFEST_MAX_BYTES, "spell.yaml")
    except OSError:
        raise ManifestError(f"spell.yaml not found: {path}") from None
    return validate_manifest(parse_manifest_yaml(data), root)


def publisher_from_id(spell_id: str) -> str:
    """The publisher of an id: the part before the first ``/``."""
    return spell_id.split("/", 1)[0]


# Install and the store #######################################################

_GIT_SCP_RE = re.compile(r"^git@[^:]+:.+")
#: Refs are names or hashes; anything that git could read as an option is refused.
_GIT_REF_RE = re.compile(r"^[A-Za-z0-9._/+@{}~^-]+$")
_FULL_SHA_RE = re.compile(r"^[0-9a-fA-F]{40}(?:[0-9a-fA-F]{24})?$")


def is_git_source(source: str) -> bool:
    lowered = source.lower()
    return (
        lowered.startswith("https://")
        or lowered.startswith("ssh://")
        or _GIT_SCP_RE.match(source) is not None
    )


def _new_temp_dir(prefix: str) -> str:
    """A private folder under ``<store>/tmp`` (same filesystem as the store)."""
    base = store_path("tmp")
    ensure_dir(base)
    _clean_stale_temp_dirs(base)
    path = os.path.join(base, f"{prefix}-{os.getpid()}-{random_hex(4)}")
    os.mkdir(path, STORE_DIR_MODE)
    return path


def _clean_stale_temp_dirs(base: str) -> None:
    """Remove temp folders left by processes that died (killed installs)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or not parts[-2].isdigit():
            continue
        pid = int(parts[-2])
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _run_git(args: list[str], source: str, prefix: str) -> str:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="", SSH_ASKPASS="")
    # Command transports (ext::, fd::) could run programs; never allow them.
    cmd = [
        "git",
        "-c",
        "protocol.ext.allow=never",
        "-c",
        "protocol.fd.allow=never",
        "-c",
        "core.hooksPath=/dev/null",
        *args,
    ]
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=GIT_TIMEOUT_SECONDS,
        )
    except FileNotFoundError:
        raise InstallError(
            "git executable not found: install git and ensure it is on PATH"
        ) from None
    except subprocess.TimeoutExpired:
        raise InstallError(
            f"{prefix}: git timed out after {GIT_TIMEOUT_SECONDS}s"
        ) from None
    except OSError as exc:
        raise InstallError(f"failed to run git command for '{source}': {exc}") from None
    if proc.returncode != 0:
        detail = (
            proc.stderr.decode("utf-8", "replace").strip()
            or proc.stdout.decode("utf-8", "replace").strip()
            or f"git exited with code {proc.returncode}"
        )
        raise InstallError(f"{prefix}: {' '.join(detail.split())}")
    return proc.stdout.decode("utf-8", "replace")


def _fetch_git(source: str, workdir: str) -> tuple[str, str, str]:
    """Fetch ``<url>#<ref>`` into ``workdir/bundle``; return (path, ref, commit)."""
    url, sep, ref = source.rpartition("#")
    if not sep or not ref or not url:
        raise InstallError("git source requires explicit ref (#<ref>)")
    if url.startswith("-") or ref.startswith("-") or not _GIT_REF_RE.match(ref):
        raise InstallError(f"invalid git ref or url in source: {source}")
    clone_prefix = f"failed to clone git source '{source}'"
    target = os.path.join(workdir, "bundle")
    if _FULL_SHA_RE.match(ref):
        # A commit: fetch just it when the server allows, else the whole history.
        _run_git(["init", "-q", "--", target], source, clone_prefix)
        _run_git(
            ["-C", target, "remote", "add", "origin", "--", url], source, clone_prefix
        )
        try:
            _run_git(
                ["-C", target, "fetch", "-q", "--depth", "1", "origin", ref],
                source,
                clone_prefix,
            )
        except InstallError:
            _run_git(["-C", target, "fetch", "-q", "origin"], source, clone_prefix)
        _run_git(
            [
                "-C",
                target,
                "-c",
                "advice.detachedHead=false",
                "checkout",
                "-q",
                ref,
                "--",
            ],
            source,
            clone_prefix,
        )
    else:
        _run_git(
            ["clone", "-q", "--depth", "1", "--branch", ref, "--", url, target],
            source,
            clone_prefix,
        )
    commit = _run_git(
        ["-C", target, "rev-parse", "HEAD"],
        source,
        f"failed to resolve git commit for '{source}'",
    ).strip()
    if not commit:
        raise InstallError(f"failed to resolve git commit for '{source}': empty HEAD")
    return target, ref, commit


def _copy_file(src: str, dst: str) -> None:
    """Copy one regular file's bytes and permission bits, never following links."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InstallError(f"unsupported file type in bundle: {src}")
        mode = stat.S_IMODE(info.st_mode) & 0o755
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode | 0o600)
        try:
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                os.write(out, chunk)
        finally:
            os.close(out)
        os.chmod(dst, mode | 0o600)
    finally:
        os.close(fd)


def _copy_steps(src: str, dst: str) -> None:
    os.mkdir(dst, 0o755)
    with os.scandir(src) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = os.path.join(src, entry.name)
            if entry.is_symlink():
                raise InstallError(f"symlink is not allowed in steps/: {path}")
            if entry.is_dir(follow_symlinks=False):
                _copy_steps(path, os.path.join(dst, entry.name))
            elif entry.is_file(follow_symlinks=False):
                _copy_file(path, os.path.join(dst, entry.name))
            else:
                raise InstallError(f"unsupported file type in steps/: {path}")


def _stage_bundle(root: str, manifest: dict, stage: str) -> None:
    """Copy the parts of a bundle that install keeps into ``stage``."""
    for name in ("spell.yaml", "schema.json"):
        path = os.path.join(root, name)
        if os.path.islink(path):
            raise InstallError(f"symlink is not allowed: {path}")
        _copy_file(path, os.path.join(stage, name))
    sig = os.path.join(root, "spell.sig.json")
    if os.path.lexists(sig):
        if os.path.islink(sig):
            raise InstallError(f"symlink is not allowed: {sig}")
        _copy_file(sig, os.path.join(stage, "spell.sig.json"))
    steps_dir = os.path.join(root, "steps")
    if os.path.islink(steps_dir):
        raise InstallError(f"symlink is not allowed: {steps_dir}")
    _copy_steps(steps_dir, os.path.join(stage, "steps"))


def _check_installable(manifest: dict) -> None:
    """Rules install adds to manifest validation (docs/compatibility.md)."""
    schema = os.path.normpath(manifest["inputs_schema"])
    if schema != "schema.json":
        raise InstallError(
            f"inputs_schema must point to schema.json at the bundle root: "
            f"{manifest['inputs_schema']}"
        )
    for step in manifest["steps"]:
        run = os.path.normpath(step["run"])
        if not run.startswith("steps" + os.sep):
            raise InstallError(
                f"step '{step['name']}' run path must be inside steps/: {step['run']}"
            )
    if manifest["version"].startswith("."):
        # Listings skip hidden folders, so such a version could never be found.
        raise InstallError(f"version must not start with '.': {manifest['version']}")
    if manifest["version"] == "spell.id.txt":
        raise InstallError("version must not be 'spell.id.txt' (the id file's name)")
    if (
        len(id_key(manifest["id"])) > NAME_MAX
        or len(manifest["version"].encode()) > NAME_MAX
    ):
        raise InstallError("id or version is too long to store")


def install_bundle(source: str) -> dict:
    """Install a bundle from a folder or ``<git url>#<ref>``; return its manifest."""
    if "\x00" in source:
        raise InstallError("source must not contain NUL characters")
    workdir = None
    try:
        if is_git_source(source):
            workdir = _new_temp_dir("git")
            root, ref, commit = _fetch_git(source, workdir)
            provenance = {"type": "git", "source": source, "ref": ref, "commit": commit}
        else:
            try:
                root = os.path.realpath(os.path.abspath(source), strict=True)
            except OSError as exc:
                raise InstallError(
                    node_error(exc, "realpath", os.path.abspath(source))
                ) from None
            if not os.path.isdir(root):
                raise InstallError(f"bundle path must be a directory: {source}")
            provenance = {"type": "local", "source": source}
        manifest = load_manifest(root)
        _check_installable(manifest)
        _commit_install(root, manifest, provenance)
        return manifest
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _commit_install(root: str, manifest: dict, provenance: dict) -> None:
    spell_id, version = manifest["id"], manifest["version"]
    ensure_store_dirs()
    key = id_key(spell_id)
    id_dir = store_path("spells", key)
    id_file = os.path.join(id_dir, "spell.id.txt")
    if os.path.isdir(id_dir):
        stored = _read_id_file(id_file)
        if stored is not None and stored != spell_id:
            raise InstallError(
                f"spell.id.txt mismatch for {key}: expected '{stored}', got '{spell_id}'"
            )
    if os.path.lexists(os.path.join(id_dir, version)):
        raise InstallError(f"already installed: {spell_id}@{version}")
    stage = _new_temp_dir("install")
    try:
        version_stage = os.path.join(stage, "id", version)
        os.makedirs(version_stage, 0o755)
        _stage_bundle(root, manifest, version_stage)
        record = dict(provenance, installed_at=iso_now())
        write_atomic(
            os.path.join(version_stage, "source.json"), dump_json(record), 0o644
        )
        if not os.path.isdir(id_dir):
            write_atomic(
                os.path.join(stage, "id", "spell.id.txt"), spell_id + "\n", 0o644
            )
            os.chmod(os.path.join(stage, "id"), STORE_DIR_MODE)
            try:
                os.rename(os.path.join(stage, "id"), id_dir)
                return
            except OSError:
                if not os.path.isdir(id_dir):
                    raise
        elif _read_id_file(id_file) is None:
            write_atomic(id_file, spell_id + "\n", 0o644)
        target = os.path.join(id_dir, version)
        try:
            os.rename(version_stage, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise InstallError(f"already installed: {spell_id}@{version}") from None
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _read_id_file(path: str, *, strict: bool = False) -> str | None:
    """The trimmed id in ``spell.id.txt``; None if it is missing.

    A file that is not a small regular file (a FIFO, a huge or sparse file)
    is also None, unless ``strict`` asks for the error saying what it is.
    """
    try:
        data = read_file(path, 4096, "spell.id.txt")
    except OSError:
        return None
    except SpellError:
        if strict:
            raise
        return None
    return js_trim(data.decode("utf-8", "replace"))


def _version_dirs(id_dir: str) -> list[str]:
    try:
        entries = list(os.scandir(id_dir))
    except OSError:
        return []
    return [
        e.name
        for e in entries
        if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
    ]


def resolve_installed(spell_id: str, version: str | None) -> tuple[str, dict]:
    """Find an installed bundle by id and optional version (spec: latest rule)."""
    id_dir = store_path("spells", id_key(spell_id))
    if len(id_key(spell_id)) > NAME_MAX or not os.path.isdir(id_dir):
        raise NotFound(f"spell not installed: {spell_id}")
    stored = _read_id_file(os.path.join(id_dir, "spell.id.txt"), strict=True)
    if stored is None:
        raise NotFound(f"missing spell.id.txt for {spell_id}")
    if stored != spell_id:
        raise SpellError(
            f"id mismatch in spell.id.txt: expected '{spell_id}', found '{stored}'"
        )
    versions = _version_dirs(id_dir)
    if not versions:
        raise NotFound(f"no versions installed for: {spell_id}")
    chosen = version if version is not None else pick_latest(versions)
    if chosen not in versions:
        raise NotFound(f"version not installed for {spell_id}: {chosen}")
    bundle_dir = os.path.join(id_dir, chosen)
    manifest = load_manifest(bundle_dir)
    if manifest["id"] != spell_id:
        raise SpellError(
            f"manifest id mismatch: expected '{spell_id}', found '{manifest['id']}'"
        )
    return bundle_dir, manifest


def installed_bundles(warn=None) -> list[tuple[str, dict]]:
    """Every installed (bundle dir, manifest), sorted as ``spell list`` prints.

    Stray files and broken versions are skipped (reported through ``warn``)
    instead of failing the whole listing.
    """
    spells = store_path("spells")
    try:
        entries = list(os.scandir(spells))
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            stored = _read_id_file(os.path.join(entry.path, "spell.id.txt"), strict=True)
        except SpellError as exc:
            if warn:
                warn(f"skipping {entry.path}: {exc.message}")
            continue
        if stored is None:
            if warn:
                warn(f"skipping {entry.path}: missing spell.id.txt")
            continue
        for version in _version_dirs(entry.path):
            path = os.path.join(entry.path, version)
            try:
                manifest = load_manifest(path)
            except MissingDependency:
                raise
            except SpellError as exc:
                if warn:
                    warn(f"skipping {path}: {exc.message}")
                continue
            if manifest["id"] != stored:
                if warn:
                    warn(
                        f"skipping {path}: id mismatch under {entry.path}: "
                        f"spell.id.txt='{stored}', spell.yaml.id='{manifest['id']}'"
                    )
                continue
            found.append((path, manifest))
    found.sort(key=lambda item: locale_key(item[1]["version"]), reverse=True)
    found.sort(key=lambda item: locale_key(item[1]["id"]))
    return found


def schema_summary(schema) -> tuple[list[str], list[str]]:
    """The (required, "key: type") lists ``inspect`` prints for a schema."""
    if not isinstance(schema, dict):
        return [], []
    required = (
        [r for r in schema.get("required", []) if isinstance(r, str)]
        if isinstance(schema.get("required"), list)
        else []
    )
    types = []
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for key, prop in properties.items():
            kind = "unknown"
            if isinstance(prop, dict):
                declared = prop.get("type")
                if isinstance(declared, list):
                    kind = "|".join(t for t in declared if isinstance(t, str))
                elif isinstance(declared, str):
                    kind = declared
            types.append(f"{key}: {kind}")
    return required, types


def load_schema(bundle_dir: str, manifest: dict):
    path = os.path.join(bundle_dir, manifest["inputs_schema"])
    try:
        return read_json_file(path, "schema.json")
    except OSError as exc:
        raise SpellError(node_error(exc, "open", path)) from None
    except ValueError as exc:
        raise SpellError(f"failed to parse schema.json: {exc}") from None


def _read_source_record(bundle_dir: str):
    try:
        return read_json_file(os.path.join(bundle_dir, "source.json"), "source.json")
    except (OSError, ValueError, SpellError):
        return None


def cmd_install(args, io) -> int:
    manifest = install_bundle(args.source)
    io.out(f"{escape_text(manifest['id'])}@{escape_text(manifest['version'])}")
    return 0


def cmd_list(args, io) -> int:
    bundles = installed_bundles(warn=io.warn)
    if args.json:
        io.out(
            spell_runner.dumps_js(
                [
                    {
                        "id": m["id"],
                        "version": m["version"],
                        "name": m["name"],
                        "summary": m["summary"],
                        "risk": m["risk"],
                        "billing": m["billing"],
                        "runtime": m["runtime"],
                        "path": path,
                    }
                    for path, m in bundles
                ],
                indent=2,
            )
        )
        return 0
    if not bundles:
        io.out("No spells installed")
        return 0
    io.out("id@version\tname\trisk\tbilling.enabled\truntime.execution")
    for _, m in bundles:
        row = [
            f"{m['id']}@{m['version']}",
            m["name"],
            m["risk"],
            "true" if m["billing"]["enabled"] else "false",
            m["runtime"]["execution"],
        ]
        io.out("\t".join(escape_text(cell) for cell in row))
    return 0


def cmd_inspect(args, io) -> int:
    bundle_dir, m = resolve_installed(args.id, args.version)
    schema = load_schema(bundle_dir, m)
    required, key_types = schema_summary(schema)
    if args.json:
        io.out(
            spell_runner.dumps_js(
                {
                    "id": m["id"],
                    "version": m["version"],
                    "name": m["name"],
                    "summary": m["summary"],
                    "risk": m["risk"],
                    "inputs": {"required": required, "key_types": key_types},
                    "permissions": m["permissions"],
                    "effects": m["effects"],
                    "billing": m["billing"],
                    "runtime": m["runtime"],
                    "steps": m["steps"],
                    "checks": m["checks"],
                    "path": bundle_dir,
                    "source": _read_source_record(bundle_dir),
                },
                indent=2,
            )
        )
        return 0
    e = escape_text
    billing, runtime = m["billing"], m["runtime"]
    lines = [
        "識別",
        f"  id@version: {e(m['id'])}@{e(m['version'])}",
        f"  name: {e(m['name'])}",
        f"  summary: {e(m['summary'])}",
        "供物",
        f"  required: {e(','.join(required)) if required else '(none)'}",
        f"  key types: {e(','.join(key_types)) if key_types else '(none)'}",
        "鍵穴",
    ]
    lines += [
        f"  connector={e(p['connector'])} scopes={e(','.join(p['scopes']))}"
        for p in m["permissions"]
    ] or ["  (none)"]
    lines.append("作用")
    lines += [
        f"  type={e(x['type'])} target={e(x['target'])} "
        f"mutates={'true' if x['mutates'] else 'false'}"
        for x in m["effects"]
    ]
    lines += [
        "代償",
        f"  enabled={'true' if billing['enabled'] else 'false'} mode={e(billing['mode'])} "
        f"max_amount={js_number(billing['max_amount'])} currency={e(billing['currency'])}",
        "実行",
        f"  execution={runtime['execution']} "
        f"docker_image={e(runtime.get('docker_image', '-'))} "
        f"platforms={e(','.join(runtime['platforms']))}",
        "封印",
    ]
    lines += [
        f"  type={c['type']} params={e(spell_runner.dumps_js(c['params']))}"
        for c in m["checks"]
    ]
    io.out("\n".join(lines))
    return 0


_LOG_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def log_path(execution_id: str) -> str:
    """The log file of an execution id; ids that could leave the folder are refused."""
    name = execution_id if execution_id.endswith(".json") else execution_id + ".json"
    if not _LOG_NAME_RE.match(name) or len(name) > NAME_MAX:
        raise NotFound(f"log not found: {execution_id}")
    return store_path("logs", name)


def cmd_log(args, io) -> int:
    path = log_path(args.execution_id)
    try:
        data = read_file(path, LOG_MAX_BYTES, "log")
    except (OSError, SpellError):
        raise NotFound(f"log not found: {args.execution_id}") from None
    text = data.decode("utf-8", "replace")
    io.out(text[:-1] if text.endswith("\n") else text)
    return 0


# Digest and signatures #######################################################

SIGNATURE_FILE = "spell.sig.json"
#: The digest starts with this tag, so no other kind of hash input can collide.
DIGEST_DOMAIN = b"spell-bundle-v1\x00"
#: Files are hashed in pieces of this size: memory stays flat whatever their size.
HASH_CHUNK_BYTES = 1024 * 1024
#: An Ed25519 PEM key is 119 bytes and an 8192-bit RSA one about 6.5 KiB: 64 KiB
#: refuses junk (or /dev/zero) at once without refusing any real key file.
PRIVATE_KEY_MAX_BYTES = 64 * 1024
ED25519_SIGNATURE_BYTES = 64
_HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")
#: Edwards25519 (RFC 8032, section 5.1): the field prime and the curve's d.
_ED25519_P = 2**255 - 19
_ED25519_D = -121665 * pow(121666, -1, _ED25519_P) % _ED25519_P


class KeyInvalid(SpellError):
    """A key that cannot be used; the message is the detail callers prefix."""

    error_code = "INVALID_KEY"


class _Unreadable(Exception):
    """Why a file is not a readable regular file.

    ``kind`` is ``missing``, ``os`` (another OS error), ``symlink``, ``special``
    (not a regular file) or ``too_big``; ``detail`` is text without the path for
    the last three.  Callers always turn it into a ``SpellError``.
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


# TODO: fold read_file (Store section) into these two readers, so that every
# file spell reads goes through one place; they differ only in how failures
# are reported (OSError plus a SpellError there, _Unreadable kinds here).
def _open_regular(path: str, *, follow_symlinks: bool = False) -> tuple[int, int]:
    """Open a regular file for reading; return (descriptor, size).

    O_NONBLOCK keeps a FIFO from blocking the open, and the type is checked on
    the open descriptor, so nothing is read from a FIFO or a device and a file
    swapped after a check is still caught.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise _Unreadable("symlink", "symlinks are not allowed") from None
        kind = "missing" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else "os"
        raise _Unreadable(kind, node_error(exc, "open", path)) from None
    try:
        info = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise _Unreadable("os", node_error(exc, "fstat", path)) from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _Unreadable("special", "not a regular file")
    return fd, info.st_size


def _read_regular(path: str, limit: int, *, follow_symlinks: bool = False) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes (else ``_Unreadable``)."""
    fd, size = _open_regular(path, follow_symlinks=follow_symlinks)
    try:
        if size > limit:
            raise _Unreadable("too_big", f"larger than {limit} bytes")
        chunks, total = [], 0
        while True:
            try:
                chunk = os.read(fd, min(HASH_CHUNK_BYTES, limit + 1 - total))
            except OSError as exc:
                raise _Unreadable("os", node_error(exc, "read", path)) from None
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _Unreadable("too_big", f"larger than {limit} bytes")
    finally:
        os.close(fd)


def _parse_json_bytes(data: bytes):
    """UTF-8 JSON without NaN or Infinity; raises ``ValueError`` with a detail."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None
    try:
        return parse_json_text(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {JSON_MAX_DEPTH} levels") from None


def _crypto_detail(exc: Exception) -> str:
    """The useful part of a ``cryptography`` error, on one line."""
    text = " ".join(str(exc).split())
    if text.startswith("Unable to load PEM file"):
        return "not a PEM file"
    if "Details: " in text:
        return text.split("Details: ", 1)[1]
    return text or type(exc).__name__


def _key_type_name(key) -> str:
    """A short name for the type of a ``cryptography`` key (``RSA``, ``EC``, ...)."""
    from cryptography.hazmat.primitives.asymmetric import (
        dh, dsa, ec, ed448, rsa, x448, x25519)

    kinds = (("RSA", rsa.RSAPublicKey, rsa.RSAPrivateKey),
             ("EC", ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey),
             ("DSA", dsa.DSAPublicKey, dsa.DSAPrivateKey),
             ("Ed448", ed448.Ed448PublicKey, ed448.Ed448PrivateKey),
             ("X25519", x25519.X25519PublicKey, x25519.X25519PrivateKey),
             ("X448", x448.X448PublicKey, x448.X448PrivateKey),
             ("DH", dh.DHPublicKey, dh.DHPrivateKey))
    for name, *types in kinds:
        if isinstance(key, tuple(types)):
            return name
    return type(key).__name__


def _ed25519_public_key(text: str):
    """Load an Ed25519 SPKI DER public key from base64url, or raise ``KeyInvalid``."""
    require("cryptography", "cryptography")
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_der_public_key(b64url_decode(text))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyInvalid(_crypto_detail(exc)) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyInvalid(f"expected an Ed25519 key, got {_key_type_name(key)}")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if _weak_ed25519_point(raw):
        raise KeyInvalid("weak Ed25519 key (a point of small order)")
    return key


def _weak_ed25519_point(raw: bytes) -> bool:
    """True for an encoded public key that must not be trusted.

    That is a point of order 1, 2, 4 or 8 (the identity among them) or a
    non-canonical encoding. For such a key the signature (R = the identity,
    S = 0) verifies for every message, and OpenSSL accepts it, so whoever
    holds no key at all could sign as the publisher or issuer. The point is
    decoded as RFC 8032 section 5.1.3 says and multiplied by the cofactor 8.
    """
    p, d = _ED25519_P, _ED25519_D
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= p:
        return True
    u, v = (y * y - 1) % p, (d * y * y + 1) % p
    x = u * pow(v, 3, p) * pow(u * pow(v, 7, p), (p - 5) // 8, p) % p
    if (v * x * x - u) % p:
        x = x * pow(2, (p - 1) // 4, p) % p
    if (v * x * x - u) % p:
        return False  # not a point: no signature verifies with it
    if x == 0 and sign:
        return True
    if x & 1 != sign:
        x = p - x
    for _ in range(3):  # doubling on -x^2 + y^2 = 1 + d x^2 y^2
        t = d * x * x * y * y % p
        x, y = (2 * x * y * pow(1 + t, -1, p) % p,
                (y * y + x * x) * pow(1 - t, -1, p) % p)
    return x == 0 and y == 1


def _ed25519_private_key(pem: bytes):
    """Load an unencrypted PKCS#8 PEM Ed25519 private key, or raise ``KeyInvalid``."""
    require("cryptography", "cryptography")
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # raised when the PEM is encrypted and no password was given
        message = "the key is encrypted; spell needs an unencrypted PKCS#8 key"
        raise KeyInvalid(message) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyInvalid(_crypto_detail(exc)) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyInvalid(f"expected an Ed25519 key, got {_key_type_name(key)}")
    return key


def _ed25519_verify(key, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data``."""
    from cryptography.exceptions import InvalidSignature

    if len(signature) != ED25519_SIGNATURE_BYTES:
        return False
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _spki_base64url(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return b64url_encode(der)


def _check_root_file(root: str, name: str) -> None:
    path = os.path.join(root, name)
    try:
        info = os.lstat(path)
    except OSError:
        raise SignatureError(f"{name} not found") from None
    if stat.S_ISLNK(info.st_mode):
        raise SignatureError(f"symlink is not allowed: {path}")
    if not stat.S_ISREG(info.st_mode):
        raise SignatureError(f"{name} not found")


def _walk_steps(steps_dir: str) -> list[str]:
    """Relative paths (``/``-separated) of the regular files under ``steps_dir``."""
    found = []
    pending = [("", steps_dir)]
    while pending:
        prefix, folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                listing = [(entry.name, entry.path, entry.stat(follow_symlinks=False))
                           for entry in entries]
        except OSError as exc:
            raise SignatureError(node_error(exc, "scandir", folder)) from None
        for name, path, info in listing:
            if stat.S_ISLNK(info.st_mode):
                raise SignatureError(f"symlink is not allowed in steps/: {path}")
            if stat.S_ISDIR(info.st_mode):
                pending.append((prefix + name + "/", path))
            elif stat.S_ISREG(info.st_mode):
                found.append(prefix + name)
            else:
                raise SignatureError(f"unsupported file type in steps/: {path}")
    return found


def bundle_files(bundle_dir: str) -> list[str]:
    """The relative paths the bundle digest covers, in digest order.

    ``spell.yaml``, ``schema.json`` and every regular file under ``steps/``
    (hidden ones too), sorted in locale order; a symlink or a special file
    anywhere under ``steps/`` is an error.
    """
    root = os.path.abspath(bundle_dir)
    _check_root_file(root, "spell.yaml")
    _check_root_file(root, "schema.json")
    steps_dir = os.path.join(root, "steps")
    try:
        info = os.lstat(steps_dir)
    except OSError:
        raise SignatureError("steps/ must be a directory") from None
    if stat.S_ISLNK(info.st_mode):
        raise SignatureError(f"symlink is not allowed: {steps_dir}")
    if not stat.S_ISDIR(info.st_mode):
        raise SignatureError("steps/ must be a directory")
    files = ["spell.yaml", "schema.json"]
    files += ["steps/" + rel for rel in _walk_steps(steps_dir)]
    files.sort(key=locale_key)
    return files


def _hash_file(digest, root: str, rel: str) -> None:
    path = os.path.join(root, *rel.split("/"))
    try:
        fd, _ = _open_regular(path)
    except _Unreadable as exc:
        if rel.startswith("steps/") and exc.kind == "symlink":
            raise SignatureError(f"symlink is not allowed in steps/: {path}") from None
        if rel.startswith("steps/") and exc.kind == "special":
            raise SignatureError(f"unsupported file type in steps/: {path}") from None
        if exc.kind == "symlink":
            raise SignatureError(f"symlink is not allowed: {path}") from None
        if exc.kind in ("missing", "special"):
            raise SignatureError(f"{rel} not found") from None
        raise SignatureError(exc.detail) from None
    try:
        while True:
            try:
                chunk = os.read(fd, HASH_CHUNK_BYTES)
            except OSError as exc:
                raise SignatureError(node_error(exc, "read", path)) from None
            if not chunk:
                return
            digest.update(chunk)
    finally:
        os.close(fd)


def bundle_digest(bundle_dir: str, files: list[str] | None = None) -> bytes:
    """The 32-byte SHA-256 bundle digest that signatures cover.

    Input: ``spell-bundle-v1 NUL``, then for each file of ``bundle_files`` in
    order ``file NUL <relative path, UTF-8> NUL <bytes> NUL``.  Files are read
    as a stream.  ``files`` may pass a ``bundle_files`` result already made.
    """
    root = os.path.abspath(bundle_dir)
    if files is None:
        files = bundle_files(root)
    import hashlib

    digest = hashlib.sha256(DIGEST_DOMAIN)
    for rel in files:
        try:
            name = rel.encode("utf-8")
        except UnicodeEncodeError:
            raise SignatureError(
                f"unsupported file name in steps/: {os.path.join(root, rel)!r}"
            ) from None
        digest.update(b"file\x00" + name + b"\x00")
        _hash_file(digest, root, rel)
        digest.update(b"\x00")
    return digest.digest()


def _required_text(obj: dict, key: str, error=SpellError, prefix: str = "") -> str:
    """``obj[key]`` trimmed, which must be a string non-empty after trimming."""
    value = obj.get(key)
    if not isinstance(value, str) or not js_trim(value):
        raise error(f"{prefix}missing '{key}' string")
    return js_trim(value)


def read_signature_file(bundle_dir: str) -> dict | None:
    """Read and check ``<bundle_dir>/spell.sig.json``; ``None`` when it is absent.

    Returns the trimmed fields (digest value lower-cased) in the file's layout.
    """
    path = os.path.join(bundle_dir, SIGNATURE_FILE)
    try:
        data = _read_regular(path, JSON_FILE_MAX_BYTES)
    except _Unreadable as exc:
        if exc.kind == "missing":
            return None
        raise SignatureError(f"failed to read spell.sig.json: {exc.detail}") from None
    try:
        raw = _parse_json_bytes(data)
    except ValueError as exc:
        raise SignatureError(f"failed to parse spell.sig.json: {exc}") from None
    if not isinstance(raw, dict):
        raise SignatureError("spell.sig.json must be a JSON object")

    def text(obj: dict, key: str) -> str:
        return _required_text(obj, key, SignatureError, "spell.sig.json ")

    version = text(raw, "version")
    if version != "v1":
        raise SignatureError(f"unsupported signature version: {version}")
    publisher = text(raw, "publisher")
    key_id = text(raw, "key_id")
    algorithm = text(raw, "algorithm")
    if algorithm != "ed25519":
        raise SignatureError(f"unsupported signature algorithm: {algorithm}")
    digest = raw.get("digest")
    if not isinstance(digest, dict):
        raise SignatureError("spell.sig.json.digest must be an object")
    digest_algorithm = text(digest, "algorithm")
    if digest_algorithm != "sha256":
        raise SignatureError(f"unsupported digest algorithm: {digest_algorithm}")
    value = text(digest, "value")
    if not _HEX64_RE.match(value):
        raise SignatureError("spell.sig.json.digest.value must be a sha256 hex string")
    signature = text(raw, "signature")
    if not is_base64url(signature):
        raise SignatureError("spell.sig.json.signature must be base64url")
    return {"version": version, "publisher": publisher, "key_id": key_id,
            "algorithm": algorithm,
            "digest": {"algorithm": digest_algorithm, "value": value.lower()},
            "signature": signature}


def _verification(ok: bool, status: str, publisher: str, message: str,
                  key_id: str | None = None, digest: str | None = None) -> dict:
    result = {"ok": ok, "status": status, "publisher": publisher}
    if key_id is not None:
        result["key_id"] = key_id
    if digest is not None:
        result["digest"] = digest
    result["message"] = message
    return result


def _verify_bundle_strict(manifest: dict, bundle_dir: str, publisher: str) -> dict:
    sig = read_signature_file(bundle_dir)
    if sig is None:
        return _verification(False, "unsigned", publisher, "spell.sig.json not found")
    key_id, declared = sig["key_id"], sig["digest"]["value"]

    def fail(status: str, message: str, digest_hex: str) -> dict:
        return _verification(False, status, publisher, message, key_id, digest_hex)

    if sig["publisher"] != publisher:
        return fail("invalid", f"signature publisher mismatch: expected '{publisher}', "
                               f"got '{sig['publisher']}'", declared)
    trust = load_trust(publisher)
    if trust is None:
        return fail("untrusted", f"no trusted key for publisher: {publisher}", declared)
    public_key = trusted_key(trust, key_id)
    if public_key is None:
        return fail("untrusted", f"trusted key_id not found: {key_id}", declared)
    digest = bundle_digest(bundle_dir)
    if digest.hex() != declared:
        return fail("invalid", "digest mismatch", digest.hex())
    try:
        key = _ed25519_public_key(public_key)
    except KeyInvalid as exc:
        message = f"invalid trusted public key: {exc.message}"
        return fail("untrusted", message, digest.hex())
    if not _ed25519_verify(key, b64url_decode(sig["signature"]), digest):
        return fail("invalid", "signature verification failed", digest.hex())
    return _verification(True, "verified", publisher, "verified", key_id, digest.hex())


def verify_bundle(manifest: dict, bundle_dir: str) -> dict:
    """Check a bundle's ``spell.sig.json`` against the trust store.

    Returns ``{ok, status, publisher, key_id?, digest?, message}`` where status
    is ``verified``, ``unsigned``, ``untrusted`` or ``invalid``.  A broken
    signature file, trust file or bundle tree gives ``invalid`` with the error
    as the message and no key id or digest.  Never raises ``SpellError``,
    except ``MissingDependency`` when ``cryptography`` is absent.
    """
    publisher = publisher_from_id(manifest["id"])
    try:
        return _verify_bundle_strict(manifest, bundle_dir, publisher)
    except MissingDependency:
        raise
    except SpellError as exc:
        return _verification(False, "invalid", publisher, exc.message)
    except OSError as exc:
        return _verification(False, "invalid", publisher,
                             node_error(exc, "open", exc.filename or bundle_dir))


def signature_log_block(result: dict, required: bool) -> dict:
    """The execution log's ``signature`` object for a ``verify_bundle`` result."""
    block = {"required": required, "status": result["status"]}
    for key in ("publisher", "key_id", "digest"):
        if result.get(key) is not None:
            block[key] = result[key]
    return block


def _check_label(value: str, label: str) -> str:
    """A publisher or key id: non-empty, no control characters, no outer spaces.

    Outer whitespace is refused because stored labels are trimmed when read: a
    padded one would never match again.
    """
    if not js_trim(value):
        raise SpellError(f"{label} must not be empty")
    if has_control_chars(value):
        raise SpellError(f"{label} must not contain control characters")
    if js_trim(value) != value:
        raise SpellError(f"{label} must not start or end with whitespace")
    if not _is_utf8(value):
        raise SpellError(f"{label} must be valid UTF-8")
    return value


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates (undecodable bytes from argv)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cmd_sign_keygen(args, io) -> int:
    require("cryptography", "cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    publisher = _check_label(args.publisher, "publisher")
    key_id = _check_label(args.key_id, "key id")
    out_dir = os.path.abspath(args.out_dir)
    base = f"{sanitize(publisher)}__{sanitize(key_id)}"
    private_path = os.path.join(out_dir, base + ".private.pem")
    public_path = os.path.join(out_dir, base + ".public.b64url.txt")
    if len(os.path.basename(public_path).encode("utf-8")) > NAME_MAX:
        raise SpellError("publisher and key id are too long for a key file name")
    if not args.force:
        for path in (private_path, public_path):
            if os.path.lexists(path):
                raise SpellError(
                    f"key file already exists: {path} (use --force to overwrite)")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise SpellError(f"out dir is not a directory: {out_dir}")
    os.makedirs(out_dir, mode=STORE_DIR_MODE, exist_ok=True)

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public_b64 = _spki_base64url(key.public_key())
    write_atomic(private_path, pem, PRIVATE_FILE_MODE)
    write_atomic(public_path, public_b64 + "\n", 0o644)
    io.out(f"publisher: {publisher}")
    io.out(f"key_id: {key_id}")
    io.out(f"private_key: {private_path}")
    io.out(f"public_key_file: {public_path}")
    io.out(f"public_key_base64url: {public_b64}")
    io.out(f"trust_add: spell trust add {publisher} {public_b64} --key-id {key_id}")
    return 0


def load_private_key(path: str):
    """Read an Ed25519 private key file (PKCS#8 PEM, unencrypted)."""
    try:
        pem = _read_regular(path, PRIVATE_KEY_MAX_BYTES, follow_symlinks=True)
    except _Unreadable as exc:
        if exc.kind in ("missing", "os"):
            raise SignatureError(f"private key file not found: {path}") from None
        raise SignatureError(
            f"failed to read private key file {path}: {exc.detail}") from None
    try:
        return _ed25519_private_key(pem)
    except KeyInvalid as exc:
        raise SignatureError(f"failed to parse private key: {exc.message}") from None


def sign_bundle(bundle_dir: str, private_key, publisher: str,
                key_id: str) -> tuple[str, str]:
    """Write ``spell.sig.json`` for a bundle; return (its path, the digest hex)."""
    root = os.path.abspath(bundle_dir)
    digest = bundle_digest(root)
    record = {
        "version": "v1",
        "publisher": publisher,
        "key_id": key_id,
        "algorithm": "ed25519",
        "digest": {"algorithm": "sha256", "value": digest.hex()},
        "signature": b64url_encode(private_key.sign(digest)),
    }
    path = os.path.join(root, SIGNATURE_FILE)
    # Public data that install copies: readable like the bundle's other files.
    write_atomic(path, dump_json(record), 0o644)
    return path, digest.hex()


def cmd_sign_bundle(args, io) -> int:
    key_id = _check_label(args.key_id, "key id")
    root = os.path.abspath(args.local_path)
    manifest = load_manifest(root)
    derived = publisher_from_id(manifest["id"])
    given = js_trim(args.publisher or "")
    publisher = given or derived
    if publisher != derived:
        raise SignatureError(
            f"publisher mismatch: manifest expects '{derived}', got '{publisher}'"
        )
    key = load_private_key(args.private_key)
    path, digest_hex = sign_bundle(root, key, publisher, key_id)
    io.out(f"signed: {path}")
    io.out(f"publisher: {escape_text(publisher)}")
    io.out(f"key_id: {key_id}")
    io.out(f"digest: {digest_hex}")
    return 0


def cmd_verify(args, io) -> int:
    bundle_dir, manifest = resolve_installed(args.id, args.version)
    result = verify_bundle(manifest, bundle_dir)
    try:
        files = bundle_files(bundle_dir)
    except SpellError:
        files = []
    if args.json:
        io.out(spell_runner.dumps_js(dict(result, files=files), indent=2))
    else:
        io.out(f"status: {result['status']}")
        io.out(f"publisher: {escape_text(result['publisher'])}")
        io.out(f"key_id: {escape_text(result.get('key_id', '-'))}")
        io.out(f"digest: {result.get('digest', '-')}")
        io.out("files:" if files else "files: (none readable)")
        for rel in files:
            io.out(f"  {escape_text(rel)}")
    if not result["ok"]:
        raise SignatureError(result["message"])
    return 0


# Trust store #################################################################


class TrustError(SpellError):
    error_code = "INVALID_TRUST_FILE"


#: A base64url SPKI DER Ed25519 key is 59 characters; anything past this is junk.
PUBLIC_KEY_MAX_CHARS = 4096


def trust_file_path(publisher: str) -> str:
    """``<store>/trust/publishers/<base64url(publisher)>.json``."""
    return store_path("trust", "publishers", id_key(publisher) + ".json")


def _validate_trust(raw, publisher: str, path: str) -> dict:
    if not isinstance(raw, dict):
        raise TrustError(f"trust file must be a JSON object: {path}")
    version = _required_text(raw, "version", TrustError)
    if version != "v1":
        raise TrustError(f"unsupported trust file version: {version}")
    file_publisher = _required_text(raw, "publisher", TrustError)
    if file_publisher != publisher:
        raise TrustError(
            f"trust file publisher mismatch: expected '{publisher}', got '{file_publisher}'"
        )
    items = raw.get("keys")
    if not isinstance(items, list) or not items:
        raise TrustError("trust file keys must be a non-empty array")
    keys, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TrustError(f"trust file keys[{i}] must be an object")
        key_id = _required_text(item, "key_id", TrustError)
        algorithm = _required_text(item, "algorithm", TrustError)
        if algorithm != "ed25519":
            raise TrustError(f"unsupported trust key algorithm: {algorithm}")
        public_key = _required_text(item, "public_key", TrustError)
        if not is_base64url(public_key):
            raise TrustError("trust key public_key must be base64url")
        if key_id in seen:
            raise TrustError(f"duplicate trust key_id: {key_id}")
        seen.add(key_id)
        keys.append({"key_id": key_id, "algorithm": algorithm,
                     "public_key": public_key})
    return {"version": version, "publisher": file_publisher, "keys": keys}


def load_trust(publisher: str) -> dict | None:
    """Strictly load the trust file of ``publisher``; ``None`` when it has none.

    A missing or unreadable file means no trust; a file that is there but
    broken (not a regular file, too big, bad JSON, bad fields) is an error.
    """
    path = trust_file_path(publisher)
    try:
        data = _read_regular(path, JSON_FILE_MAX_BYTES)
    except _Unreadable as exc:
        if exc.kind in ("missing", "os"):
            return None
        raise TrustError(f"failed to read trust file {path}: {exc.detail}") from None
    try:
        raw = _parse_json_bytes(data)
    except ValueError:
        raise TrustError(f"failed to parse trust file: {path}") from None
    return _validate_trust(raw, publisher, path)


def trusted_key(trust: dict, key_id: str) -> str | None:
    """The base64url public key stored for ``key_id``, if any."""
    for key in trust["keys"]:
        if key["key_id"] == key_id:
            return key["public_key"]
    return None


def _parse_trust_key_arg(text: str) -> str:
    """Check a ``trust add`` key argument; return the trimmed base64url text."""
    text = js_trim(text)
    if len(text) > PUBLIC_KEY_MAX_CHARS:
        raise SpellError(
            f"invalid public key: longer than {PUBLIC_KEY_MAX_CHARS} characters")
    if not is_base64url(text):
        raise SpellError(
            "invalid public key: must be base64url (A-Z a-z 0-9 - _, no padding)"
        )
    try:
        key = _ed25519_public_key(text)
    except KeyInvalid as exc:
        raise SpellError(f"invalid public key: {exc.message}") from None
    if _spki_base64url(key) != text:
        raise SpellError(
            "invalid public key: not the exact base64url of an SPKI DER key")
    return text


def add_trusted_key(publisher: str, key_id: str, public_key: str) -> None:
    """Add or replace one key of a publisher's trust file (written atomically)."""
    existing = load_trust(publisher)
    keys = [k for k in (existing["keys"] if existing else []) if k["key_id"] != key_id]
    keys.append({"key_id": key_id, "algorithm": "ed25519", "public_key": public_key})
    keys.sort(key=lambda k: locale_key(k["key_id"]))
    folder = store_path("trust", "publishers")
    ensure_dir(folder)
    write_atomic(trust_file_path(publisher),
                 dump_json({"version": "v1", "publisher": publisher, "keys": keys}))


def cmd_trust_add(args, io) -> int:
    publisher = _check_label(args.publisher, "publisher")
    key_id = _check_label(args.key_id, "key id")
    if len(os.path.basename(trust_file_path(publisher)).encode()) > NAME_MAX:
        raise SpellError("publisher is too long to store")
    public_key = _parse_trust_key_arg(args.public_key)
    add_trusted_key(publisher, key_id, public_key)
    io.out(f"trusted publisher={publisher} key_id={key_id}")
    return 0


def _utf16_key(text: str) -> bytes:
    """Sort key for JavaScript's default (UTF-16 code unit) string order."""
    return text.encode("utf-16-be", "surrogatepass")


def _listable_key(item) -> bool:
    """Whether ``trust list`` shows a key entry (lenient reading)."""
    return (isinstance(item, dict)
            and isinstance(item.get("key_id"), str) and bool(js_trim(item["key_id"]))
            and isinstance(item.get("public_key"), str)
            and item.get("algorithm") == "ed25519")


def list_trusted() -> list[tuple[str, list[str]]]:
    """Trusted publishers and their key ids, read leniently (junk is skipped).

    Publishers are in locale order, key ids in code-unit order.
    """
    folder = store_path("trust", "publishers")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            raw = _parse_json_bytes(_read_regular(os.path.join(folder, name),
                                                  JSON_FILE_MAX_BYTES))
        except (_Unreadable, ValueError):
            continue
        if not isinstance(raw, dict) or raw.get("version") != "v1":
            continue
        publisher = raw.get("publisher")
        if not isinstance(publisher, str) or not js_trim(publisher):
            continue
        items = raw.get("keys")
        if not isinstance(items, list):
            continue
        key_ids = [js_trim(item["key_id"]) for item in items if _listable_key(item)]
        if key_ids:
            found.append((js_trim(publisher), sorted(key_ids, key=_utf16_key)))
    found.sort(key=lambda entry: locale_key(entry[0]))
    return found


def cmd_trust_list(args, io) -> int:
    trusted = list_trusted()
    if not trusted:
        io.out("No trusted publishers")
        return 0
    io.out("publisher\tkey_ids")
    for publisher, key_ids in trusted:
        io.out(f"{escape_text(publisher)}\t{escape_text(','.join(key_ids))}")
    return 0


def cmd_trust_remove(args, io) -> int:
    if not _is_utf8(args.publisher):
        raise NotFound(f"trusted publisher not found: {args.publisher}")
    remove_record(
        trust_file_path(args.publisher),
        f"trusted publisher not found: {args.publisher}",
    )
    io.out(f"removed publisher={escape_text(args.publisher)}")
    return 0


# Entitlements and licences ###################################################


class EntitlementError(SpellError):
    error_code = "ENTITLEMENT_INVALID"


class LicenseError(SpellError):
    error_code = "INVALID_LICENSE"


ENTITLEMENT_PREFIX = "ent1"
ENTITLEMENT_MODES = ("upfront", "on_success", "subscription")
#: Claims are eight short fields (a token is about 400 characters); 16 KiB
#: leaves room for long issuer names and refuses junk before decoding it.
ENTITLEMENT_TOKEN_MAX_CHARS = 16 * 1024
_TIMESTAMP_RE = re.compile(
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$"
)
_MS_PER_DAY = 86_400_000


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date; day may overflow."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468 + (day - 1)


def timestamp_ms(text: str) -> int | None:
    """Epoch milliseconds of an entitlement timestamp, or ``None`` if invalid.

    The text must already match the strict ISO-8601 pattern.  Like V8's
    ``Date.parse`` a day up to 31 rolls over into the next month and ``24:00:00``
    means the next midnight; digits past milliseconds are ignored.
    """
    m = _TIMESTAMP_RE.match(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction, zone = m.group(7) or "", m.group(8)
    if not (1 <= month <= 12 and 1 <= day <= 31 and minute <= 59 and second <= 59):
        return None
    if hour > 24 or (hour == 24 and (minute or second or fraction.strip("0"))):
        return None
    offset = 0
    if zone != "Z":
        zone_hours, zone_minutes = int(zone[1:3]), int(zone[4:6])
        if zone_hours > 23 or zone_minutes > 59:
            return None
        offset = (zone_hours * 60 + zone_minutes) * 60_000
        if zone[0] == "-":
            offset = -offset
    millis = int((fraction + "000")[:3])
    time_ms = ((hour * 60 + minute) * 60 + second) * 1000 + millis
    return _days_from_civil(year, month, day) * _MS_PER_DAY + time_ms - offset


def _epoch_ms(now) -> int:
    """``now`` (an aware ``datetime``, or epoch seconds) in epoch milliseconds."""
    import datetime

    if isinstance(now, datetime.datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=datetime.timezone.utc)
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (now - epoch) // datetime.timedelta(milliseconds=1)
    if isinstance(now, (int, float)) and not isinstance(now, bool):
        return int(now * 1000)
    raise TypeError("now must be a datetime or epoch seconds")


def _is_json_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    import math

    try:
        return math.isfinite(value)
    except OverflowError:  # an int too big for a float is Infinity in JSON
        return False


def validate_claims(raw) -> dict:
    """Check entitlement claims in the original's order; return them trimmed."""
    prefix = "invalid entitlement payload: "
    if not isinstance(raw, dict):
        raise EntitlementError(prefix + "expected JSON object")

    def text(key: str) -> str:
        return _required_text(raw, key, EntitlementError, prefix)

    version = text("version")
    if version != "v1":
        raise EntitlementError(f"{prefix}unsupported version '{version}'")
    issuer = text("issuer")
    key_id = text("key_id")
    mode = text("mode")
    if mode not in ENTITLEMENT_MODES:
        raise EntitlementError(f"{prefix}unsupported mode '{mode}'")
    currency = text("currency")
    max_amount = raw.get("max_amount")
    if not _is_json_number(max_amount):
        raise EntitlementError(prefix + "missing 'max_amount' number")
    if not _is_finite(max_amount) or max_amount < 0:
        raise EntitlementError(
            prefix + "max_amount must be a non-negative finite number")
    not_before = text("not_before")
    expires_at = text("expires_at")
    bounds = []
    for key, value in (("not_before", not_before), ("expires_at", expires_at)):
        if not _TIMESTAMP_RE.match(value):
            raise EntitlementError(f"{prefix}'{key}' must be an ISO-8601 timestamp")
        millis = timestamp_ms(value)
        if millis is None:
            raise EntitlementError(f"{prefix}'{key}' is not a valid timestamp")
        bounds.append(millis)
    if bounds[0] > bounds[1]:
        raise EntitlementError(prefix + "not_before must be <= expires_at")
    return {"version": version, "issuer": issuer, "key_id": key_id, "mode": mode,
            "currency": currency, "max_amount": max_amount,
            "not_before": not_before, "expires_at": expires_at}


def parse_entitlement_token(token: str) -> dict:
    """Parse ``ent1.<payload>.<signature>`` without checking its signature.

    Returns ``{"token", "claims", "metadata"}``: the trimmed token, the checked
    claims and ``{"format": "ent1", "payload_base64url", "signature_base64url"}``.
    """
    token = js_trim(token) if isinstance(token, str) else ""
    if not token:
        raise EntitlementError("entitlement token must be non-empty")
    if len(token) > ENTITLEMENT_TOKEN_MAX_CHARS:
        raise EntitlementError(
            f"entitlement token is longer than {ENTITLEMENT_TOKEN_MAX_CHARS} characters"
        )
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != ENTITLEMENT_PREFIX:
        raise EntitlementError(
            "invalid entitlement token format; expected "
            "ent1.<payloadBase64url>.<signatureBase64url>"
        )
    _, payload, signature = parts
    if not payload or not signature:
        raise EntitlementError("invalid entitlement token format; "
                               "payload and signature segments are required")
    if not is_base64url(payload):
        raise EntitlementError("invalid entitlement payload segment: must be base64url")
    if not is_base64url(signature):
        raise EntitlementError(
            "invalid entitlement signature segment: must be base64url")
    try:
        raw = _parse_json_bytes(b64url_decode(payload))
    except ValueError as exc:
        raise EntitlementError(f"invalid entitlement payload JSON: {exc}") from None
    return {
        "token": token,
        "claims": validate_claims(raw),
        "metadata": {"format": ENTITLEMENT_PREFIX, "payload_base64url": payload,
                     "signature_base64url": signature},
    }


def _check_entitlement_signature(parsed: dict) -> None:
    """Verify a parsed token against its issuer's key in the trust store now."""
    claims = parsed["claims"]
    issuer, key_id = claims["issuer"], claims["key_id"]
    trust = load_trust(issuer)
    if trust is None:
        raise EntitlementError(f"entitlement issuer is not trusted: {issuer}")
    public_key = trusted_key(trust, key_id)
    if public_key is None:
        raise EntitlementError(
            f"entitlement key_id is not trusted for issuer '{issuer}': {key_id}"
        )
    try:
        key = _ed25519_public_key(public_key)
    except KeyInvalid as exc:
        raise EntitlementError(f"invalid trusted public key: {exc.message}") from None
    metadata = parsed["metadata"]
    signature = b64url_decode(metadata["signature_base64url"])
    # The signature covers the payload segment's ASCII text, not the decoded JSON.
    payload = metadata["payload_base64url"].encode("ascii")
    if not _ed25519_verify(key, signature, payload):
        raise EntitlementError("entitlement signature verification failed")


def _in_window(claims: dict, now_ms: int) -> bool:
    start, end = timestamp_ms(claims["not_before"]), timestamp_ms(claims["expires_at"])
    return start <= now_ms <= end


def verify_entitlement_token(token: str, now) -> dict:
    """Parse a token, verify its signature with the trust store and its time window.

    ``now`` is an aware ``datetime`` or epoch seconds; the window is inclusive.
    Returns what ``parse_entitlement_token`` returns.
    """
    parsed = parse_entitlement_token(token)
    _check_entitlement_signature(parsed)
    claims, now_ms = parsed["claims"], _epoch_ms(now)
    if now_ms < timestamp_ms(claims["not_before"]):
        raise EntitlementError(
            f"entitlement token not valid yet (not_before={claims['not_before']})"
        )
    if now_ms > timestamp_ms(claims["expires_at"]):
        raise EntitlementError(
            f"entitlement token expired (expires_at={claims['expires_at']})")
    return parsed


def license_path(name: str) -> str:
    """``<store>/licenses/<base64url(name)>.json`` for a trimmed licence name."""
    return store_path("licenses", id_key(name) + ".json")


def _license_name(name: str) -> str:
    trimmed = js_trim(name)
    if not trimmed:
        raise LicenseError("license name must be non-empty")
    if not _is_utf8(trimmed):
        raise LicenseError("license name must be valid UTF-8")
    if len(os.path.basename(license_path(trimmed)).encode()) > NAME_MAX:
        raise LicenseError(
            f"license name is too long: its file name would exceed {NAME_MAX} bytes"
        )
    return trimmed


def _validate_license(raw, path: str, expected_name: str | None, strict: bool) -> dict:
    """Check a licence record; return ``{name, token, created_at?, updated_at?,
    entitlement?}``.  Lenient reading (``strict`` false) makes dates optional."""
    if not isinstance(raw, dict):
        raise LicenseError(f"license file must be a JSON object: {path}")
    version = _required_text(raw, "version", LicenseError)
    if version not in ("v1", "v2"):
        raise LicenseError(f"unsupported license file version: {version}")
    name = _required_text(raw, "name", LicenseError)
    if expected_name is not None and name != expected_name:
        raise LicenseError(
            f"license file name mismatch: expected '{expected_name}', got '{name}'"
        )
    record = {"name": name, "token": _required_text(raw, "token", LicenseError)}
    for key in ("created_at", "updated_at"):
        value = raw.get(key)
        if strict or (isinstance(value, str) and js_trim(value)):
            record[key] = _required_text(raw, key, LicenseError)
    if version == "v1":
        return record
    metadata = raw.get("token_metadata")
    if not isinstance(metadata, dict):
        raise LicenseError(f"license token_metadata must be an object: {path}")
    if metadata.get("format") != ENTITLEMENT_PREFIX:
        raise LicenseError("license token_metadata.format must be 'ent1'")
    for key in ("payload_base64url", "signature_base64url"):
        if not is_base64url(metadata.get(key)):
            raise LicenseError(f"license token_metadata.{key} must be base64url")
    claims = validate_claims(raw.get("entitlement"))
    try:
        parsed = parse_entitlement_token(record["token"])
    except EntitlementError as exc:
        raise LicenseError(f"invalid stored entitlement token: {exc.message}") from None
    segments = parsed["metadata"]
    if (segments["payload_base64url"] != metadata["payload_base64url"]
            or segments["signature_base64url"] != metadata["signature_base64url"]):
        raise LicenseError(
            "stored entitlement token metadata does not match token segments")
    if parsed["claims"] != claims:
        raise LicenseError(
            "stored entitlement claims do not match token payload claims")
    record["entitlement"] = claims
    return record


def _load_license(path: str, expected_name: str | None, strict: bool) -> dict | None:
    try:
        data = _read_regular(path, JSON_FILE_MAX_BYTES)
    except _Unreadable as exc:
        if exc.kind == "missing":
            return None
        raise LicenseError(
            f"failed to read license file {path}: {exc.detail}") from None
    try:
        raw = _parse_json_bytes(data)
    except ValueError:
        raise LicenseError(f"failed to parse license file: {path}") from None
    return _validate_license(raw, path, expected_name, strict)


def list_licenses() -> list[dict]:
    """Stored licences, read leniently and sorted by name (locale order).

    Each is ``{name, token, created_at?, updated_at?, entitlement?}`` (v1
    records have no entitlement).  Broken files are skipped.  Nothing here
    checks signatures: ``find_matching_license`` does.
    """
    folder = store_path("licenses")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in sorted(names):  # sorted: records sharing a name keep one order
        if not name.endswith(".json"):
            continue
        try:
            record = _load_license(os.path.join(folder, name), None, strict=False)
        except SpellError:
            continue
        if record is not None:
            found.append(record)
    found.sort(key=lambda record: locale_key(record["name"]))
    return found


def _still_trusted(record: dict) -> bool:
    """True when the stored token still verifies against the current trust store."""
    try:
        _check_entitlement_signature(parse_entitlement_token(record["token"]))
    except MissingDependency:
        raise
    except SpellError:
        return False
    return True


def find_matching_license(billing: dict, now) -> str | None:
    """The name of the first licence that covers ``billing`` at ``now``, if any.

    Licences are tried in name order.  One matches when its claims' window holds
    ``now`` (inclusive), its mode equals ``billing["mode"]``, its currency equals
    ``billing["currency"]`` (trimmed, case-insensitive), its ``max_amount`` is at
    least ``billing["max_amount"]``, and its token still verifies with the
    issuer's key as trusted now (a hand-written record or a removed key unlocks
    nothing).
    """
    now_ms = _epoch_ms(now)
    currency = js_trim(billing["currency"]).lower()
    for record in list_licenses():
        claims = record.get("entitlement")
        if claims is None or not _in_window(claims, now_ms):
            continue
        if claims["mode"] != billing["mode"]:
            continue
        if js_trim(claims["currency"]).lower() != currency:
            continue
        if not claims["max_amount"] >= billing["max_amount"]:
            continue
        if _still_trusted(record):
            return record["name"]
    return None


def cmd_license_add(args, io) -> int:
    name = _license_name(args.name)
    if not js_trim(args.token):
        raise LicenseError("license token must be non-empty")
    parsed = verify_entitlement_token(args.token, time.time())
    path = license_path(name)
    existing = _load_license(path, name, strict=True)
    now = iso_now()
    record = {
        "version": "v2",
        "name": name,
        "token": parsed["token"],
        "token_metadata": parsed["metadata"],
        "entitlement": parsed["claims"],
        "created_at": existing["created_at"] if existing else now,
        "updated_at": now,
    }
    ensure_dir(store_path("licenses"))
    write_atomic(path, dump_json(record))
    io.out(f"added license={escape_text(name)}")
    return 0


def cmd_license_list(args, io) -> int:
    records = list_licenses()
    if not records:
        io.out("No licenses")
        return 0
    io.out("name\tissuer\tmode\tcurrency\tmax_amount\texpires_at\tupdated_at")
    for record in records:
        claims = record.get("entitlement") or {}
        cells = [record["name"], claims.get("issuer", "-"), claims.get("mode", "-"),
                 claims.get("currency", "-"),
                 js_number(claims["max_amount"]) if claims else "-",
                 claims.get("expires_at", "-"), record.get("updated_at", "-")]
        io.out("\t".join(escape_text(cell) for cell in cells))
    return 0


def cmd_license_remove(args, io) -> int:
    name = js_trim(args.name)
    if not name:
        raise LicenseError("license name must be non-empty")
    if not _is_utf8(name):
        raise NotFound(f"license not found: {args.name}")
    remove_record(license_path(name), f"license not found: {args.name}")
    io.out(f"removed license={escape_text(name)}")
    return 0


# Policy ######################################################################


class PolicyError(SpellError):
    """A policy file that cannot be used; its message starts ``invalid policy:``."""

    error_code = "INVALID_POLICY"

    def __init__(self, detail: str):
        super().__init__(f"invalid policy: {detail}")


POLICY_FILE = "policy.json"
_POLICY_KEYS = ("version", "default", "publishers", "max_risk", "runtime")


def policy_path() -> str:
    """``<store>/policy.json``."""
    return store_path(POLICY_FILE)


def _js_text(value) -> str:
    """``String(value)`` in JavaScript, for JSON values."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return js_number(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join("" if item is None else _js_text(item) for item in value)
    return "[object Object]"


def _policy_list(obj: dict, key: str, label: str) -> list[str]:
    value = obj[key]
    if not isinstance(value, list):
        raise PolicyError(f"{label} must be an array of strings")
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not js_trim(item):
            raise PolicyError(f"{label}[{i}] must be a non-empty string")
        items.append(js_trim(item))
    return items


def _unknown_key(obj: dict, allowed: tuple, where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise PolicyError(f"{where} contains unknown key '{key}'")


def validate_policy(raw) -> dict:
    """Check a parsed policy in the original's order; return it normalised.

    Unknown keys are errors at every level.  Lists come back trimmed.
    """
    if not isinstance(raw, dict):
        raise PolicyError("policy must be a JSON object")
    _unknown_key(raw, _POLICY_KEYS, "policy")
    version = _required_text(raw, "version", PolicyError)
    if version != "v1":
        raise PolicyError(f"unsupported version: {version}")
    default = _required_text(raw, "default", PolicyError)
    if default not in ("allow", "deny"):
        raise PolicyError(f"default must be 'allow' or 'deny', got '{default}'")
    policy = {"version": version, "default": default}
    if "publishers" in raw:
        publishers = raw["publishers"]
        if not isinstance(publishers, dict):
            raise PolicyError("publishers must be an object")
        _unknown_key(publishers, ("allow", "deny"), "publishers")
        policy["publishers"] = {key: _policy_list(publishers, key, f"publishers.{key}")
                                for key in ("allow", "deny") if key in publishers}
    if "max_risk" in raw:
        max_risk = raw["max_risk"]
        if not isinstance(max_risk, str) or max_risk not in RISKS:
            raise PolicyError("max_risk must be one of low|medium|high|critical, "
                              f"got '{_js_text(max_risk)}'")
        policy["max_risk"] = max_risk
    if "runtime" in raw:
        runtime = raw["runtime"]
        if not isinstance(runtime, dict):
            raise PolicyError("runtime must be an object")
        _unknown_key(runtime, ("allow_execution",), "runtime")
        policy["runtime"] = {}
        if "allow_execution" in runtime:
            label = "runtime.allow_execution"
            executions = _policy_list(runtime, "allow_execution", label)
            for i, item in enumerate(executions):
                if item not in EXECUTIONS:
                    raise PolicyError(f"{label}[{i}] must be 'host' or 'docker'")
            policy["runtime"]["allow_execution"] = executions
    return policy


def read_policy_file(path: str, *, missing_ok: bool = True) -> dict | None:
    """Load and validate a policy file; ``None`` when it does not exist.

    A symlink is followed (an administrator may link a managed policy in), but
    a dangling one is an error rather than "no policy".  Not a regular file,
    larger than the cap, not JSON (NaN and Infinity included) or not a valid
    policy: ``PolicyError``.
    """
    try:
        data = _read_regular(path, JSON_FILE_MAX_BYTES, follow_symlinks=True)
    except _Unreadable as exc:
        if exc.kind == "missing" and missing_ok and not os.path.lexists(path):
            return None
        raise PolicyError(f"failed to read {path}: {exc.detail}") from None
    try:
        raw = _parse_json_bytes(data)
    except ValueError as exc:
        raise PolicyError(f"failed to parse JSON: {exc}") from None
    return validate_policy(raw)


def load_policy() -> dict | None:
    """The policy in force (``<store>/policy.json``), or ``None`` when there is none."""
    return read_policy_file(policy_path())


def evaluate_policy(policy: dict | None, publisher: str, risk: str,
                    execution: str) -> str | None:
    """The reason the policy denies a cast, or ``None`` when it allows it.

    Rules in order: denied publisher, publisher outside a present allow list,
    risk above ``max_risk``, execution outside ``runtime.allow_execution``,
    then ``default: deny``.
    """
    if policy is None:
        return None
    publishers = policy.get("publishers") or {}
    if publisher in publishers.get("deny", ()):
        return f"publisher '{publisher}' is denied"
    if "allow" in publishers and publisher not in publishers["allow"]:
        return f"publisher '{publisher}' is not allowed"
    max_risk = policy.get("max_risk")
    if max_risk is not None:
        # An unknown risk ranks above every known one: fail closed.
        rank = RISKS.index(risk) if risk in RISKS else len(RISKS)
        if rank > RISKS.index(max_risk):
            return f"risk '{risk}' exceeds max_risk '{max_risk}'"
    runtime = policy.get("runtime") or {}
    if "allow_execution" in runtime and execution not in runtime["allow_execution"]:
        return f"runtime execution '{execution}' is not allowed"
    if policy["default"] == "deny":
        return "default policy is deny"
    return None


def check_policy(manifest: dict) -> None:
    """Load the policy and raise ``PolicyDenied`` if it refuses this manifest."""
    reason = evaluate_policy(load_policy(), publisher_from_id(manifest["id"]),
                             manifest["risk"], manifest["runtime"]["execution"])
    if reason is not None:
        raise PolicyDenied(f"policy denied: {reason}")


def cmd_policy_show(args, io) -> int:
    path = policy_path()
    policy = read_policy_file(path)
    if policy is None:
        io.out(f"No policy: {path} does not exist, so every spell is allowed")
        return 0
    io.out(spell_runner.dumps_js(policy, indent=2))
    return 0


def cmd_policy_validate(args, io) -> int:
    read_policy_file(args.file, missing_ok=False)
    io.out(f"policy ok: {args.file}")
    return 0


# Cast ########################################################################

#: Runtime limits (spec: SPELL_RUNTIME_*), with the original's defaults.
DEFAULT_INPUT_MAX_BYTES = 65536
DEFAULT_STEP_TIMEOUT_MS = 60_000
#: A ``--input`` file may hold whitespace the compact size does not count;
#: read at most this many times the input limit (and never less than 1 MiB).
INPUT_FILE_FACTOR = 8
#: A schema ``pattern`` can backtrack for ever; validation gets this long.
SCHEMA_VALIDATION_TIMEOUT_S = 5.0

#: Redaction (docs/security.md): keys whose values are masked wholesale.
_SECRET_KEY_RE = re.compile(
    r"authorization|token|secret|password|api[-_]?key|private[-_]?key|cookie|set-cookie",
    re.IGNORECASE,
)
#: Environment variables whose values are masked wherever they appear.
_SECRET_ENV_RE = re.compile(
    r"TOKEN|SECRET|PASSWORD|PRIVATE_KEY|API_KEY|ACCESS_KEY|AUTH|COOKIE|SESSION|CREDENTIAL",
    re.IGNORECASE,
)
#: Desktop session variables match SESSION but hold no secret (docs/compatibility.md).
_BENIGN_ENV_PREFIXES = ("XDG_",)
_BEARER_RE = re.compile(r"(bearer\s+)[^\s\"']+", re.IGNORECASE)
_TOKEN_LIKE_RE = re.compile(
    r"\b(?:ghp_|github_pat_|npm_|sk_live_|sk_test_|xoxb_|xoxp_)[A-Za-z0-9_-]+"
)
REDACTED = "[REDACTED]"
#: Shorter values would mask ordinary words; the original uses the same bound.
SECRET_MIN_LENGTH = 4
#: The API's own credentials never reach a step.
_PRIVATE_ENV = ("SPELL_API_AUTH_KEYS", "SPELL_API_AUTH_TOKENS")

_JS_INT_RE = re.compile(
    r"^[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)$"
    r"|^(?:0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+)$",
    re.ASCII,  # JavaScript's Number() knows no other digits than 0-9
)


class CastError(SpellError):
    """A cast failed; the message is the one the original prints."""

    error_code = "EXECUTION_FAILED"


class Interrupted(SpellError):
    error_code = "INTERRUPTED"


def parse_js_integer(raw: str | None, name: str, minimum: int, default):
    """Parse an integer environment value as JavaScript's ``Number()`` would.

    Unset or blank gives ``default``; ``" 12 "``, ``+5``, ``12.0``, ``1e3`` and
    ``0x10`` are accepted; anything else, or a value under ``minimum``, raises
    ``<NAME> must be an integer >= <minimum>``.
    """
    if raw is None or not js_trim(raw):
        return default
    text = js_trim(raw)
    message = f"{name} must be an integer >= {minimum}"
    if not _JS_INT_RE.match(text):
        raise SpellError(message)
    try:
        if text[:2].lower() in ("0x", "0o", "0b"):
            value = int(text, 0)
        else:
            number = float(text)
            if not number.is_integer():
                raise SpellError(message)
            value = int(number)
    except (ValueError, OverflowError):
        raise SpellError(message) from None
    if value < minimum:
        raise SpellError(message)
    return value


def runtime_limits(env) -> dict:
    """The SPELL_RUNTIME_* limits, all validated before anything runs."""
    input_max = parse_js_integer(
        env.get("SPELL_RUNTIME_INPUT_MAX_BYTES"),
        "SPELL_RUNTIME_INPUT_MAX_BYTES",
        1,
        DEFAULT_INPUT_MAX_BYTES,
    )
    execution = parse_js_integer(
        env.get("SPELL_RUNTIME_EXECUTION_TIMEOUT_MS"),
        "SPELL_RUNTIME_EXECUTION_TIMEOUT_MS",
        0,
        0,
    )
    step = parse_js_integer(
        env.get("SPELL_RUNTIME_STEP_TIMEOUT_MS"),
        "SPELL_RUNTIME_STEP_TIMEOUT_MS",
        1,
        DEFAULT_STEP_TIMEOUT_MS,
    )
    return {
        "input_max_bytes": input_max,
        "execution_timeout_ms": execution or None,
        "step_timeout_ms": step,
    }


def execution_id_for(spell_id: str, version: str, now: float | None = None) -> str:
    """A unique execution id in the original's shape (docs/compatibility.md).

    ``<UTC YYYYMMDDTHHMMSS><milliseconds>Z_<id>_<version>_<4 hex>.json``: the
    milliseconds and the random suffix keep two casts apart even within one
    millisecond; the log file is also created exclusively.
    """
    now = time.time() if now is None else now
    stamp = (
        time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        + f"{int(now * 1000) % 1000:03d}Z"
    )
    return (
        f"{stamp}_{sanitize(spell_id)}_{sanitize(version)}_{random_hex(2)}.json"
    )


# Input ---------------------------------------------------------------------


def _read_input_file(path: str, limit: int):
    absolute = os.path.abspath(path)
    try:
        value = read_json_file(
            absolute, "--input file", limit=max(limit * INPUT_FILE_FACTOR, 1024 * 1024)
        )
    except OSError as exc:
        raise CastError(node_error(exc, "open", absolute)) from None
    except ValueError as exc:
        raise CastError(str(exc)) from None
    if not isinstance(value, dict):
        raise CastError("--input must be a JSON object")
    return dict(value)


def _param_value(raw: str):
    if not js_trim(raw):
        return ""
    try:
        return parse_json_text(js_trim(raw))
    except (ValueError, RecursionError):
        return raw


def build_input(base: dict, params: list[str]) -> dict:
    """Merge ``-p key=value`` pairs into ``base`` as the original does.

    Values are JSON-typed when they parse, dotted keys nest, and a missing or
    non-object intermediate becomes ``{}``.
    """
    merged = dict(base)
    for pair in params:
        key, sep, raw = pair.partition("=")
        if not sep or not key or not js_trim(key):
            raise CastError(f"invalid -p argument: {pair}")
        segments = [part for part in js_trim(key).split(".") if part]
        if not segments:
            raise CastError("invalid -p key: empty key")
        if len(segments) > JSON_MAX_DEPTH:
            # The same bound as any JSON spell reads: deeper input is refused.
            raise CastError(f"invalid -p key: more than {JSON_MAX_DEPTH} levels")
        node = merged
        for part in segments[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            else:
                child = dict(child)
                node[part] = child
            node = child
        node[segments[-1]] = _param_value(raw)
    return merged


# Schema validation -------------------------------------------------------------

_DRAFT7_IDS = (
    "http://json-schema.org/draft-07/schema",
    "https://json-schema.org/draft-07/schema",
)


def _pointer(path) -> str:
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else "/"


def _ajv_messages(error) -> list[str]:
    """Word a jsonschema error the way Ajv does (the original's validator).

    A list, because Ajv reports some failures once per offending member (one
    ``must NOT have additional properties`` per extra key) where jsonschema
    reports one error.
    """
    kind, value, parent = error.validator, error.validator_value, error.schema
    if kind == "required" and isinstance(value, list):
        # jsonschema words it "<repr(name)> is a required property", one per name.
        missing = [n for n in value if error.message == f"{n!r} is a required property"]
        return [f"must have required property '{missing[0] if missing else value}'"]
    if kind == "additionalProperties":
        return ["must NOT have additional properties"] * max(
            1, _count_additional(error)
        )
    if kind in ("dependencies", "dependentRequired") and isinstance(value, dict):
        for prop, deps in value.items():
            if isinstance(deps, list) and error.message.endswith(
                f" is a dependency of {prop!r}"
            ):
                noun = "property" if len(deps) == 1 else "properties"
                return [
                    f"must have {noun} {', '.join(map(str, deps))} when property "
                    f"{prop} is present"
                ]
    if (
        kind in ("additionalItems", "items")
        and value is False
        and isinstance(parent, dict)
    ):
        tuple_items = parent.get(
            "items" if kind == "additionalItems" else "prefixItems"
        )
        limit = len(tuple_items) if isinstance(tuple_items, list) else 0
        return [f"must NOT have more than {limit} items"]
    simple = {
        "enum": "must be equal to one of the allowed values",
        "const": "must be equal to constant",
        "uniqueItems": "must NOT have duplicate items",
        "anyOf": "must match a schema in anyOf",
        "oneOf": "must match exactly one schema in oneOf",
        "not": "must NOT be valid",
        "unevaluatedProperties": "must NOT have unevaluated properties",
        "contains": "must contain at least 1 valid item(s)",
        None: "boolean schema is false",
    }
    if kind in simple:
        return [simple[kind]]
    if kind == "type":
        return [
            "must be " + (",".join(value) if isinstance(value, list) else str(value))
        ]
    bounds = {
        "minimum": ">=",
        "maximum": "<=",
        "exclusiveMinimum": ">",
        "exclusiveMaximum": "<",
    }
    if kind in bounds:
        return [f"must be {bounds[kind]} {js_number(value)}"]
    counted = {
        "minLength": ("fewer", "characters"),
        "maxLength": ("more", "characters"),
        "minItems": ("fewer", "items"),
        "maxItems": ("more", "items"),
        "minProperties": ("fewer", "properties"),
        "maxProperties": ("more", "properties"),
    }
    if kind in counted:
        word, unit = counted[kind]
        return [f"must NOT have {word} than {js_number(value)} {unit}"]
    if kind == "pattern":
        return [f'must match pattern "{value}"']
    if kind == "multipleOf":
        return [f"must be multiple of {js_number(value)}"]
    return [error.message]


def _count_additional(error) -> int:
    """How many keys an ``additionalProperties: false`` error is about."""
    instance, parent = error.instance, error.schema
    if not isinstance(instance, dict) or not isinstance(parent, dict):
        return 1
    properties = (
        parent.get("properties") if isinstance(parent.get("properties"), dict) else {}
    )
    patterns = parent.get("patternProperties")
    patterns = list(patterns) if isinstance(patterns, dict) else []
    return sum(
        1
        for key in instance
        if key not in properties and not any(re.search(p, key) for p in patterns)
    )


# The common subset, checked without jsonschema ---------------------------------
#
# Importing jsonschema costs more than the rest of a cast's start-up together,
# and most input schemas use a handful of keywords. A schema made only of
# those (and well formed) is checked here, with jsonschema's semantics, error
# order and paths; anything else goes to jsonschema. tests/test_cast.py
# compares the two on random schemas.

_FAST_DIALECTS = ("https://json-schema.org/draft/2020-12/schema", *_DRAFT7_IDS)
_FAST_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
_FAST_BOUNDS = {
    "minimum": ">=",
    "maximum": "<=",
    "exclusiveMinimum": ">",
    "exclusiveMaximum": "<",
}
_FAST_COUNTS = {
    "minLength": ("string", "fewer", "characters"),
    "maxLength": ("string", "more", "characters"),
    "minItems": ("array", "fewer", "items"),
    "maxItems": ("array", "more", "items"),
    "minProperties": ("object", "fewer", "properties"),
    "maxProperties": ("object", "more", "properties"),
}
_FAST_TEXT = ("title", "description", "$comment", "format")
_FAST_FLAGS = ("readOnly", "writeOnly", "deprecated")


def _is_type(value, kind: str) -> bool:
    """jsonschema's type test (booleans are not numbers; 1.0 is an integer)."""
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return kind == "number" or isinstance(value, int) or value.is_integer()
    return {
        "string": str,
        "object": dict,
        "array": list,
        "boolean": bool,
        "null": type(None),
    }[kind] is type(value)


def _json_equal(one, two) -> bool:
    """Equality as JSON Schema means it: ``true`` is not ``1``, ``1`` is ``1.0``."""
    if isinstance(one, str) or isinstance(two, str):
        return one == two
    if isinstance(one, list) and isinstance(two, list):
        return len(one) == len(two) and all(map(_json_equal, one, two))
    if isinstance(one, dict) and isinstance(two, dict):
        return one.keys() == two.keys() and all(
            _json_equal(one[k], two[k]) for k in one
        )
    if isinstance(one, bool) or isinstance(two, bool):
        return type(one) is type(two) and one == two
    return (
        type(one) not in (list, dict) and type(two) not in (list, dict) and one == two
    )


def _fast_schema(schema, root: bool) -> bool:
    """True when ``schema`` is a well-formed schema of the common subset."""
    if not isinstance(schema, dict):
        return False
    for key, value in schema.items():
        if key == "$schema":
            if (
                not root
                or not isinstance(value, str)
                or value.rstrip("#") not in [d.rstrip("#") for d in _FAST_DIALECTS]
            ):
                return False
        elif key in _FAST_TEXT:
            if not isinstance(value, str):
                return False
        elif key in _FAST_FLAGS:
            if not isinstance(value, bool):
                return False
        elif key == "examples":
            if not isinstance(value, list):
                return False
        elif key in ("default", "const"):
            pass
        elif key == "type":
            kinds = value if isinstance(value, list) else [value]
            if (
                not kinds
                or any(k not in _FAST_TYPES for k in kinds)
                or len(set(kinds)) != len(kinds)
            ):
                return False
        elif key == "required":
            if (
                not isinstance(value, list)
                or not all(isinstance(v, str) for v in value)
                or len(set(value)) != len(value)
            ):
                return False
        elif key == "enum":
            if not isinstance(value, list):
                return False
        elif key in _FAST_BOUNDS:
            if not _is_type(value, "number"):
                return False
        elif key in _FAST_COUNTS:
            if not _is_type(value, "integer") or value < 0:
                return False
        elif key == "pattern":
            try:
                re.compile(value)
            except (re.error, TypeError):
                return False
        elif key == "properties":
            if not isinstance(value, dict) or not all(
                _fast_schema(v, False) for v in value.values()
            ):
                return False
        elif key == "additionalProperties":
            if not isinstance(value, bool) and not _fast_schema(value, False):
                return False
        elif key == "items":
            if not _fast_schema(value, False):
                return False
        else:
            return False
    return True


def _fast_errors(schema: dict, value, path: tuple = ()) -> list[str]:
    """Errors of ``value`` against a ``_fast_schema`` schema, in jsonschema order."""
    errors: list[str] = []
    where = _pointer(path)
    is_object, is_array = isinstance(value, dict), isinstance(value, list)
    for key, rule in schema.items():
        if key == "type":
            kinds = rule if isinstance(rule, list) else [rule]
            if not any(_is_type(value, k) for k in kinds):
                errors.append(f"{where} must be {','.join(kinds)}")
        elif key == "required" and is_object:
            errors += [
                f"{where} must have required property '{name}'"
                for name in rule
                if name not in value
            ]
        elif key == "properties" and is_object:
            for name, sub in rule.items():
                if name in value:
                    errors += _fast_errors(sub, value[name], path + (name,))
        elif key == "additionalProperties" and is_object:
            known = schema.get("properties", {})
            extras = [name for name in value if name not in known]
            if isinstance(rule, dict):
                for name in extras:
                    errors += _fast_errors(rule, value[name], path + (name,))
            elif rule is False:
                errors += [f"{where} must NOT have additional properties"] * len(extras)
        elif key == "items" and is_array:
            for index, item in enumerate(value):
                errors += _fast_errors(rule, item, path + (index,))
        elif key == "enum":
            if not any(_json_equal(value, option) for option in rule):
                errors.append(f"{where} must be equal to one of the allowed values")
        elif key == "const":
            if not _json_equal(value, rule):
                errors.append(f"{where} must be equal to constant")
        elif key in _FAST_BOUNDS and _is_type(value, "number"):
            failed = {
                "minimum": value < rule,
                "maximum": value > rule,
                "exclusiveMinimum": value <= rule,
                "exclusiveMaximum": value >= rule,
            }[key]
            if failed:
                errors.append(f"{where} must be {_FAST_BOUNDS[key]} {js_number(rule)}")
        elif key in _FAST_COUNTS:
            kind, word, unit = _FAST_COUNTS[key]
            if _is_type(value, kind):
                too_few = key.startswith("min")
                if (len(value) < rule) if too_few else (len(value) > rule):
                    errors.append(
                        f"{where} must NOT have {word} than {js_number(rule)} {unit}"
                    )
        elif key == "pattern" and isinstance(value, str):
            if not re.search(rule, value):
                errors.append(f'{where} must match pattern "{rule}"')
    return errors


def _schema_validator(schema: dict):
    jsonschema = require("jsonschema", "jsonschema")
    referencing = require("referencing", "jsonschema")
    declared = schema.get("$schema")
    if isinstance(declared, str) and declared.rstrip("#") in _DRAFT7_IDS:
        cls = jsonschema.Draft7Validator
    else:
        cls = jsonschema.Draft202012Validator

    def refuse(uri: str):
        # Remote and file: references are never fetched (docs/security.md).
        raise referencing.exceptions.NoSuchResource(ref=uri)

    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = _pointer(exc.absolute_path)
        raise CastError(
            f"schema is invalid: data{where if where != '/' else ''} {exc.message}"
        )
    registry = referencing.Registry(retrieve=refuse)
    return cls(schema, registry=registry)


def _schema_errors(schema: dict, value) -> list[str]:
    if _fast_schema(schema, True):
        return _fast_errors(schema, value)
    validator = _schema_validator(schema)
    try:
        return [
            f"{_pointer(e.absolute_path)} {message}"
            for e in validator.iter_errors(value)
            for message in _ajv_messages(e)
        ]
    except Exception as exc:  # unresolvable $ref and friends come from the library
        if isinstance(exc, SpellError):
            raise
        raise CastError(f"schema is invalid: {' '.join(str(exc).split())}") from None


def _has_pattern(schema) -> bool:
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "pattern" in item or "patternProperties" in item:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def validate_input(schema, value) -> None:
    """Validate the merged input; raise ``input does not match schema: ...``.

    Schemas with regular expressions are checked in a forked child that is
    killed after ``SCHEMA_VALIDATION_TIMEOUT_S``, so a pattern built for
    catastrophic backtracking cannot hang a cast.
    """
    if not isinstance(schema, dict):
        raise CastError("schema.json must be a JSON object")
    if _has_pattern(schema) and hasattr(os, "fork"):
        errors = _run_bounded(
            lambda: _schema_errors(schema, value), SCHEMA_VALIDATION_TIMEOUT_S
        )
    else:
        errors = _schema_errors(schema, value)
    if errors:
        raise CastError("input does not match schema: " + "; ".join(errors))


def _run_bounded(func, timeout_s: float):
    """Run ``func`` in a forked child; return its JSON result or raise."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        try:
            payload = {"ok": func()}
        except SpellError as exc:
            payload = {"error": exc.message}
        except BaseException as exc:
            payload = {"error": f"schema validation failed: {exc}"}
        data = json.dumps(payload).encode()
        with os.fdopen(write_fd, "wb") as handle:
            handle.write(data)
        os._exit(0)
    os.close(write_fd)
    try:
        return _await_bounded(pid, read_fd, timeout_s)
    except BaseException:
        # Interrupted (SIGTERM, Ctrl-C) or failed: the validator must not outlive
        # the cast, nor keep its stdout and stderr open.
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise


def _await_bounded(pid: int, read_fd: int, timeout_s: float):
    import selectors

    chunks, deadline = [], time.monotonic() + timeout_s
    with (
        os.fdopen(read_fd, "rb", buffering=0) as handle,
        selectors.DefaultSelector() as selector,
    ):
        selector.register(handle, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise CastError(
                    f"input does not match schema: validation took longer than "
                    f"{int(timeout_s * 1000)}ms (a pattern may backtrack catastrophically)"
                )
            chunk = handle.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    payload = json.loads(b"".join(chunks) or b'{"error": "schema validation crashed"}')
    if "error" in payload:
        raise CastError(payload["error"])
    return payload["ok"]


# Guards --------------------------------------------------------------------

_ARCH_NAMES = {
    "x86_64": "x64",
    "amd64": "x64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "ia32",
    "i686": "ia32",
    "x86": "ia32",
    "ppc64le": "ppc64",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "loongarch64": "loong64",
}


def host_platform() -> str:
    """``<os>/<arch>`` in Node's names, e.g. ``linux/x64``."""
    plat = sys.platform
    if plat.startswith("linux"):
        name = "linux"
    elif plat in ("win32", "cygwin"):
        name = "win32"
    else:
        name = re.sub(r"\d+$", "", plat)
    machine = os.uname().machine if hasattr(os, "uname") else "x64"
    return f"{name}/{_ARCH_NAMES.get(machine.lower(), machine.lower())}"


def _platform_aliases(target: str) -> set[str]:
    if "/" not in target:
        return {target}
    system, arch = target.split("/", 1)
    normalised = "amd64" if arch == "x64" else arch
    aliases = {f"{system}/{arch}", f"{system}/{normalised}"}
    if arch == "amd64":
        aliases.add(f"{system}/x64")
    if arch == "x64":
        aliases.add(f"{system}/amd64")
    return aliases


def check_platform(runtime: dict) -> None:
    host = host_platform()
    if runtime["execution"] == "docker":
        arch = host.split("/", 1)[1]
        target = "linux/" + ("amd64" if arch == "x64" else arch)
    else:
        target = host
    if not _platform_aliases(target) & set(runtime["platforms"]):
        raise CastError(
            f"platform mismatch: host={host}, runtime={runtime['execution']}, "
            f"target={target}, spell supports={','.join(runtime['platforms'])}"
        )


def connector_env_name(connector: str) -> str:
    """``git-hub`` → ``CONNECTOR_GIT_HUB_TOKEN`` (full Unicode upper-casing)."""
    return "CONNECTOR_" + re.sub(r"[^A-Z0-9]", "_", connector.upper()) + "_TOKEN"


def check_connector_tokens(permissions: list, env) -> None:
    for permission in permissions:
        name = connector_env_name(permission["connector"])
        if not env.get(name):
            raise CastError(f"missing connector token {name}")


# Summary -------------------------------------------------------------------


def execution_summary(manifest: dict) -> str:
    """The summary block printed before execution, manifest strings escaped."""
    e = escape_text
    lines = [
        "=== Execution Summary ===",
        f"id@version: {e(manifest['id'])}@{e(manifest['version'])}",
        f"risk: {manifest['risk']}",
        "effects:",
    ]
    lines += [
        f"  - type={e(x['type'])}, target={e(x['target'])}, "
        f"mutates={'true' if x['mutates'] else 'false'}"
        for x in manifest["effects"]
    ] or ["  - none"]
    lines.append("permissions:")
    lines += [
        f"  - connector={e(p['connector'])}, scopes={e(','.join(p['scopes']))}"
        for p in manifest["permissions"]
    ] or ["  - none"]
    billing, runtime = manifest["billing"], manifest["runtime"]
    lines.append(
        f"billing: enabled={'true' if billing['enabled'] else 'false'}, "
        f"mode={e(billing['mode'])}, max_amount={js_number(billing['max_amount'])}, "
        f"currency={e(billing['currency'])}"
    )
    lines.append(
        f"runtime: execution={runtime['execution']}, "
        f"docker_image={e(runtime.get('docker_image', '-'))}"
    )
    return "\n".join(lines)


# Redaction -----------------------------------------------------------------


def secret_values(env, input_obj=None) -> list[str]:
    """Values to mask everywhere: secret env values and secret-keyed inputs.

    Longest first, so a secret that contains another is masked whole.
    """
    found = set()
    for name, value in env.items():
        if (
            _SECRET_ENV_RE.search(name)
            and not name.startswith(_BENIGN_ENV_PREFIXES)
            and js_trim(value)
        ):
            found.add(value)
    stack = [(None, input_obj)] if input_obj is not None else []
    while stack:
        key, item = stack.pop()
        secret_key = key is not None and _SECRET_KEY_RE.search(str(key))
        if isinstance(item, dict):
            stack.extend((k if not secret_key else key, v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((key, v) for v in item)
        elif secret_key and isinstance(item, str) and js_trim(item):
            found.add(item)
        elif secret_key and _is_number(item):
            found.add(spell_runner.dumps_js(item))  # as a step would print it
    return sorted(
        (v for v in found if len(v) >= SECRET_MIN_LENGTH), key=len, reverse=True
    )


def redact_text(text: str, secrets_list: list[str]) -> str:
    for value in secrets_list:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _BEARER_RE.sub(lambda m: m.group(1) + REDACTED, text)
    return _TOKEN_LIKE_RE.sub(REDACTED, text)


def redact(value, secrets_list: list[str]):
    """A redacted copy: secret-named keys masked whole, secrets masked in text."""
    if isinstance(value, dict):
        return {
            k: REDACTED if _SECRET_KEY_RE.search(str(k)) else redact(v, secrets_list)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, secrets_list) for v in value]
    if isinstance(value, str):
        return redact_text(value, secrets_list)
    return value


# The cast ------------------------------------------------------------------


def _new_log(execution_id: str, started_at: str, spell_id: str, version: str) -> dict:
    return {
        "execution_id": execution_id,
        "started_at": started_at,
        "finished_at": started_at,
        "id": spell_id,
        "version": version,
        "input": {},
        "summary": {
            "risk": "low",
            "billing": {
                "enabled": False,
                "mode": "none",
                "currency": "USD",
                "max_amount": 0,
            },
            "runtime": {"execution": "host", "platforms": []},
            "license": {"licensed": False},
        },
        "steps": [],
        "outputs": {},
        "checks": [],
        "success": False,
    }


def write_log(log: dict, secrets_list: list[str]) -> str:
    """Write the redacted log under a name no other cast has taken; return its path.

    The file is written beside its final name and hard-linked into place, so
    it appears whole and never replaces another cast's log.
    """
    ensure_store_dirs()
    logs = store_path("logs")
    tmp = os.path.join(logs, f".{random_hex(8)}.tmp")
    try:
        while True:
            data = dump_json(redact(log, secrets_list)).encode("utf-8")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            path = os.path.join(logs, log["execution_id"])
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                # Taken (vanishingly rare with the random suffix): draw another.
                log["execution_id"] = (
                    log["execution_id"][:-9] + f"{random_hex(2)}.json"
                )
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _cast_options(args) -> dict:
    return {
        "id": args.id,
        "version": args.version,
        "params": list(args.param or []),
        "input_file": args.input,
        "dry_run": args.dry_run,
        "yes": args.yes,
        "allow_billing": args.allow_billing,
        "require_signature": args.require_signature,
        "allow_unsigned": args.allow_unsigned,
        "verbose": args.verbose,
        "profile": args.profile,
    }


def cast(opts: dict, io) -> dict:
    """Cast one spell, as ``spell cast`` does; never raises for cast failures.

    Prints the summary and the ``execution_id:``/``log:`` lines to ``io.stdout``
    on success and the error line to ``io.stderr`` on failure, always writes
    the log, and returns ``{ok, execution_id, log_path, error, error_code}``.
    ``opts`` holds the CLI options by name (``input`` may carry an object
    instead of ``input_file``).
    """
    env = io.env
    started_at = iso_now()
    requested_version = opts.get("version")
    log = _new_log(
        execution_id_for(opts["id"], requested_version or "latest"),
        started_at,
        opts["id"],
        requested_version or "latest",
    )
    secrets_list = secret_values(env)
    outcome = {
        "ok": False,
        "execution_id": None,
        "log_path": None,
        "error": None,
        "error_code": None,
    }
    guard = _SigtermGuard()
    try:
        return _cast_and_log(opts, io, log, env, secrets_list, outcome, guard)
    finally:
        guard.release()


def _cast_and_log(opts, io, log, env, secrets_list, outcome, guard) -> dict:
    """Run the pipeline, then write the log and report, success or failure."""
    try:
        try:
            _cast_pipeline(opts, io, log, env, secrets_list)
        finally:
            guard.defer()  # only the execution is interruptible: logs are whole
        log["success"] = True
        log["finished_at"] = iso_now()
        secrets_list = secret_values(env, log.get("input"))
        path = write_log(log, secrets_list)
        outcome.update(ok=True, execution_id=log["execution_id"], log_path=path)
        io.out(f"execution_id: {log['execution_id']}")
        io.out(f"log: {path}")
        return outcome
    except (SpellError, OSError) as exc:
        message = exc.message if isinstance(exc, SpellError) else str(exc)
        code = exc.error_code if isinstance(exc, SpellError) else "EXECUTION_FAILED"
    except KeyboardInterrupt:
        message, code = "cast interrupted", "INTERRUPTED"
    except Exception as exc:  # a bug: keep the attempt's log, then let main() report it
        log["finished_at"] = iso_now()
        log["error"] = f"internal error: {type(exc).__name__}: {exc}"
        try:
            write_log(log, secret_values(env, log.get("input")))
        except OSError:
            pass
        raise
    secrets_list = secret_values(env, log.get("input"))
    log["finished_at"] = iso_now()
    log["error"] = message
    outcome.update(
        error=redact_text(message, secrets_list),
        error_code=code,
        execution_id=log["execution_id"],
    )
    try:
        outcome["log_path"] = write_log(log, secrets_list)
    except OSError as exc:
        io.warn(f"could not write the execution log: {exc}")
    io.err(escape_text(outcome["error"]))
    return outcome


class _SigtermGuard:
    """SIGTERM during a cast: stop the steps, but never cut the log short.

    While the steps run, SIGTERM raises ``KeyboardInterrupt`` so the engine
    kills what they started.  Once they are done (``defer``) a SIGTERM is only
    noted, and ``release`` delivers it after the log is written.
    """

    def __init__(self):
        import signal
        import threading

        self._signal = signal
        self._active = threading.current_thread() is threading.main_thread()
        self._deferred = False
        self._pending = False
        if self._active:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self._deferred:
            self._pending = True
        else:
            raise KeyboardInterrupt

    def defer(self) -> None:
        self._deferred = True

    def release(self) -> None:
        if not self._active:
            return
        self._active = False
        self._signal.signal(self._signal.SIGTERM, self._previous)
        if self._pending:
            self._signal.raise_signal(self._signal.SIGTERM)


def _cast_pipeline(opts: dict, io, log: dict, env, secrets_list: list) -> None:
    limits = runtime_limits(env)
    bundle_dir, manifest = resolve_installed(opts["id"], opts.get("version"))
    log["execution_id"] = execution_id_for(manifest["id"], manifest["version"])
    log["id"], log["version"] = manifest["id"], manifest["version"]
    log["summary"] = {
        "risk": manifest["risk"],
        "billing": manifest["billing"],
        "runtime": manifest["runtime"],
        "license": {"licensed": False},
    }

    publisher = publisher_from_id(manifest["id"])
    policy = load_policy()
    reason = policy and evaluate_policy(
        policy, publisher, manifest["risk"], manifest["runtime"]["execution"]
    )
    if reason:
        raise PolicyDenied(f"policy denied: {reason}")

    required = not opts.get("allow_unsigned")
    log["signature"] = {"required": required, "status": "skipped"}
    if opts.get("input") is not None:
        base = dict(opts["input"])
    elif opts.get("input_file"):
        base = _read_input_file(opts["input_file"], limits["input_max_bytes"])
    else:
        base = {}
    merged = build_input(base, opts.get("params") or [])
    size = len(spell_runner.dumps_js(merged).encode("utf-8"))
    if size > limits["input_max_bytes"]:
        raise CastError(
            f"merged input is {size} bytes, exceeds "
            f"SPELL_RUNTIME_INPUT_MAX_BYTES={limits['input_max_bytes']}"
        )
    log["input"] = merged
    validate_input(load_schema(bundle_dir, manifest), merged)

    result = verify_bundle(manifest, bundle_dir)  # reports problems as "invalid"
    log["signature"] = signature_log_block(result, required)
    if required and not result["ok"]:
        raise SignatureError(f"signature required: {result['message']}")

    check_platform(manifest["runtime"])
    if manifest["risk"] in ("high", "critical") and not opts.get("yes"):
        raise CastError(f"risk {manifest['risk']} requires --yes")
    billing = manifest["billing"]
    if billing["enabled"]:
        if not opts.get("allow_billing"):
            raise CastError("billing enabled requires --allow-billing")
        name = find_matching_license(billing, time.time())
        if name is None:
            raise CastError("billing enabled requires matching entitlement token")
        log["summary"]["license"] = {"licensed": True, "name": name}
    check_connector_tokens(manifest["permissions"], env)
    docker = None
    if manifest["runtime"]["execution"] == "docker":
        docker = docker_settings(env, manifest["runtime"]["docker_image"])

    io.out(execution_summary(manifest))
    if opts.get("dry_run"):
        return
    if docker is not None:
        result = run_in_docker(
            manifest,
            bundle_dir,
            merged,
            limits,
            docker,
            env,
            io,
            verbose=bool(opts.get("verbose")),
        )
    else:
        result = _run_on_host(
            manifest,
            bundle_dir,
            merged,
            limits,
            env,
            io,
            verbose=bool(opts.get("verbose")),
        )
    log["steps"] = result.get("stepResults", [])
    log["outputs"] = result.get("outputs", {})
    log["checks"] = result.get("checks", [])
    if not result.get("success"):
        raise CastError(result.get("error") or "cast failed")


def step_environment(env) -> dict:
    """What a host step sees: the environment minus the API's own credentials."""
    return {k: v for k, v in env.items() if k not in _PRIVATE_ENV}


def _progress_printer(io, secrets_list: list):
    """``--verbose``: each step's start and end, and its output, on stderr."""

    def on_event(event: dict) -> None:
        kind = event.get("event")
        step = escape_text(str(event.get("step", "")))
        if kind == "step_start":
            io.err(f"[spell] step {step} ({event.get('uses')}) started")
        elif kind == "step_end":
            state = "ok" if event.get("success") else "failed"
            io.err(f"[spell] step {step} {state} in {event.get('duration_ms')}ms")
        elif kind == "output":
            text = redact_text(str(event.get("text", "")), secrets_list)
            for line in text.splitlines():
                io.err(f"[{step}:{event.get('stream')}] {escape_text(line)}")

    return on_event


def _run_on_host(
    manifest: dict,
    bundle_dir: str,
    merged: dict,
    limits: dict,
    env,
    io,
    *,
    verbose: bool,
) -> dict:
    import tempfile

    workdir = tempfile.mkdtemp(prefix="spell-input-")  # 0700
    try:
        input_path = os.path.join(workdir, "input.json")
        fd = os.open(
            input_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE
        )
        with os.fdopen(fd, "wb") as handle:
            handle.write(spell_runner.dumps_js(merged).encode("utf-8"))
        plan = {
            "bundle_dir": bundle_dir,
            "steps": manifest["steps"],
            "checks": manifest["checks"],
            "input": merged,
            "input_path": input_path,
            "env": step_environment(env),
            "step_timeout_ms": limits["step_timeout_ms"],
            "execution_timeout_ms": limits["execution_timeout_ms"],
            # Masked by the runner before it cuts heads and output, so a cut
            # never leaves the first characters of a secret in the log.
            "redact": secret_values(env, merged),
        }
        on_event = (
            _progress_printer(io, secret_values(env, merged)) if verbose else None
        )
        if verbose:
            io.err(f"[spell] starting host execution of {escape_text(manifest['id'])}")
        return spell_runner.run_plan(plan, on_event=on_event)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def cmd_cast(args, io) -> int:
    return 0 if cast(_cast_options(args), io)["ok"] else 1


# Docker ######################################################################

#: Where the read-only bundle, the runner's input and the working copy live.
CONTAINER_BUNDLE = "/spell"
CONTAINER_INPUT_DIR = "/tmp/spell-input"
CONTAINER_WORKDIR = "/spell-work"
#: The working copy's tmpfs allows exec (steps run from it); /tmp stays noexec.
#: It is owned by the container user (docker ignores a tmpfs ``mode=``).
WORKDIR_TMPFS = "rw,exec,nosuid,nodev,size=64m"
TMP_TMPFS = "rw,noexec,nosuid,size=64m"
DEFAULT_DOCKER_USER = "65532:65532"
DEFAULT_PIDS_LIMIT = 256
#: After the execution deadline the runner reports itself; the container is
#: killed if it has not finished this much later.
DOCKER_KILL_GRACE_S = 1.0
#: Execution timeouts beyond this (about three years) are no deadline at all.
DOCKER_TIMER_MAX_S = 1e8
#: Bound for the ``docker rm -f`` that cleans up.
DOCKER_CLEANUP_TIMEOUT_S = 20
#: Exit codes of spell-runner itself (success, spell failure); docker uses others.
RUNNER_EXIT_CODES = (0, 1)
#: The runner prints one JSON line of capped outputs; more is not read.
DOCKER_OUTPUT_MAX_BYTES = 64 * 1024 * 1024
_MEMORY_RE = re.compile(r"^[0-9]+[bkmg]?$", re.IGNORECASE)
#: A decimal number as JavaScript's Number() reads it (hex and friends are
#: refused: docker could not read them either).
_DECIMAL_RE = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
_IMAGE_BAD_RE = re.compile(r"[\s\x00-\x1f\x7f]")


class DockerError(CastError):
    error_code = "DOCKER_FAILED"


def docker_settings(env, image: str) -> dict:
    """Validate the SPELL_DOCKER_* overrides and the image, before the summary.

    Order and messages are the original's: network, user, read-only, pids,
    memory, cpus.
    """
    if image.startswith("-") or _IMAGE_BAD_RE.search(image):
        raise DockerError(f"invalid docker image name: {image}")
    network = js_trim(env.get("SPELL_DOCKER_NETWORK", "")) or "none"
    if network not in ("none", "bridge", "host"):
        raise DockerError("SPELL_DOCKER_NETWORK must be one of: none, bridge, host")
    raw_user = env.get("SPELL_DOCKER_USER")
    user = DEFAULT_DOCKER_USER if raw_user is None else js_trim(raw_user)
    if re.search(r"\s", user):
        raise DockerError("SPELL_DOCKER_USER must not contain whitespace")
    read_only = js_trim(env.get("SPELL_DOCKER_READ_ONLY", "")) or "1"
    if read_only not in ("0", "1"):
        raise DockerError("SPELL_DOCKER_READ_ONLY must be '1' or '0'")
    pids = parse_js_integer(
        env.get("SPELL_DOCKER_PIDS_LIMIT"),
        "SPELL_DOCKER_PIDS_LIMIT",
        0,
        DEFAULT_PIDS_LIMIT,
    )
    memory = js_trim(env.get("SPELL_DOCKER_MEMORY", ""))
    if memory and not _MEMORY_RE.match(memory):
        raise DockerError(
            "SPELL_DOCKER_MEMORY must be a positive integer optionally "
            "suffixed with b, k, m, or g"
        )
    cpus = js_trim(env.get("SPELL_DOCKER_CPUS", ""))
    if cpus:
        # float() alone would take "1_5", "nan" or other scripts' digits.
        value = float(cpus) if _DECIMAL_RE.match(cpus) else float("nan")
        if not (value > 0 and value != float("inf")):
            raise DockerError("SPELL_DOCKER_CPUS must be a number > 0")
    return {
        "image": image,
        "network": network,
        "user": user,
        "read_only": read_only == "1",
        "pids_limit": pids,
        "memory": memory,
        "cpus": cpus,
    }


def _tmpfs_owner(user: str) -> str:
    """``,uid=U,gid=G`` for a numeric ``--user``, so that user can write the copy."""
    match = re.match(r"^([0-9]+)(?::([0-9]+))?$", user)
    if not match:
        return ""  # the image's default user (or a named one) owns nothing special
    uid, gid = match.group(1), match.group(2) or match.group(1)
    return f",uid={uid},gid={gid}"


def docker_run_args(
    settings: dict,
    bundle_dir: str,
    share_dir: str,
    name: str,
    passed_env: list[str],
    *,
    events: bool,
) -> list[str]:
    """The ``docker run`` argument list; environment values never appear in it."""
    for path in (bundle_dir, share_dir):
        if "," in path or ":" in path:
            raise DockerError(f"cannot mount a path holding ',' or ':': {path}")
    args = [
        "run",
        "--rm",
        "--pull",
        "never",
        "--name",
        name,
        "--network",
        settings["network"],
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--tmpfs",
        f"/tmp:{TMP_TMPFS}",
        "--tmpfs",
        f"{CONTAINER_WORKDIR}:{WORKDIR_TMPFS}{_tmpfs_owner(settings['user'])}",
        "--workdir",
        CONTAINER_BUNDLE,
        "-v",
        f"{bundle_dir}:{CONTAINER_BUNDLE}:ro",
        "-v",
        f"{share_dir}:{CONTAINER_INPUT_DIR}:ro",
        "-e",
        f"INPUT_JSON={CONTAINER_INPUT_DIR}/input.json",
    ]
    if settings["read_only"]:
        args.append("--read-only")
    if settings["user"]:
        args += ["--user", settings["user"]]
    if settings["pids_limit"]:
        args += ["--pids-limit", str(settings["pids_limit"])]
    if settings["memory"]:
        args += ["--memory", settings["memory"]]
    if settings["cpus"]:
        args += ["--cpus", settings["cpus"]]
    for variable in passed_env:
        args += ["-e", variable]  # the value comes from the client's environment
    args += [
        "--",
        settings["image"],
        "spell-runner",
        "--plan",
        f"{CONTAINER_INPUT_DIR}/plan.json",
    ]
    if events:
        args.append("--events")
    return args


def _passed_environment(manifest: dict, env) -> dict:
    """Connector tokens and the step timeout: all the container sees of the host."""
    passed = {}
    for permission in manifest["permissions"]:
        name = connector_env_name(permission["connector"])
        value = env.get(name)
        if value is not None and js_trim(value):
            passed[name] = value
    step_timeout = env.get("SPELL_RUNTIME_STEP_TIMEOUT_MS")
    if step_timeout is not None and js_trim(step_timeout):
        passed["SPELL_RUNTIME_STEP_TIMEOUT_MS"] = js_trim(step_timeout)
    return passed


def _docker_failure(stderr: str, code: int, image: str) -> DockerError:
    """Word a failure of docker itself (not of the spell) for the user."""
    text = " ".join(stderr.split())
    lowered = text.lower()
    if (
        "cannot connect to the docker daemon" in lowered
        or "error during connect" in lowered
        or "is the docker daemon running" in lowered
    ):
        return DockerError(f"docker daemon is not reachable: {text}")
    if (
        "no such image" in lowered
        or "unable to find image" in lowered
        or "pull access denied" in lowered
    ):
        return DockerError(
            f"docker image not found: {image} (build it locally; "
            f"see docs/docker.md)"
        )
    if code in (126, 127) or "executable file not found" in lowered:
        return DockerError(
            f"docker image {image} cannot run spell-runner "
            f"(put spell_runner.pyz on its PATH; see docs/docker.md): {text}"
        )
    return DockerError(text or f"docker exited with code {code}")


def _docker_cleanup(name: str, client_env: dict) -> None:
    """Kill and remove the container (``rm -f`` does both); errors are ignored."""
    try:
        subprocess.run(
            ["docker", "rm", "-f", name],
            env=client_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=DOCKER_CLEANUP_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


def _readable_copy(bundle_dir: str, target: str) -> None:
    """Copy what the runner reads (spell.yaml, schema.json, steps/) for the container.

    The container's user is not the owner of the installed files, so an
    owner-only step (0700) or schema (0600) would be unreadable there; the
    copy is world-readable and keeps only the executable bits.  Symlinks and
    special files are refused, as install refuses them.
    """

    def copy(src: str, dst: str) -> None:
        info = os.lstat(src)
        if stat.S_ISDIR(info.st_mode):
            os.mkdir(dst, 0o755)
            os.chmod(dst, 0o755)
            for entry in sorted(os.listdir(src)):
                copy(os.path.join(src, entry), os.path.join(dst, entry))
        elif stat.S_ISREG(info.st_mode):
            shutil.copyfile(src, dst, follow_symlinks=False)
            os.chmod(dst, 0o755 if info.st_mode & 0o111 else 0o644)
        else:
            raise DockerError(f"unsupported file type in bundle: {src}")

    os.mkdir(target, 0o755)
    os.chmod(target, 0o755)
    for name in ("spell.yaml", "schema.json", "steps"):
        path = os.path.join(bundle_dir, name)
        if os.path.lexists(path):
            copy(path, os.path.join(target, name))


def run_in_docker(
    manifest: dict,
    bundle_dir: str,
    merged: dict,
    limits: dict,
    settings: dict,
    env,
    io,
    *,
    verbose: bool,
) -> dict:
    """Run the steps in a hardened container through ``spell-runner``.

    The runner gets a plan (validated manifest parts, input, limits) as JSON
    readable by any uid, copies the steps to an exec-capable tmpfs and prints
    one JSON result, which is read whatever its exit code.  The container has
    a unique name and is killed on timeout or interruption.
    """
    import tempfile
    import threading

    timeout_ms = limits["execution_timeout_ms"]
    started = time.monotonic()
    passed = _passed_environment(manifest, env)
    client_env = dict(step_environment(env), **passed)
    workdir = tempfile.mkdtemp(prefix="spell-docker-")  # 0700: other users stay out
    name = f"spell-{random_hex(8)}"
    proc = None
    try:
        share = os.path.join(workdir, "share")
        os.mkdir(share, 0o755)
        os.chmod(share, 0o755)  # the container's uid must read it
        plan = {
            "bundle_dir": CONTAINER_BUNDLE,
            "workdir_copy_to": CONTAINER_WORKDIR,
            "steps": manifest["steps"],
            "checks": manifest["checks"],
            "input": merged,
            "input_path": f"{CONTAINER_INPUT_DIR}/input.json",
            "env": {},
            "step_timeout_ms": limits["step_timeout_ms"],
            "execution_timeout_ms": timeout_ms,
            # Only what the container already holds: its tokens and the input.
            "redact": secret_values(passed, merged),
        }
        for filename, value in (("input.json", merged), ("plan.json", plan)):
            write_atomic(
                os.path.join(share, filename), spell_runner.dumps_js(value), 0o644
            )
        staged = os.path.join(workdir, "bundle")
        _readable_copy(bundle_dir, staged)
        args = docker_run_args(
            settings, staged, share, name, sorted(passed), events=verbose
        )
        on_event = (
            _progress_printer(io, secret_values(env, merged)) if verbose else None
        )
        if verbose:
            io.err(
                f"[spell] starting docker execution in {escape_text(settings['image'])}"
            )
        try:
            proc = subprocess.Popen(
                ["docker", *args],
                env=client_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except FileNotFoundError:
            raise DockerError(
                "docker not found: install docker and ensure it is on PATH"
            ) from None
        stderr_lines: list[str] = []

        def pump_stderr():
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if on_event and line.startswith("{"):
                    try:
                        on_event(json.loads(line))
                        continue
                    except ValueError:
                        pass
                if len(stderr_lines) < 200:
                    stderr_lines.append(line)

        reader = threading.Thread(target=pump_stderr, daemon=True)
        reader.start()
        limit = None if timeout_ms is None else timeout_ms / 1000 + DOCKER_KILL_GRACE_S
        timer_fired = threading.Event()
        timer = None
        # A longer wait overflows the platform's time_t in threading.Timer.
        if limit is not None and limit < DOCKER_TIMER_MAX_S:

            def expire():
                timer_fired.set()
                _docker_cleanup(name, client_env)

            timer = threading.Timer(
                max(0.0, limit - (time.monotonic() - started)), expire
            )
            timer.daemon = True
            timer.start()
        try:
            stdout = _read_capped(proc.stdout, DOCKER_OUTPUT_MAX_BYTES)
            code = proc.wait()
        finally:
            if timer:
                timer.cancel()
        reader.join(timeout=5)
        if timer_fired.is_set():
            raise CastError(f"cast execution timed out after {timeout_ms}ms")
        return _docker_result(stdout, code, "\n".join(stderr_lines), settings["image"])
    except BaseException:
        if proc is not None and proc.poll() is None:
            _docker_cleanup(name, client_env)
        raise
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            # With --rm the client returns only once the container is removed,
            # so a runner exit (0 or 1) leaves nothing; anything else (a docker
            # error, a killed client) may leave a created or running container.
            if proc.returncode not in RUNNER_EXIT_CODES:
                _docker_cleanup(name, client_env)
        shutil.rmtree(workdir, ignore_errors=True)


def _read_capped(stream, limit: int) -> bytes:
    """Read a stream to its end, keeping at most ``limit`` bytes."""
    chunks, size = [], 0
    while True:
        chunk = stream.read(1 << 16)
        if not chunk:
            return b"".join(chunks)
        if size < limit:
            chunks.append(chunk[: limit - size])
            size += len(chunks[-1])


def _docker_result(stdout: bytes, code: int, stderr: str, image: str) -> dict:
    text = stdout.decode("utf-8", "replace").strip()
    if not text:
        if code != 0:
            raise _docker_failure(stderr, code, image)
        raise DockerError("docker runner produced no output")
    try:
        result = parse_json_text(text)
    except (ValueError, RecursionError):
        if code != 0:
            raise _docker_failure(stderr, code, image)
        raise DockerError("failed to parse docker runner output JSON") from None
    if not isinstance(result, dict):
        raise DockerError("docker runner output must be a JSON object")
    normalised = {
        "success": bool(result.get("success")),
        "stepResults": (
            result.get("stepResults")
            if isinstance(result.get("stepResults"), list)
            else []
        ),
        "outputs": (
            result.get("outputs") if isinstance(result.get("outputs"), dict) else {}
        ),
        "checks": (
            result.get("checks") if isinstance(result.get("checks"), list) else []
        ),
    }
    if not normalised["success"]:
        error = result.get("error")
        normalised["error"] = (
            error if isinstance(error, str) and error else "docker spell failed"
        )
    return normalised


# Execution API ###############################################################
#
# `spell api`: a small HTTP/1.1 JSON service that runs registry buttons as
# casts.  Data flows top to bottom: settings and their environment variables,
# auth, the button registry, the SQLite execution index and retention, the
# fork server that runs casts, the job runner, the application (one
# ``api_<name>`` method per route, callable without sockets), the HTTP layer
# (hostile-input limits, JSON error pages), the OpenAPI document and the
# receipts page.  docs/compatibility.md lists where it differs from the
# original on purpose.

import http
import io as _io
import math
import selectors
import signal
import socket
import tempfile
import threading
import urllib.parse
from collections import deque

class _Record:
    """A small record whose fields are the class's annotations, in order.

    Defaults are class attributes; records are immutable unless the class sets
    ``_mutable``.  It stands in for ``dataclasses``, whose import (with
    ``inspect``) would cost every ``spell`` command several milliseconds.
    """

    _fields: tuple = ()
    _mutable = False
    _no_repr: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for name in vars(klass).get("__annotations__", {}):
                if not name.startswith("_") and name not in names:
                    names.append(name)
        cls._fields = tuple(names)

    def __init__(self, *args, **kwargs):
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes {len(self._fields)} fields")
        values = dict(zip(self._fields, args))
        for name, value in kwargs.items():
            if name not in self._fields or name in values:
                raise TypeError(f"{type(self).__name__}: unexpected field {name!r}")
            values[name] = value
        for name in self._fields:
            if name not in values:
                if not hasattr(type(self), name):
                    raise TypeError(f"{type(self).__name__}: missing field {name!r}")
                values[name] = getattr(type(self), name)
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name, value):
        if not self._mutable:
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, name, value)

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self):
        return hash((type(self), self._values()))

    def __repr__(self):
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self._fields
            if name not in self._no_repr
        )
        return f"{type(self).__name__}({shown})"



#: Stand-alone defaults (`spell api`); the embedding function binds port 0.
API_DEFAULT_HOST = "127.0.0.1"
API_DEFAULT_PORT = 8787
API_DEFAULT_REGISTRY = os.path.join("examples", "button-registry.v1.json")
#: 64 KiB caps both the request body and the merged input: a button's input is
#: a small form, and the runtime's own input limit has the same default.
API_BODY_LIMIT_BYTES = 65536
API_EXECUTION_TIMEOUT_MS = 60_000
API_RATE_LIMIT_WINDOW_MS = 60_000
API_RATE_LIMIT_MAX_REQUESTS = 20
API_MAX_CONCURRENT_EXECUTIONS = 4
API_LOG_RETENTION_DAYS = 14
API_LOG_MAX_FILES = 500

#: A request line longer than 8 KiB is no URL a client of this API sends.
API_REQUEST_LINE_MAX_BYTES = 8192
#: One header line, all header bytes and the header count: browsers send about
#: 1-2 KiB in 10-20 headers, so these bounds refuse only abuse.
API_HEADER_LINE_MAX_BYTES = 8192
API_HEADERS_MAX_BYTES = 65536
API_HEADERS_MAX_COUNT = 100
#: Seconds a client gets to send a whole request head (idle keep-alive time
#: included), and again for the body.  A slow client never holds a thread
#: longer: a watchdog shuts the socket down at the deadline.
API_REQUEST_TIMEOUT_S = 10.0
#: Connections served at once (one thread each); more get a 503 at once.
API_MAX_CONNECTIONS = 256
#: An over-limit body up to this size is read and dropped before the 413, so
#: the client sees the answer instead of a connection reset; larger ones are
#: answered and the connection is closed.
API_DRAIN_MAX_BYTES = 16 * 1024 * 1024
#: The registry is a small JSON file; 4 MiB refuses junk before parsing.
API_REGISTRY_MAX_BYTES = 4 * 1024 * 1024
#: After SIGTERM a cast stops its steps and writes its log; what still runs
#: after this grace is killed with its process group.
API_KILL_GRACE_MS = 5000
#: The cast's own execution timeout is set this much below the API's (at most
#: a tenth of it), so the cast normally stops itself and logs its steps first.
API_RUNTIME_TIMEOUT_MARGIN_MS = 1000
#: Execution list sizes (the original's contract).
API_LIST_DEFAULT_LIMIT = 100
API_LIST_MAX_LIMIT = 500
#: Clients whose rate-limit history is kept; older idle ones are forgotten.
API_RATE_LIMIT_MAX_CLIENTS = 10_000
#: How long start-up waits for the fork server to have its imports done.
API_WORKER_READY_TIMEOUT_S = 30.0
#: Removing a container takes docker a few seconds at most.
API_DOCKER_RM_TIMEOUT_S = 30
#: Tail of a cast's stderr read when it died without a result.
API_STDERR_TAIL_BYTES = 64 * 1024
#: Longest request path written to the server log.
API_LOG_PATH_MAX_CHARS = 2048

API_ADMIN_ROLE = "admin"
API_DEFAULT_TENANT = "default"
API_ANONYMOUS_ROLE = "anonymous"
EXECUTION_STATES = ("queued", "running", "succeeded", "failed", "timeout")
IN_FLIGHT_STATES = ("queued", "running")
#: Environment variable that marks every process of one execution, so that
#: leftovers can be found and killed after a timeout or a crash.
EXECUTION_MARKER_ENV = "SPELL_API_EXECUTION_ID"
#: The API's own secrets; they never reach a cast's environment.
API_SECRET_ENV = ("SPELL_API_AUTH_KEYS", "SPELL_API_AUTH_TOKENS")
#: Modules a cast needs, imported once by the fork server.
_WORKER_PRELOAD = (
    "spell_runner",
    "yaml",
    "jsonschema",
    "cryptography.hazmat.primitives.asymmetric.ed25519",
    "cryptography.hazmat.primitives.serialization",
)

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EXECUTION_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class ApiError(SpellError):
    """A failed request: HTTP status, ``error_code`` and message of one answer."""

    def __init__(self, status: int, error_code: str, message: str, headers=None):
        super().__init__(message)
        self.http_status = status
        self.error_code = error_code
        self.headers = list(headers or [])


def error_body(err: SpellError) -> dict:
    """The JSON body of every API error: ``ok``, ``error_code``, ``message``.

    Clients rely on exactly these three keys in this order; no handler builds
    an error body of its own.
    """
    return {"ok": False, "error_code": err.error_code, "message": err.message}


# Settings and environment ----------------------------------------------------

_JS_DECIMAL_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_JS_RADIX_RE = re.compile(r"^0([xXoObB])([0-9A-Za-z]+)$")


def js_number_value(text: str) -> float | None:
    """What JavaScript's ``Number(text)`` gives, or None where it gives NaN.

    Surrounding spaces are ignored, blank is 0, and ``1e3``, ``0x10``,
    ``0b11``, ``0o7`` and ``+5`` are numbers, as the original accepts them.
    """
    s = js_trim(text)
    if not s:
        return 0.0
    m = _JS_RADIX_RE.match(s)
    if m:
        base = {"x": 16, "o": 8, "b": 2}[m.group(1).lower()]
        try:
            return float(int(m.group(2), base))
        except (ValueError, OverflowError):
            return None
    if s in ("Infinity", "+Infinity"):
        return math.inf
    if s == "-Infinity":
        return -math.inf
    if _JS_DECIMAL_RE.match(s):
        try:
            return float(s)
        except OverflowError:
            return math.inf
    return None


def _js_integer(text: str) -> int | None:
    value = js_number_value(text)
    if value is None or not math.isfinite(value) or value != int(value):
        return None
    return int(value)


def _setting_int(env, name: str, default: int, minimum: int) -> int:
    """An integer variable: blank means the default, else integer >= minimum."""
    raw = env.get(name)
    if raw is None or not js_trim(raw):
        return default
    value = _js_integer(raw)
    if value is None or value < minimum:
        raise SpellError(f"{name} must be an integer >= {minimum}")
    return value


def _setting_csv(env, name: str) -> tuple[str, ...]:
    raw = env.get(name) or ""
    return tuple(item for item in (js_trim(part) for part in raw.split(",")) if item)


class ApiSettings(_Record):
    """Everything the server is configured with; immutable, shared by threads.

    Field names follow the embedding options; ``start_execution_api_server``
    also accepts the original's camelCase names.
    """

    host: str = API_DEFAULT_HOST
    port: int = 0
    registry_path: str = ""
    body_limit_bytes: int = API_BODY_LIMIT_BYTES
    execution_timeout_ms: int = API_EXECUTION_TIMEOUT_MS
    rate_limit_window_ms: int = API_RATE_LIMIT_WINDOW_MS
    rate_limit_max_requests: int = API_RATE_LIMIT_MAX_REQUESTS
    max_concurrent_executions: int = API_MAX_CONCURRENT_EXECUTIONS
    auth_tokens: tuple = ()
    auth_keys: tuple = ()
    log_retention_days: int = API_LOG_RETENTION_DAYS
    log_max_files: int = API_LOG_MAX_FILES
    #: Store folder (``~/.spell``); None means ``store_root()`` at start.
    store: str | None = None
    request_timeout_s: float = API_REQUEST_TIMEOUT_S
    kill_grace_ms: int = API_KILL_GRACE_MS
    max_connections: int = API_MAX_CONNECTIONS
    #: No request or execution log lines (tests).
    quiet: bool = False
    #: Where log lines go; None means sys.stderr at write time.
    log_stream: object = None


_OPTION_ALIASES = {
    "registryPath": "registry_path",
    "requestBodyLimitBytes": "body_limit_bytes",
    "executionTimeoutMs": "execution_timeout_ms",
    "rateLimitWindowMs": "rate_limit_window_ms",
    "rateLimitMaxRequests": "rate_limit_max_requests",
    "maxConcurrentExecutions": "max_concurrent_executions",
    "authTokens": "auth_tokens",
    "authKeys": "auth_keys",
    "logRetentionDays": "log_retention_days",
    "logMaxFiles": "log_max_files",
}


def api_settings(**options) -> ApiSettings:
    """Settings from embedding options (snake_case or the original's camelCase).

    Like the original library, the numbers are not re-validated here; the
    registry defaults to ``<cwd>/examples/button-registry.v1.json``.
    """
    values = {}
    for key, value in options.items():
        name = _OPTION_ALIASES.get(key, key)
        if name not in ApiSettings._fields:
            raise TypeError(f"unknown execution api option: {key}")
        values[name] = value
    for name in ("auth_tokens", "auth_keys"):
        if name in values:
            values[name] = tuple(values[name] or ())
    if values.get("registry_path") is None:
        values["registry_path"] = os.path.join(os.getcwd(), API_DEFAULT_REGISTRY)
    return ApiSettings(**values)


def api_settings_from_env(env, *, host=None, port=None, registry=None) -> ApiSettings:
    """Settings of `spell api`: flags first, then ``SPELL_API_*`` variables.

    Raises ``SpellError`` with the variable's message, checked in the order
    the variables are documented.
    """
    if port is not None:
        port_value = _js_integer(port)
        if port_value is None or not 0 <= port_value <= 65535:
            raise SpellError("--port must be an integer from 0 to 65535")
    else:
        port_value = _setting_int(env, "SPELL_API_PORT", API_DEFAULT_PORT, 1)
        if port_value > 65535:
            raise SpellError("SPELL_API_PORT must be an integer >= 1 and <= 65535")
    if registry is None:
        registry = env.get("SPELL_BUTTON_REGISTRY_PATH")
        # Only unset or whitespace means the default: an empty string is a path.
        if registry is None or (registry and not js_trim(registry)):
            registry = os.path.join(os.getcwd(), API_DEFAULT_REGISTRY)
    values = dict(
        port=port_value,
        registry_path=registry,
        body_limit_bytes=_setting_int(
            env, "SPELL_API_BODY_LIMIT_BYTES", API_BODY_LIMIT_BYTES, 1
        ),
        execution_timeout_ms=_setting_int(
            env, "SPELL_API_EXECUTION_TIMEOUT_MS", API_EXECUTION_TIMEOUT_MS, 1
        ),
        rate_limit_window_ms=_setting_int(
            env, "SPELL_API_RATE_LIMIT_WINDOW_MS", API_RATE_LIMIT_WINDOW_MS, 1
        ),
        rate_limit_max_requests=_setting_int(
            env, "SPELL_API_RATE_LIMIT_MAX_REQUESTS", API_RATE_LIMIT_MAX_REQUESTS, 1
        ),
        max_concurrent_executions=_setting_int(
            env, "SPELL_API_MAX_CONCURRENT_EXECUTIONS", API_MAX_CONCURRENT_EXECUTIONS, 0
        ),
        auth_tokens=_setting_csv(env, "SPELL_API_AUTH_TOKENS"),
        auth_keys=_setting_csv(env, "SPELL_API_AUTH_KEYS"),
        log_retention_days=_setting_int(
            env, "SPELL_API_LOG_RETENTION_DAYS", API_LOG_RETENTION_DAYS, 0
        ),
        log_max_files=_setting_int(
            env, "SPELL_API_LOG_MAX_FILES", API_LOG_MAX_FILES, 0
        ),
    )
    if host is None:
        host = js_trim(env.get("SPELL_API_HOST") or "") or API_DEFAULT_HOST
    values["host"] = host
    return ApiSettings(**values)


# Auth ------------------------------------------------------------------------


class AuthKey(_Record):
    """One configured key: the tenant and role a token stands for."""

    tenant: str
    role: str
    token: str


class AuthContext(_Record):
    """Who is calling: tenant, role (None unless bound by a key) and mode."""

    tenant: str = API_DEFAULT_TENANT
    role: str | None = None
    mode: str = "off"

    @property
    def scoped(self) -> bool:
        """True when this caller only sees its own tenant's executions."""
        return self.mode == "keys" and self.role != API_ADMIN_ROLE


def parse_auth_key(entry: str) -> AuthKey:
    """Parse ``role=token``, ``tenant:role=token`` or the legacy ``role:token``."""
    sep = "=" if "=" in entry else ":"
    at = entry.find(sep)
    if at <= 0 or at == len(entry) - 1:
        raise SpellError(f"invalid auth key entry: {entry}")
    identity, token = js_trim(entry[:at]), js_trim(entry[at + 1 :])
    parts = identity.split(":")
    if len(parts) == 1:
        tenant, role = API_DEFAULT_TENANT, parts[0]
    elif len(parts) == 2:
        tenant, role = parts
    else:
        raise SpellError(f"invalid auth key entry: {entry}")
    if not _NAME_RE.match(tenant):
        raise SpellError(f"invalid auth key tenant: {tenant or '(empty)'}")
    if not _NAME_RE.match(role):
        raise SpellError(f"invalid auth key role: {role or '(empty)'}")
    if not token:
        raise SpellError(f"invalid auth key token: {tenant}:{role} has empty token")
    return AuthKey(tenant, role, token)


class Authenticator:
    """Checks presented tokens against the configuration in constant time.

    Every configured token is compared on each request (no early exit), and
    the comparison runs on keyed digests, so neither which key matched nor a
    token's length shows in the timing.
    """

    def __init__(self, tokens, keys):
        tokens = tuple(t for t in (js_trim(t) for t in tokens) if t)
        parsed = [parse_auth_key(entry) for entry in keys]
        seen = set()
        for key in parsed:
            if key.token in seen:
                raise SpellError(
                    f"duplicate auth key token configured for role: {key.tenant}:{key.role}"
                )
            seen.add(key.token)
        if tokens and parsed:
            raise SpellError(
                "API auth config error: use either authTokens or authKeys (role-based), "
                "not both"
            )
        self.mode = "keys" if parsed else "tokens" if tokens else "off"
        self._secret = os.urandom(32)
        if parsed:
            self._entries = [
                (self._digest(k.token.encode()), AuthContext(k.tenant, k.role, "keys"))
                for k in parsed
            ]
        else:
            self._entries = [
                (self._digest(t.encode()), AuthContext(mode="tokens")) for t in tokens
            ]

    def _digest(self, token: bytes) -> bytes:
        import hashlib
        import hmac

        return hmac.new(self._secret, token, hashlib.sha256).digest()

    def authenticate(self, headers) -> AuthContext:
        """The caller's context, or ``ApiError`` 401."""
        if self.mode == "off":
            return AuthContext()
        token = presented_token(headers)
        if token is None:
            raise ApiError(401, "AUTH_REQUIRED", "authorization token is required")
        # Header values arrive as Latin-1 text: back to the bytes that were sent.
        digest = self._digest(token.encode("latin-1", "replace"))
        found = None
        import hmac

        for expected, context in self._entries:
            if hmac.compare_digest(expected, digest) and found is None:
                found = context
        if found is None:
            raise ApiError(401, "AUTH_INVALID", "invalid authorization token")
        return found


_API_BEARER_RE = re.compile(r"^Bearer\s+(.+)$", re.S)


def presented_token(headers) -> str | None:
    """The token of a request: ``Authorization: Bearer``, else ``x-api-key``."""
    auth = headers.get("authorization")
    if auth is not None:
        m = _API_BEARER_RE.match(js_trim(auth))
        if m and js_trim(m.group(1)):
            return js_trim(m.group(1))
    key = headers.get("x-api-key")
    if key is not None and js_trim(key):
        return js_trim(key)
    return None


# Button registry ---------------------------------------------------------------

_BUTTON_KEYS = (
    "button_id",
    "spell_id",
    "version",
    "defaults",
    "required_confirmations",
    "allowed_roles",
    "require_signature",
    "label",
    "description",
    "owners",
)
_BUTTON_REQUIRED = (
    "button_id",
    "spell_id",
    "version",
    "defaults",
    "required_confirmations",
    "allowed_roles",
)


class Button(_Record):
    """One registry entry: a pinned spell and the guards to run it."""

    button_id: str
    spell_id: str
    version: str
    defaults: dict
    risk: bool
    billing: bool
    require_signature: bool
    allowed_roles: tuple
    label: str
    description: str

    def public(self) -> dict:
        """The registry fields ``GET /api/buttons`` shows, in the original's order."""
        return {
            "button_id": self.button_id,
            "label": self.label,
            "description": self.description,
            "spell_id": self.spell_id,
            "version": self.version,
            "defaults": self.defaults,
            "required_confirmations": {"risk": self.risk, "billing": self.billing},
            "require_signature": self.require_signature,
            "allowed_roles": list(self.allowed_roles),
        }


class ButtonRegistry(_Record):
    _no_repr = ("by_id",)

    version: str
    buttons: tuple
    by_id: dict


def _validate_registry(doc) -> list[str]:
    """Schema errors of a registry document as ``<pointer> <message>`` lines."""
    errors: list[str] = []

    def err(pointer: str, message: str) -> None:
        errors.append(f"{pointer or '/'} {message}")

    def check_object(value, pointer, required, allowed) -> bool:
        if not isinstance(value, dict):
            err(pointer, "must be object")
            return False
        for key in required:
            if key not in value:
                err(pointer, f"must have required property '{key}'")
        for key in value:
            if key not in allowed:
                err(pointer, "must NOT have additional properties")
        return True

    def check_string(value, pointer, min_length=0) -> None:
        if not isinstance(value, str):
            err(pointer, "must be string")
        elif len(value) < min_length:
            err(pointer, f"must NOT have fewer than {min_length} characters")

    def check_bool(value, pointer) -> None:
        if not isinstance(value, bool):
            err(pointer, "must be boolean")

    def check_strings(value, pointer, min_items) -> None:
        if not isinstance(value, list):
            err(pointer, "must be array")
            return
        if len(value) < min_items:
            err(pointer, f"must NOT have fewer than {min_items} items")
        for i, item in enumerate(value):
            check_string(item, f"{pointer}/{i}", 1)

    if not check_object(doc, "", ("version", "buttons"), ("version", "buttons")):
        return errors
    if "version" in doc and doc["version"] != "v1":
        err("/version", "must be equal to constant")
    if "buttons" not in doc:
        return errors
    if not isinstance(doc["buttons"], list):
        err("/buttons", "must be array")
        return errors
    if not doc["buttons"]:
        err("/buttons", "must NOT have fewer than 1 items")
    for i, button in enumerate(doc["buttons"]):
        at = f"/buttons/{i}"
        if not check_object(button, at, _BUTTON_REQUIRED, _BUTTON_KEYS):
            continue
        for key in ("button_id", "spell_id", "version"):
            if key in button:
                check_string(button[key], f"{at}/{key}", 1)
        if "defaults" in button and not isinstance(button["defaults"], dict):
            err(f"{at}/defaults", "must be object")
        if "required_confirmations" in button:
            rc = button["required_confirmations"]
            if check_object(
                rc,
                f"{at}/required_confirmations",
                ("risk", "billing"),
                ("risk", "billing"),
            ):
                for key in ("risk", "billing"):
                    if key in rc:
                        check_bool(rc[key], f"{at}/required_confirmations/{key}")
        if "require_signature" in button:
            check_bool(button["require_signature"], f"{at}/require_signature")
        for key in ("label", "description"):
            if key in button:
                check_string(button[key], f"{at}/{key}")
        if "allowed_roles" in button:
            check_strings(button["allowed_roles"], f"{at}/allowed_roles", 1)
        if "owners" in button:
            check_strings(button["owners"], f"{at}/owners", 0)
    return errors


def load_button_registry(path: str) -> ButtonRegistry:
    """Load and validate a registry file (messages as the original's loader).

    ``owners`` is accepted on a button, as the published schema allows.
    """
    try:
        data = read_file(
            path, API_REGISTRY_MAX_BYTES, "button registry file", follow_symlinks=True
        )
    except OSError:
        raise SpellError(f"button registry file not found: {path}") from None
    except SpellError as exc:
        if "larger than" in exc.message:
            raise
        raise SpellError(f"button registry file not found: {path}") from None
    try:
        doc = parse_json_text(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise SpellError(f"failed to parse button registry JSON: {exc}") from None
    problems = _validate_registry(doc)
    if problems:
        raise SpellError(f"button registry validation failed: {'; '.join(problems)}")
    buttons, by_id = [], {}
    for raw in doc["buttons"]:
        if raw["button_id"] in by_id:
            raise SpellError(f"duplicate button_id in registry: {raw['button_id']}")
        button = Button(
            button_id=raw["button_id"],
            spell_id=raw["spell_id"],
            version=raw["version"],
            defaults=raw["defaults"],
            risk=raw["required_confirmations"]["risk"],
            billing=raw["required_confirmations"]["billing"],
            require_signature=raw.get("require_signature", False),
            allowed_roles=tuple(raw["allowed_roles"]),
            label=raw.get("label", raw["button_id"]),
            description=raw.get("description", ""),
        )
        by_id[button.button_id] = button
        buttons.append(button)
    return ButtonRegistry(doc["version"], tuple(buttons), by_id)


def merge_input(defaults: dict, value: dict) -> dict:
    """Deep-merge request input over button defaults (objects merge, rest replaces)."""
    merged = dict(defaults)
    for key, item in value.items():
        current = merged.get(key)
        if key in merged and isinstance(current, dict) and isinstance(item, dict):
            merged[key] = merge_input(current, item)
        else:
            merged[key] = item
    return merged


def js_truthy(value) -> bool:
    """JavaScript truthiness: false, 0, NaN, "" and null are false."""
    if value is None or value is False or value == "":
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0 and value == value
    return True


def compact_json(value) -> str:
    """Compact JSON as ``JSON.stringify`` writes it (the API's response form)."""
    return spell_runner.dumps_js(value)


def plain_json(value) -> str:
    """``compact_json`` through the C encoder, for values made only of text,
    booleans, integers and null read back from the index.  For those the two
    agree byte for byte (floats and lone surrogates are where they differ, and
    SQLite text holds no lone surrogates); this one is several times faster."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if _JSON_ESCAPED.search(text):
        text = _JSON_ESCAPED.sub(lambda m: "\\u%04x" % ord(m.group()), text)
    return text


#: What ``compact_json`` escapes beyond json.dumps: DEL, the C1 controls and
#: lone surrogates (they only ever occur inside strings).
_JSON_ESCAPED = re.compile("[\x7f-\x9f\ud800-\udfff]")


# Execution index ---------------------------------------------------------------

#: Keys of an execution summary, in the order the API shows them.
SUMMARY_FIELDS = (
    "execution_id",
    "button_id",
    "spell_id",
    "version",
    "require_signature",
    "status",
    "tenant_id",
    "actor_role",
    "created_at",
    "started_at",
    "finished_at",
    "error_code",
    "message",
    "runtime_execution_id",
)

_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    execution_id TEXT NOT NULL UNIQUE,
    button_id TEXT NOT NULL,
    spell_id TEXT NOT NULL,
    version TEXT NOT NULL,
    require_signature INTEGER NOT NULL,
    status TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    actor_role TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    error_code TEXT,
    message TEXT,
    runtime_execution_id TEXT,
    runtime_log_path TEXT,
    receipt TEXT,
    dry_run INTEGER NOT NULL DEFAULT 0,
    server_instance TEXT,
    pid INTEGER,
    proc_start TEXT
);
CREATE INDEX IF NOT EXISTS executions_created ON executions (created_at);
CREATE INDEX IF NOT EXISTS executions_status ON executions (status, created_at);
CREATE INDEX IF NOT EXISTS executions_button ON executions (button_id, created_at);
CREATE INDEX IF NOT EXISTS executions_tenant ON executions (tenant_id, created_at);
CREATE INDEX IF NOT EXISTS executions_age ON executions (coalesce(finished_at, created_at));
"""


class ExecutionIndex:
    """The execution index: a SQLite database (WAL) in the logs folder.

    Every change is one committed transaction, so an accepted execution is on
    disk before the client hears 202, and a crash loses nothing.  One
    connection is shared under a lock: statements are short, and this keeps
    the index consistent without a pool.
    """

    FILE_NAME = "index.sqlite3"
    #: Bumped when the table changes, so a later version can migrate.
    SCHEMA_VERSION = 1

    def __init__(self, logs_dir: str):
        self.path = os.path.join(logs_dir, self.FILE_NAME)
        created = not os.path.exists(self.path)
        if created:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE))
        self._lock = threading.Lock()
        import sqlite3  # only the server keeps an index

        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.row_factory = sqlite3.Row
        self.IntegrityError = sqlite3.IntegrityError
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: in WAL mode a commit survives a crash of this process; the
        # acceptance itself is written with FULL (see insert).
        self._db.execute("PRAGMA synchronous=NORMAL")
        if self._db.execute("PRAGMA user_version").fetchone()[0] == 0:
            self._db.execute(f"PRAGMA user_version = {self.SCHEMA_VERSION}")
        self._db.executescript(_INDEX_SCHEMA)
        if created:
            self._import_legacy(os.path.join(logs_dir, "index.json"))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args=()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def insert(self, record: dict) -> None:
        """Insert a new execution; raises ``sqlite3.IntegrityError`` on a known id."""
        keys = list(record)
        sql = (
            f"INSERT INTO executions ({', '.join(keys)}) "
            f"VALUES ({', '.join('?' for _ in keys)})"
        )
        with self._lock:
            # An accepted execution must survive even a power loss: sync it.
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute(sql, [record[k] for k in keys])
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")

    def update(self, execution_id: str, **values) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self._write(
            f"UPDATE executions SET {sets} WHERE execution_id = ?",
            [*values.values(), execution_id],
        )

    def get(self, execution_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM executions WHERE execution_id = ?", (execution_id,)
            ).fetchone()
        return dict(row) if row else None

    def list(self, statuses, button_id, tenant_id, limit: int) -> list[dict]:
        """Executions matching every filter, newest first (ties: oldest insert first).

        Each status is read on its own through the (status, created_at) index
        and the answers are merged: one query with ``status IN (...)`` would
        sort every matching row before applying the limit.
        """
        where, args = [], []
        if button_id is not None:
            where.append("button_id = ?")
            args.append(button_id)
        if tenant_id is not None:
            where.append("tenant_id = ?")
            args.append(tenant_id)
        rows = []
        with self._lock:
            for status in statuses or [None]:
                clauses = where if status is None else ["status = ?", *where]
                values = args if status is None else [status, *args]
                sql = "SELECT * FROM executions"
                if clauses:
                    sql += " WHERE " + " AND ".join(clauses)
                sql += " ORDER BY created_at DESC, seq ASC LIMIT ?"
                rows += self._db.execute(sql, [*values, limit]).fetchall()
        if len(statuses) > 1:
            rows.sort(key=lambda r: r["seq"])
            rows.sort(key=lambda r: r["created_at"], reverse=True)
        return [dict(r) for r in rows[:limit]]

    def unfinished(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM executions WHERE status IN ('queued', 'running')"
            ).fetchall()
        return [dict(r) for r in rows]

    def retention_candidates(self, cutoff: str | None, keep: int) -> list[dict]:
        """Finished executions older than ``cutoff`` or beyond the newest ``keep``."""
        found = {}
        with self._lock:
            if cutoff is not None:
                for row in self._db.execute(
                    "SELECT execution_id, runtime_log_path, status FROM executions "
                    "WHERE coalesce(finished_at, created_at) < ?",
                    (cutoff,),
                ):
                    found[row["execution_id"]] = dict(row)
            if keep > 0:
                for row in self._db.execute(
                    "SELECT execution_id, runtime_log_path, status FROM executions "
                    "ORDER BY coalesce(finished_at, created_at) DESC, seq DESC "
                    "LIMIT -1 OFFSET ?",
                    (keep,),
                ):
                    found[row["execution_id"]] = dict(row)
        return [r for r in found.values() if r["status"] not in IN_FLIGHT_STATES]

    def rows_for_logs(self, paths) -> list[dict]:
        paths = list(paths)
        found = []
        with self._lock:
            for start in range(0, len(paths), 500):
                chunk = paths[start : start + 500]
                found += [
                    dict(r)
                    for r in self._db.execute(
                        "SELECT execution_id, runtime_log_path, status FROM executions "
                        f"WHERE runtime_log_path IN ({', '.join('?' for _ in chunk)})",
                        chunk,
                    )
                ]
        return found

    def referenced_logs(self, paths) -> set:
        return {r["runtime_log_path"] for r in self.rows_for_logs(paths)}

    def delete(self, execution_ids) -> int:
        ids = list(execution_ids)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    self._db.execute(
                        f"DELETE FROM executions WHERE execution_id IN "
                        f"({', '.join('?' for _ in chunk)}) "
                        "AND status NOT IN ('queued', 'running')",
                        chunk,
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(ids)

    def _import_legacy(self, path: str) -> None:
        """Carry the original's ``index.json`` history into a new database."""
        try:
            doc = read_json_file(path, "index.json", limit=LOG_MAX_BYTES)
        except (OSError, ValueError, SpellError, RecursionError):
            return
        if (
            not isinstance(doc, dict)
            or doc.get("version") != "v1"
            or not isinstance(doc.get("executions"), list)
        ):
            return
        records = {}
        for item in doc["executions"]:
            record = _legacy_record(item)
            if record:
                records.pop(record["execution_id"], None)
                records[record["execution_id"]] = record
        with self._lock:
            self._db.execute("BEGIN")
            for record in records.values():
                keys = list(record)
                self._db.execute(
                    f"INSERT OR REPLACE INTO executions ({', '.join(keys)}) "
                    f"VALUES ({', '.join('?' for _ in keys)})",
                    [record[k] for k in keys],
                )
            self._db.execute("COMMIT")


def _legacy_record(item) -> dict | None:
    """One row from an ``index.json`` job, or None when the original would skip it."""
    if not isinstance(item, dict):
        return None
    for key in (
        "execution_id",
        "button_id",
        "spell_id",
        "version",
        "actor_role",
        "created_at",
    ):
        if not isinstance(item.get(key), str):
            return None
    if item.get("status") not in EXECUTION_STATES:
        return None
    if "require_signature" in item and not isinstance(item["require_signature"], bool):
        return None
    if "tenant_id" in item and not isinstance(item["tenant_id"], str):
        return None
    tenant = js_trim(item.get("tenant_id") or "") or API_DEFAULT_TENANT
    record = {
        key: item[key]
        for key in (
            "execution_id",
            "button_id",
            "spell_id",
            "version",
            "status",
            "actor_role",
            "created_at",
        )
    }
    record.update(
        require_signature=int(bool(item.get("require_signature"))), tenant_id=tenant
    )
    for key in (
        "started_at",
        "finished_at",
        "error_code",
        "message",
        "runtime_execution_id",
        "runtime_log_path",
    ):
        if isinstance(item.get(key), str):
            record[key] = item[key]
    if isinstance(item.get("receipt"), dict):
        record["receipt"] = compact_json(item["receipt"])
    return record


def public_execution(row: dict) -> dict:
    """The public view of an execution (no log path, input or receipt)."""
    out = {}
    for key in SUMMARY_FIELDS:
        value = row.get(key)
        if value is None:
            continue
        out[key] = bool(value) if key == "require_signature" else value
    return out


_RECEIPT_STEP_KEYS = (
    "stepName",
    "uses",
    "started_at",
    "finished_at",
    "success",
    "exitCode",
    "message",
)


def build_receipt(log: dict, tenant_id: str) -> dict:
    """The sanitized receipt of an execution log: no input, outputs or raw output."""
    receipt = {}
    for key in (
        "execution_id",
        "id",
        "version",
        "started_at",
        "finished_at",
        "summary",
        "checks",
    ):
        if key in log:
            receipt[key] = log[key]
    steps = log.get("steps")
    receipt["steps"] = [
        {k: step[k] for k in _RECEIPT_STEP_KEYS if k in step}
        for step in (steps if isinstance(steps, list) else [])
        if isinstance(step, dict)
    ]
    for key in ("success", "error"):
        if key in log:
            receipt[key] = log[key]
    receipt["tenant_id"] = tenant_id
    return receipt


_RUNTIME_ERRORS = (
    (
        re.compile(
            r"cast execution timed out after \d+ms(?: while running step '[^'\n]*')?"
        ),
        "EXECUTION_TIMEOUT",
        None,
    ),
    (re.compile(r"shell step '[^'\n]*' timed out after \d+ms"), "STEP_TIMEOUT", None),
    (
        re.compile(
            r"merged input is \d+ bytes, exceeds SPELL_RUNTIME_INPUT_MAX_BYTES=\d+"
        ),
        "INPUT_TOO_LARGE",
        None,
    ),
    (re.compile(r"signature required:"), "SIGNATURE_REQUIRED", "signature required"),
    (
        re.compile(r"risk [^\n]* requires --yes"),
        "RISK_CONFIRMATION_REQUIRED",
        "risk confirmation required",
    ),
    (
        re.compile(r"billing enabled requires --allow-billing"),
        "BILLING_CONFIRMATION_REQUIRED",
        "billing confirmation required",
    ),
    (
        re.compile(r"missing connector token"),
        "CONNECTOR_TOKEN_MISSING",
        "connector token missing",
    ),
    (re.compile(r"platform mismatch:"), "PLATFORM_UNSUPPORTED", "platform unsupported"),
    (
        re.compile(r"input does not match schema"),
        "INPUT_SCHEMA_INVALID",
        "input schema invalid",
    ),
)


def map_runtime_error(text: str) -> tuple[str, str]:
    """The (error_code, message) of a failed cast's error text."""
    for pattern, code, message in _RUNTIME_ERRORS:
        m = pattern.search(text)
        if m:
            return code, message or m.group(0)
    return "EXECUTION_FAILED", "execution failed"


# Processes of an execution ---------------------------------------------------


def _proc_start_time(pid: int) -> str | None:
    """Start time of a live process (Linux clock ticks since boot), to tell a
    process from a later one that reuses its pid; None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def _marked_pids(execution_ids) -> dict[int, str]:
    """Live processes whose environment carries one of these execution markers."""
    wanted = {f"{EXECUTION_MARKER_ENV}={eid}".encode(): eid for eid in execution_ids}
    found: dict[int, str] = {}
    if not wanted:
        return found
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    me = os.getpid()
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                variables = handle.read().split(b"\0")
        except OSError:
            continue
        for item in variables:
            if item in wanted:
                found[int(entry)] = wanted[item]
                break
    return found


def _signal_execution(execution_ids, pids, sig) -> int:
    """Send ``sig`` to the known cast processes (their groups) and to every
    marked process; returns how many targets were still alive."""
    alive = 0
    for pid, start in pids:
        if pid and start and _proc_start_time(pid) == start:
            alive += 1
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
    for pid in _marked_pids(execution_ids):
        if _proc_start_time(pid) is None:
            continue
        alive += 1
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def stop_execution_processes(execution_ids, pids, grace_s: float) -> None:
    """SIGTERM every process of these executions, then SIGKILL what is left.

    ``pids`` are (pid, start time) of the cast processes, each the leader of
    its own process group; steps and containers' clients are found by marker.
    """
    if not _signal_execution(execution_ids, pids, signal.SIGTERM):
        return
    give_up = time.monotonic() + grace_s
    while time.monotonic() < give_up:
        time.sleep(0.05)
        if not _signal_execution(execution_ids, pids, 0):
            return
    kill_marked(execution_ids, pids)


def kill_marked(execution_ids, pids=()) -> None:
    """SIGKILL what is left of these executions, and remove their containers.

    A docker client killed this way leaves its container running, so the
    containers named on the marked clients' command lines are removed too.
    """
    containers = _execution_containers(_marked_pids(execution_ids))
    _signal_execution(execution_ids, pids, signal.SIGKILL)
    if containers:
        try:
            subprocess.run(
                ["docker", "rm", "-f", *containers],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=API_DOCKER_RM_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError):
            pass


def _execution_containers(pids) -> list[str]:
    """Names given with ``--name`` to ``docker run`` by these processes."""
    names = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != "docker" or "run" not in argv:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == "--name" and argv[i + 1] and not argv[i + 1].startswith("-"):
                names.append(argv[i + 1])
    return names


class _InstanceLock:
    """A lock file held while a server runs, so another server sharing the
    store can tell that this one's executions are still alive."""

    def __init__(self, logs_dir: str):
        import fcntl

        self._fcntl = fcntl
        self.folder = os.path.join(logs_dir, ".api-instances")
        ensure_dir(self.folder)
        self.instance = f"{os.getpid()}-{random_hex(6)}"
        self.path = os.path.join(self.folder, self.instance + ".lock")
        self._fd = os.open(
            self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE
        )
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def is_alive(self, instance: str | None) -> bool:
        """True when the server ``instance`` still runs (holds its lock)."""
        if not instance or "/" in instance or instance.startswith("."):
            return False
        if instance == self.instance:
            return True
        path = os.path.join(self.folder, instance + ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            self._fcntl.flock(fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        return False

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


# Fork server -----------------------------------------------------------------
#
# Each execution is a real cast in its own process, but a fresh interpreter
# would pay start-up and imports every time.  So the server starts one worker
# process at boot that imports spell and its dependencies once; for each
# execution it forks a child that becomes its own session, points stdout and
# stderr at files, calls ``cast`` and writes the result dict to a file.  The
# worker speaks JSON lines: requests on its stdin, events on its stdout.


def _send_line(fd: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def _become_child_subreaper() -> None:
    """Adopt orphaned descendants (Linux), so none is left a zombie or lost."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(
            36, 1, 0, 0, 0
        )  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _worker_main() -> None:
    """Entry point of the fork server process; exits when its stdin closes."""
    import importlib

    for name in _WORKER_PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the cast reports a missing dependency itself
    stop = []
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    _become_child_subreaper()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, str] = {}
    pending = b""
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    _send_line(1, {"ready": os.getpid()})
    closing_since = None
    grace_s = API_KILL_GRACE_MS / 1000
    while True:
        for key, _ in selector.select(timeout=0.5):
            if key.fd == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            data = os.read(0, 1 << 16)
            if not data:
                stop.append(True)
                selector.unregister(0)
                continue
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                grace_s = request.get("grace_ms", API_KILL_GRACE_MS) / 1000
                pid = _worker_fork(request, selector, wake_r, wake_w)
                if pid is None:
                    continue
                children[pid] = request["job"]
                _send_line(
                    1,
                    {
                        "started": request["job"],
                        "pid": pid,
                        "start": _proc_start_time(pid),
                    },
                )
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            job = children.pop(pid, None)
            if job is not None:
                try:
                    _send_line(
                        1,
                        {
                            "exited": job,
                            "pid": pid,
                            "code": os.waitstatus_to_exitcode(status),
                        },
                    )
                except OSError:
                    stop.append(True)
        if stop:
            if closing_since is None:
                closing_since = time.monotonic()
                for pid in children:
                    _kill_quietly(pid, signal.SIGTERM)
            elif time.monotonic() - closing_since > grace_s:
                for pid in children:
                    _kill_quietly(-pid, signal.SIGKILL)
            if not children:
                os._exit(0)


def _kill_quietly(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _worker_fork(request: dict, selector, wake_r: int, wake_w: int) -> int | None:
    """Fork the child of one execution; in the child run the cast and exit."""
    try:
        pid = os.fork()
    except OSError as exc:
        _send_line(
            1,
            {
                "exited": request["job"],
                "pid": None,
                "code": -1,
                "error": f"fork failed: {exc}",
            },
        )
        return None
    if pid:
        return pid
    code = 70  # EX_SOFTWARE: the child died before writing its result
    try:
        selector.close()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        code = _worker_child(request)
    finally:
        os._exit(code)


def _worker_child(request: dict) -> int:
    """Body of an execution's process: one ``cast`` with files for its output."""
    os.setsid()
    folder = request["dir"]
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(os.path.join(folder, "stdout.txt"), os.O_WRONLY | os.O_CREAT, 0o600)
    err = os.open(os.path.join(folder, "stderr.txt"), os.O_WRONLY | os.O_CREAT, 0o600)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
    try:
        kept = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        kept = range(3, 1024)
    for fd in kept:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[EXECUTION_MARKER_ENV] = request["job"]
    # The cast turns SIGTERM into a clean stop while it runs; outside that
    # window (just before, or while its log is written) a SIGTERM must not
    # kill the process before the result is on disk.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        os.chdir(request["cwd"])
    except OSError:
        pass
    try:
        result = cast(request["opts"], IO(sys.stdout, sys.stderr))
        result = dict(result) if isinstance(result, dict) else {"ok": False}
    except SpellError as exc:
        result = {"ok": False, "error": exc.message, "error_code": exc.error_code}
    except BaseException as exc:  # a bug in cast: report it, never hang the job
        result = {
            "ok": False,
            "error": f"internal error: {type(exc).__name__}: {exc}",
            "error_code": "INTERNAL_ERROR",
        }
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    write_atomic(os.path.join(folder, "result.json"), json.dumps(result))
    return 0 if result.get("ok") else 1


class _Ticket:
    """The parent's view of one forked execution."""

    def __init__(self, job: str):
        self.job = job
        self.pid = None
        self.start = None
        self.started = threading.Event()
        self.exited = threading.Event()
        self.code = None
        self.error = None


class ForkWorker:
    """The parent side of the fork server: start it, submit casts, track pids."""

    def __init__(self, env: dict, log):
        self._env = env
        self._log = log
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._proc = None
        self._tickets: dict[str, _Ticket] = {}
        self._ready = threading.Event()
        self._closed = False

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        boot = (
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "import spell; spell._worker_main()"
        )
        self._ready = threading.Event()
        proc = subprocess.Popen(
            [sys.executable, "-c", boot, here],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
            close_fds=True,
        )
        self._proc = proc
        threading.Thread(
            target=self._read_events,
            args=(proc, self._ready),
            name="spell-api-worker-events",
            daemon=True,
        ).start()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _read_events(self, proc, ready) -> None:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if "ready" in event:
                ready.set()
                continue
            with self._lock:
                ticket = self._tickets.get(event.get("started") or event.get("exited"))
            if ticket is None:
                continue
            if "started" in event:
                ticket.pid, ticket.start = event["pid"], event.get("start")
                ticket.started.set()
            else:
                ticket.code, ticket.error = event.get("code"), event.get("error")
                with self._lock:
                    self._tickets.pop(ticket.job, None)
                ticket.started.set()
                ticket.exited.set()
        proc.wait()
        with self._lock:
            if self._proc is proc:
                self._proc = None
            orphans = list(self._tickets.values())
            self._tickets.clear()
        if orphans and not self._closed:
            self._log.event("worker_stopped", code=proc.returncode)
        for ticket in orphans:
            ticket.error = "execution worker stopped"
            ticket.started.set()
            ticket.exited.set()

    def submit(self, job: str, request: dict) -> _Ticket:
        """Ask the worker to fork one execution; restarts a dead worker first."""
        ticket = _Ticket(job)
        line = (json.dumps(dict(request, job=job)) + "\n").encode()
        # Writing may block until the worker reads; the event reader must not
        # wait for that, so the pipe has its own lock.
        with self._write_lock:
            for _ in range(2):
                with self._lock:
                    if self._proc is None or self._proc.poll() is not None:
                        self._start_locked()
                    proc = self._proc
                    self._tickets[job] = ticket
                try:
                    proc.stdin.write(line)
                    proc.stdin.flush()
                    return ticket
                except (BrokenPipeError, OSError, ValueError):
                    with self._lock:
                        self._tickets.pop(job, None)
                        if self._proc is proc:
                            self._proc = None
        ticket.error = "execution worker unavailable"
        ticket.started.set()
        ticket.exited.set()
        return ticket

    def close(self, timeout: float) -> None:
        """Close the worker's stdin (it stops its children) and wait for it."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Server log ------------------------------------------------------------------


class ApiLog:
    """One JSON line on stderr per request and per execution state change.

    Lines never hold bodies, tokens or headers; ``json.dumps`` escapes control
    characters and non-ASCII, so a hostile path cannot forge a line.
    """

    def __init__(self, settings: ApiSettings):
        self._quiet = settings.quiet
        self._stream = settings.log_stream
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if self._quiet:
            return
        line = json.dumps(dict({"time": iso_now()}, **record)) + "\n"
        stream = self._stream or sys.stderr
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass

    def request(
        self,
        method: str,
        path: str,
        status: int,
        ms: float,
        execution_id: str | None = None,
    ) -> None:
        record = {
            "method": method[:32],
            "path": path[:API_LOG_PATH_MAX_CHARS],
            "status": status,
            "ms": round(ms, 2),
        }
        if execution_id:
            record["execution_id"] = execution_id
        self.write(record)

    def execution(self, row: dict) -> None:
        record = {
            "event": "execution",
            "execution_id": row["execution_id"],
            "status": row["status"],
            "button_id": row["button_id"],
            "tenant_id": row["tenant_id"],
        }
        if row.get("error_code"):
            record["error_code"] = row["error_code"]
        self.write(record)

    def event(self, name: str, **fields) -> None:
        self.write(dict({"event": name}, **fields))


# Limits ----------------------------------------------------------------------


class RateLimiter:
    """Sliding log of accepted POSTs per client address (GETs are not limited)."""

    def __init__(self, window_ms: int, max_requests: int):
        self.window = window_ms / 1000
        self.max = max_requests
        self._lock = threading.Lock()
        self._hits: dict[str, deque] = {}

    def hit(self, client: str) -> None:
        """Record one request, or raise 429 with ``Retry-After`` when over."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits.get(client)
            if hits is None:
                if len(self._hits) >= API_RATE_LIMIT_MAX_CLIENTS:
                    self._forget(now)
                hits = self._hits[client] = deque()
            while hits and now - hits[0] > self.window:
                hits.popleft()
            if len(hits) >= self.max:
                wait = max(1, math.ceil(hits[0] + self.window - now))
                raise ApiError(
                    429,
                    "RATE_LIMITED",
                    "too many requests",
                    [("Retry-After", str(wait))],
                )
            hits.append(now)

    def _forget(self, now: float) -> None:
        for key in [
            k for k, v in self._hits.items() if not v or now - v[-1] > self.window
        ]:
            del self._hits[key]
        while len(self._hits) >= API_RATE_LIMIT_MAX_CLIENTS:
            del self._hits[next(iter(self._hits))]


# Jobs ------------------------------------------------------------------------


def new_execution_id() -> str:
    """``exec_<epoch ms>_<8 hex>``: the API's own id of an execution."""
    return f"exec_{int(time.time() * 1000)}_{random_hex(4)}"


def _runtime_timeout_ms(api_timeout_ms: int, env) -> str | None:
    """The SPELL_RUNTIME_EXECUTION_TIMEOUT_MS to give a cast, or None to keep
    the environment's own when it is already stricter."""
    margin = min(API_RUNTIME_TIMEOUT_MARGIN_MS, api_timeout_ms // 10)
    wanted = max(1, api_timeout_ms - margin)
    current = _js_integer(env.get("SPELL_RUNTIME_EXECUTION_TIMEOUT_MS") or "")
    if current is not None and 0 < current <= wanted:
        return None
    return str(wanted)


class JobRunner:
    """Accepts executions, runs each in the fork server and records its end."""

    def __init__(
        self,
        settings: ApiSettings,
        index: ExecutionIndex,
        log: ApiLog,
        instance: str,
        logs_dir: str,
        retention,
    ):
        self.settings = settings
        self.index = index
        self.log = log
        self.instance = instance
        self.logs_dir = logs_dir
        self._retention = retention
        self._lock = threading.Lock()
        self._in_flight: dict[str, dict] = {}
        self._since: dict[str, float] = {}
        #: Variables every cast gets on top of the server's environment.
        self.extra_env: dict[str, str] = {}
        # One thread per in-flight execution, reused: no thread start on a POST.
        from concurrent.futures import ThreadPoolExecutor  # only the server needs it

        self._pool = ThreadPoolExecutor(
            max_workers=max(1, settings.max_concurrent_executions),
            thread_name_prefix="spell-api-job",
        )
        self._accepting = True
        self._cancelled = False
        env = dict(os.environ)
        for name in API_SECRET_ENV:
            env.pop(name, None)
        self.worker = ForkWorker(env, log)

    def in_flight_count(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def oldest_in_flight_epoch(self) -> float | None:
        """When the oldest queued or running execution was accepted (epoch s)."""
        with self._lock:
            return min(self._since.values()) if self._since else None

    def accept(
        self, button: Button, tenant: str, role: str, merged: dict, dry_run: bool
    ) -> dict:
        """Record a queued execution (on disk before returning) and start it.

        The in-flight limit is checked again here, under the lock, so that
        concurrent requests can never exceed it.
        """
        limit = self.settings.max_concurrent_executions
        with self._lock:
            if not self._accepting or len(self._in_flight) >= limit:
                raise ApiError(
                    429,
                    "CONCURRENCY_LIMITED",
                    f"too many in-flight executions: max {limit}",
                    [("Retry-After", "1")],
                )
            while True:
                row = {
                    "execution_id": new_execution_id(),
                    "button_id": button.button_id,
                    "spell_id": button.spell_id,
                    "version": button.version,
                    "require_signature": int(button.require_signature),
                    "status": "queued",
                    "tenant_id": tenant,
                    "actor_role": role,
                    "created_at": iso_now(),
                    "dry_run": int(dry_run),
                    "server_instance": self.instance,
                }
                try:
                    self.index.insert(row)
                    break
                except self.index.IntegrityError:
                    continue  # 32 random bits met an existing id: draw again
            self._in_flight[row["execution_id"]] = row
            self._since[row["execution_id"]] = time.time()
            self.log.execution(row)
            self._pool.submit(self._run, row, button, merged, dry_run)
        return row

    def _run(self, row: dict, button: Button, merged: dict, dry_run: bool) -> None:
        folder = None
        try:
            folder = tempfile.mkdtemp(prefix="spell-exec-api-")
            self._execute(row, button, merged, dry_run, folder)
        except Exception as exc:  # never leave a job running on a bug
            self._finish(row, "failed", "EXECUTION_FAILED", "execution failed")
            self.log.event(
                "execution_error",
                execution_id=row["execution_id"],
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
            with self._lock:
                self._in_flight.pop(row["execution_id"], None)
                self._since.pop(row["execution_id"], None)
            try:
                self._retention()
            except Exception as exc:
                self.log.event("retention_error", error=f"{type(exc).__name__}: {exc}")

    def _execute(self, row, button, merged, dry_run, folder) -> None:
        settings = self.settings
        opts = {
            "id": button.spell_id,
            "version": button.version,
            "params": [],
            "input": merged,
            "dry_run": dry_run,
            "yes": button.risk,
            "allow_billing": button.billing,
            "require_signature": button.require_signature,
            "allow_unsigned": not button.require_signature,
            "verbose": False,
            "profile": None,
        }
        env = dict(os.environ, **self.extra_env)
        for name in API_SECRET_ENV:
            env.pop(name, None)
        runtime_timeout = _runtime_timeout_ms(settings.execution_timeout_ms, env)
        if runtime_timeout is not None:
            env["SPELL_RUNTIME_EXECUTION_TIMEOUT_MS"] = runtime_timeout
        row.update(status="running", started_at=iso_now())
        self.index.update(
            row["execution_id"], status="running", started_at=row["started_at"]
        )
        self.log.execution(row)
        ticket = self.worker.submit(
            row["execution_id"],
            {
                "opts": opts,
                "dir": folder,
                "env": env,
                "cwd": os.getcwd(),
                "grace_ms": settings.kill_grace_ms,
            },
        )
        timeout_s = settings.execution_timeout_ms / 1000
        grace_s = settings.kill_grace_ms / 1000
        deadline = time.monotonic() + timeout_s
        if ticket.started.wait(timeout_s) and ticket.pid:
            self.index.update(
                row["execution_id"], pid=ticket.pid, proc_start=ticket.start
            )
        timed_out = not ticket.exited.wait(max(0.0, deadline - time.monotonic()))
        if timed_out:
            self._stop(row, ticket, grace_s)
        elif ticket.error:
            # The worker died under the execution: make sure nothing is left.
            stop_execution_processes(
                [row["execution_id"]], [(ticket.pid, ticket.start)], grace_s
            )
        result = self._read_result(folder)
        self._conclude(row, result, folder, timed_out, runtime_timeout)

    def _stop(self, row, ticket, grace_s) -> None:
        """Timeout: SIGTERM the cast, then SIGKILL its group and every marked
        process that is left after the grace period."""
        if ticket.pid and ticket.start and _proc_start_time(ticket.pid) == ticket.start:
            _kill_quietly(ticket.pid, signal.SIGTERM)
        if not ticket.exited.wait(grace_s):
            kill_marked([row["execution_id"]], [(ticket.pid, ticket.start)])
            ticket.exited.wait(grace_s)
        kill_marked([row["execution_id"]])

    def _read_result(self, folder: str) -> dict | None:
        try:
            result = read_json_file(os.path.join(folder, "result.json"), "result")
        except (OSError, ValueError, SpellError):
            return None
        return result if isinstance(result, dict) else None

    def _stderr_tail(self, folder: str) -> str:
        try:
            with open(os.path.join(folder, "stderr.txt"), "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - API_STDERR_TAIL_BYTES))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _load_receipt(self, log_path, tenant: str) -> tuple[str | None, dict | None]:
        """The checked log path and the receipt built from it (None when unusable)."""
        if not isinstance(log_path, str) or not log_path:
            return None, None
        path = os.path.abspath(log_path)
        real_logs = os.path.realpath(self.logs_dir)
        if os.path.dirname(os.path.realpath(path)) != real_logs or not path.endswith(
            ".json"
        ):
            return None, None
        try:
            log = read_json_file(path, "log", limit=LOG_MAX_BYTES)
        except (OSError, ValueError, SpellError, RecursionError):
            return path, None
        if not isinstance(log, dict):
            return path, None
        return path, build_receipt(log, tenant)

    def _conclude(self, row, result, folder, timed_out, runtime_timeout) -> None:
        result = result or {}
        log_path, receipt = self._load_receipt(result.get("log_path"), row["tenant_id"])
        fields = {}
        runtime_id = result.get("execution_id")
        if isinstance(runtime_id, str) and runtime_id:
            fields["runtime_execution_id"] = runtime_id
        if log_path:
            fields["runtime_log_path"] = log_path
        if receipt is not None:
            fields["receipt"] = compact_json(receipt)
        limit = self.settings.execution_timeout_ms
        if self._cancelled:
            status, code, message = (
                "failed",
                "SERVER_RESTARTED",
                "execution interrupted by server shutdown",
            )
        elif timed_out:
            status, code, message = (
                "timeout",
                "EXECUTION_TIMEOUT",
                f"execution exceeded timeout {limit}ms",
            )
        elif result.get("ok"):
            status, code, message = "succeeded", None, "completed"
        else:
            text = result.get("error")
            if not isinstance(text, str) or not text:
                text = self._stderr_tail(folder)
            code, message = map_runtime_error(text)
            status = "timeout" if code == "EXECUTION_TIMEOUT" else "failed"
            if (
                code == "EXECUTION_TIMEOUT"
                and runtime_timeout
                and f"after {runtime_timeout}ms" in message
            ):
                # The cast stopped itself at the limit the API gave it.
                message = f"execution exceeded timeout {limit}ms"
        self._finish(row, status, code, message, **fields)

    def _finish(self, row, status, code, message, **fields) -> None:
        """Record the end of an execution; its processes are gone, so its
        in-flight slot is freed before the row says so."""
        with self._lock:
            self._in_flight.pop(row["execution_id"], None)
            self._since.pop(row["execution_id"], None)
        row.update(
            status=status,
            finished_at=iso_now(),
            error_code=code,
            message=message,
            **fields,
        )
        self.index.update(
            row["execution_id"],
            status=status,
            finished_at=row["finished_at"],
            error_code=code,
            message=message,
            **fields,
        )
        self.log.execution(row)

    def close(self, cancel: bool = False) -> None:
        """Stop accepting; wait for running executions (or stop them) and the worker."""
        with self._lock:
            self._accepting = False
            running = list(self._in_flight)
        if cancel and running:
            self._cancelled = True
            pids = [
                (r.get("pid"), r.get("proc_start"))
                for r in (self.index.get(e) or {} for e in running)
            ]
            stop_execution_processes(running, pids, self.settings.kill_grace_ms / 1000)
        self._pool.shutdown(wait=True)
        self.worker.close(self.settings.kill_grace_ms / 1000 + 5)


# Application -----------------------------------------------------------------


class _HeaderMap:
    """Case-insensitive, first-value-wins view of request headers for tests."""

    def __init__(self, headers=None):
        self._values: dict[str, str] = {}
        for name, value in (
            headers.items() if isinstance(headers, dict) else headers or ()
        ):
            self._values.setdefault(name.lower(), value)

    def get(self, name: str, default=None):
        return self._values.get(name.lower(), default)


def _normalize_path(path: str) -> str:
    """Resolve ``.`` and ``..`` segments (also percent-encoded) as URL parsers do."""
    path = path.replace("\\", "/")
    if "." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        lowered = segment.lower()
        if lowered in (".", "%2e"):
            if last:
                out.append("")
        elif lowered in ("..", ".%2e", "%2e.", "%2e%2e"):
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


class ApiRequest:
    """One request as the application sees it; tests build these directly.

    ``body`` is the raw body for socketless use; the HTTP layer passes a
    ``body_reader(limit)`` instead, so that the body is read only after the
    checks that come before it.
    """

    def __init__(
        self,
        method: str,
        target: str,
        headers=None,
        body: bytes = b"",
        client: str = "127.0.0.1",
        body_reader=None,
    ):
        self.method = method
        self.target = target
        self.headers = (
            headers
            if hasattr(headers, "get") and not isinstance(headers, dict)
            else _HeaderMap(headers)
        )
        self.client = client
        self._body = body
        self._reader = body_reader
        self.body_read = False
        self.execution_id = None
        if not target.startswith("/"):
            parts = urllib.parse.urlsplit(target)
            target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
            if not target.startswith("/"):
                target = "/" + target
        raw_path, _, self.query_string = target.partition("?")
        self.query_string = self.query_string.split("#", 1)[0]
        raw_path = raw_path.split("#", 1)[0]
        self.raw_path = raw_path
        self.path = _normalize_path(raw_path)
        self._query = None

    @property
    def query(self) -> dict:
        """First value of each query parameter (``+`` is a space)."""
        if self._query is None:
            self._query = {}
            for key, value in urllib.parse.parse_qsl(
                self.query_string, keep_blank_values=True, errors="replace"
            ):
                self._query.setdefault(key, value)
        return self._query

    def read_body(self, limit: int) -> bytes:
        """The body, or ``ApiError`` 413 as soon as it passes ``limit`` bytes."""
        self.body_read = True
        if self._reader is not None:
            return self._reader(limit)
        if len(self._body) > limit:
            raise _too_large(limit)
        return self._body


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, "INPUT_TOO_LARGE", f"input payload too large: max {limit} bytes"
    )


class ApiResponse(_Record):
    """Status, headers and body bytes of one answer."""

    _mutable = True

    status: int
    headers: list
    body: bytes
    execution_id: str | None = None

    def json(self):
        return json.loads(self.body)


_JSON_TYPE = "application/json; charset=utf-8"
_API_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
#: The page loads its script from this server and talks only to it.
_PAGE_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]


def json_response(
    status: int, value, headers=(), execution_id=None, *, text: str | None = None
) -> ApiResponse:
    """A JSON answer of ``value``, or of ``text`` when it is already encoded."""
    body = (compact_json(value) if text is None else text).encode("utf-8")
    return ApiResponse(
        status,
        [("Content-Type", _JSON_TYPE), *_API_HEADERS, *headers],
        body,
        execution_id,
    )


def error_response(err: SpellError) -> ApiResponse:
    return json_response(err.http_status, error_body(err), getattr(err, "headers", ()))


#: UI assets, matched on the raw path before the ``/api`` prefix is removed.
UI_ROUTES = {"/": "api_page", "/ui": "api_page", "/ui/app.js": "api_script"}
#: (method, route) -> handler; routes are paths without the optional ``/api``.
API_ROUTES = {
    ("GET", "/health"): "api_health",
    ("GET", "/openapi.json"): "api_openapi",
    ("GET", "/buttons"): "api_list_buttons",
    ("POST", "/spell-executions"): "api_create_execution",
    ("GET", "/spell-executions"): "api_list_executions",
    ("GET", "/spell-executions/{execution_id}"): "api_get_execution",
}
_CREATE_FIELDS = (
    "button_id",
    "dry_run",
    "input",
    "confirmation",
    "actor_role",
    "tenant",
    "tenant_id",
)
_EXECUTION_PREFIX = "/spell-executions/"


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def _host_name(value: str) -> str:
    """The name part of a Host header or an origin's netloc."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class ExecutionApi:
    """The Execution API without sockets: ``handle(ApiRequest) -> ApiResponse``.

    Construction runs the start-up sequence: load the registry, check the auth
    configuration, open the index, recover executions of dead servers (their
    processes are stopped), apply retention and start the fork server.
    """

    def __init__(self, settings: ApiSettings, *, start_worker: bool = True):
        self.settings = settings
        self.log = ApiLog(settings)
        self.registry = load_button_registry(settings.registry_path)
        self.auth = Authenticator(settings.auth_tokens, settings.auth_keys)
        self.store = os.path.abspath(settings.store) if settings.store else store_root()
        for name in STORE_DIRS:
            ensure_dir(os.path.join(self.store, name))
        self.logs_dir = os.path.join(self.store, "logs")
        self._instance = _InstanceLock(self.logs_dir)
        self.index = ExecutionIndex(self.logs_dir)
        self.rate = RateLimiter(
            settings.rate_limit_window_ms, settings.rate_limit_max_requests
        )
        self.jobs = JobRunner(
            settings,
            self.index,
            self.log,
            self._instance.instance,
            self.logs_dir,
            self.retention,
        )
        if settings.store:
            self.jobs.extra_env["SPELL_HOME"] = self.store
        self._retention_lock = threading.Lock()
        self._retention_again = threading.Event()
        self._manifests: dict = {}
        self._manifests_lock = threading.Lock()
        self._closed = False
        self._recover()
        self.retention()
        if start_worker:
            self.jobs.worker.start()

    # Start-up and shutdown ---------------------------------------------------

    def _recover(self) -> None:
        """Executions of a server that is gone: stop their processes, mark them failed."""
        alive: dict = {}
        rows = []
        for row in self.index.unfinished():
            instance = row.get("server_instance")
            if instance not in alive:
                alive[instance] = self._instance.is_alive(instance)
            if not alive[instance]:
                rows.append(row)
        if not rows:
            return
        stop_execution_processes(
            [r["execution_id"] for r in rows],
            [(r.get("pid"), r.get("proc_start")) for r in rows],
            self.settings.kill_grace_ms / 1000,
        )
        now = iso_now()
        for row in rows:
            row.update(
                status="failed",
                finished_at=now,
                error_code="SERVER_RESTARTED",
                message="execution interrupted by server restart",
            )
            self.index.update(
                row["execution_id"],
                status="failed",
                finished_at=now,
                error_code="SERVER_RESTARTED",
                message=row["message"],
            )
            self.log.execution(row)

    def close(self, cancel: bool = False) -> None:
        """Wait for running executions (or stop them with ``cancel``), then release."""
        if self._closed:
            return
        self._closed = True
        self.jobs.close(cancel)
        self.index.close()
        self._instance.release()

    # Retention ---------------------------------------------------------------

    def retention(self) -> None:
        """Apply age and count retention to logs and index rows together.

        Runs once at a time; a request made meanwhile makes the running one
        go round again.  Queued and running executions, and log files written
        since the oldest of them started, are never touched.
        """
        self._retention_again.set()
        while self._retention_again.is_set():
            if not self._retention_lock.acquire(blocking=False):
                return
            try:
                self._retention_again.clear()
                self._retention_pass()
            finally:
                self._retention_lock.release()

    def _is_log_file(self, path) -> bool:
        if not isinstance(path, str) or not path.endswith(".json"):
            return False
        name = os.path.basename(path)
        return (
            name != "index.json"
            and not name.startswith(".")
            and os.path.dirname(os.path.realpath(path))
            == os.path.realpath(self.logs_dir)
        )

    def _retention_pass(self) -> None:
        days, keep = self.settings.log_retention_days, self.settings.log_max_files
        if days <= 0 and keep <= 0:
            return
        now = time.time()
        cutoff = now - days * 86400 if days > 0 else None
        cutoff_iso = None
        if cutoff is not None:
            stamp = time.gmtime(cutoff)
            cutoff_iso = (
                time.strftime("%Y-%m-%dT%H:%M:%S", stamp)
                + f".{int(cutoff * 1000) % 1000:03d}Z"
            )
        doomed = {
            r["execution_id"]: r
            for r in self.index.retention_candidates(cutoff_iso, keep)
        }
        files = []
        try:
            with os.scandir(self.logs_dir) as entries:
                for entry in entries:
                    name = entry.name
                    if (
                        not name.endswith(".json")
                        or name == "index.json"
                        or name[0] == "."
                    ):
                        continue
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(info.st_mode):
                        files.append((info.st_mtime, name, entry.path))
        except OSError:
            files = []
        marked = set()
        if cutoff is not None:
            marked = {path for mtime, _, path in files if mtime < cutoff}
        remaining = sorted((f for f in files if f[2] not in marked), reverse=True)
        if keep > 0:
            marked |= {path for _, _, path in remaining[keep:]}
        since = self.jobs.oldest_in_flight_epoch()
        if since is not None:
            marked -= {path for mtime, _, path in files if mtime >= since - 1}
        for row in self.index.rows_for_logs(marked):
            if row["status"] in IN_FLIGHT_STATES:
                marked.discard(row["runtime_log_path"])
            else:
                doomed[row["execution_id"]] = row
        row_files = {
            r["runtime_log_path"]
            for r in doomed.values()
            if self._is_log_file(r["runtime_log_path"])
        }
        for row in self.index.rows_for_logs(row_files):
            if row["execution_id"] not in doomed:
                row_files.discard(row["runtime_log_path"])
        for path in marked | row_files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.log.event("retention_error", error=str(exc))
        if doomed:
            self.index.delete(doomed)

    # Request handling --------------------------------------------------------

    def handle(self, req: ApiRequest) -> ApiResponse:
        """Answer one request; every failure becomes a JSON error body."""
        try:
            return self._dispatch(req)
        except ApiError as err:
            return error_response(err)
        except Exception as exc:  # a bug: no details leave the server
            if os.environ.get("SPELL_DEBUG") == "1":
                import traceback

                traceback.print_exc()
            self.log.event("internal_error", error=f"{type(exc).__name__}")
            return error_response(ApiError(500, "INTERNAL_ERROR", "internal error"))

    def _dispatch(self, req: ApiRequest) -> ApiResponse:
        self._check_host(req)
        if req.method == "GET" and req.raw_path in UI_ROUTES:
            return getattr(self, UI_ROUTES[req.raw_path])(req, None)
        route = req.path[4:] if req.path.startswith("/api/") else req.path
        context = None
        if route in ("/buttons", "/spell-executions") or route.startswith(
            _EXECUTION_PREFIX
        ):
            context = self.auth.authenticate(req.headers)
        key = (req.method, route)
        if route.startswith(_EXECUTION_PREFIX):
            key = (req.method, _EXECUTION_PREFIX + "{execution_id}")
            req.execution_id = route[len(_EXECUTION_PREFIX) :]
        name = API_ROUTES.get(key)
        if name is None:
            raise ApiError(404, "NOT_FOUND", "route not found")
        return getattr(self, name)(req, context)

    def _check_host(self, req: ApiRequest) -> None:
        """Refuse DNS-rebinding and cross-site requests to a loopback server."""
        if _is_loopback(self.settings.host):
            host = req.headers.get("host")
            if host is not None and not _is_loopback(_host_name(host)):
                raise ApiError(403, "HOST_FORBIDDEN", "host not allowed")
        origin = req.headers.get("origin")
        if origin is not None and req.method not in ("GET", "HEAD"):
            parts = urllib.parse.urlsplit(origin)
            host = req.headers.get("host") or ""
            if parts.netloc.lower() != host.strip().lower():
                raise ApiError(403, "ORIGIN_FORBIDDEN", "cross-origin request refused")

    def api_page(self, req, context) -> ApiResponse:
        return ApiResponse(
            200,
            [("Content-Type", "text/html; charset=utf-8"), *_PAGE_HEADERS],
            RECEIPTS_PAGE_HTML.encode("utf-8"),
        )

    def api_script(self, req, context) -> ApiResponse:
        return ApiResponse(
            200,
            [("Content-Type", "text/javascript; charset=utf-8"), *_PAGE_HEADERS],
            RECEIPTS_PAGE_JS.encode("utf-8"),
        )

    def api_health(self, req, context) -> ApiResponse:
        return json_response(200, {"ok": True})

    def api_openapi(self, req, context) -> ApiResponse:
        return json_response(200, openapi_document())

    def api_list_buttons(self, req, context) -> ApiResponse:
        buttons = []
        for button in self.registry.buttons:
            item = button.public()
            item["manifest"] = self._manifest_view(button)
            buttons.append(item)
        return json_response(
            200, {"ok": True, "version": self.registry.version, "buttons": buttons}
        )

    def _manifest_view(self, button: Button):
        """What the page shows before a launch: the installed manifest's
        risk, billing, effects and permissions (None when not installed)."""
        try:
            folder = os.path.join(
                self.store, "spells", id_key(button.spell_id), button.version
            )
            info = os.stat(os.path.join(folder, "spell.yaml"))
        except (OSError, ValueError):
            return None
        signature = (
            info.st_mtime_ns,
            info.st_size,
            info.st_ino,
            os.path.exists(os.path.join(folder, "spell.sig.json")),
        )
        key = (button.spell_id, button.version)
        with self._manifests_lock:
            cached = self._manifests.get(key)
        if cached and cached[0] == signature:
            return cached[1]
        try:
            m = load_manifest(folder)
            view = (
                None
                if m["id"] != button.spell_id
                else {
                    "name": m["name"],
                    "summary": m["summary"],
                    "risk": m["risk"],
                    "billing": m["billing"],
                    "effects": m["effects"],
                    "permissions": m["permissions"],
                    "runtime": m["runtime"],
                    "signed": signature[3],
                }
            )
        except (SpellError, OSError):
            view = None
        with self._manifests_lock:
            self._manifests[key] = (signature, view)
        return view

    def api_create_execution(self, req, context) -> ApiResponse:
        s = self.settings
        if self.jobs.in_flight_count() >= s.max_concurrent_executions:
            raise ApiError(
                429,
                "CONCURRENCY_LIMITED",
                f"too many in-flight executions: max {s.max_concurrent_executions}",
                [("Retry-After", "1")],
            )
        self.rate.hit(req.client)
        body = parse_request_body(req.read_body(s.body_limit_bytes))
        validate_create_body(body)
        button = self.registry.by_id.get(body["button_id"])
        if button is None:
            raise ApiError(
                404, "BUTTON_NOT_FOUND", f"unknown button_id: {body['button_id']}"
            )
        if context.role is not None:
            role = context.role
        elif "actor_role" in body:
            role = body["actor_role"]
        else:
            role = req.headers.get("x-role")
            role = API_ANONYMOUS_ROLE if role is None else role
        if role not in button.allowed_roles:
            raise ApiError(403, "ROLE_NOT_ALLOWED", f"actor role not allowed: {role}")
        confirmation = body.get("confirmation") or {}
        if button.risk and not js_truthy(confirmation.get("risk_acknowledged")):
            raise ApiError(
                400, "RISK_CONFIRMATION_REQUIRED", "risk confirmation is required"
            )
        if button.billing and not js_truthy(confirmation.get("billing_acknowledged")):
            raise ApiError(
                400, "BILLING_CONFIRMATION_REQUIRED", "billing confirmation is required"
            )
        merged = merge_input(button.defaults, body.get("input", {}))
        if len(compact_json(merged).encode("utf-8")) > s.body_limit_bytes:
            raise _too_large(s.body_limit_bytes)
        row = self.jobs.accept(
            button, context.tenant, role, merged, body.get("dry_run") is True
        )
        return json_response(
            202,
            {
                "ok": True,
                "execution_id": row["execution_id"],
                "tenant_id": row["tenant_id"],
                "status": "queued",
            },
            execution_id=row["execution_id"],
        )

    def api_list_executions(self, req, context) -> ApiResponse:
        query = req.query
        statuses: list[str] = []
        for item in (query.get("status") or "").split(","):
            item = js_trim(item)
            if not item:
                continue
            if item not in EXECUTION_STATES:
                raise ApiError(400, "INVALID_QUERY", f"invalid status filter: {item}")
            if item not in statuses:
                statuses.append(item)
        raw_limit = query.get("limit")
        limit = API_LIST_DEFAULT_LIMIT
        if raw_limit is not None and js_trim(raw_limit):
            limit = _js_integer(raw_limit)
            if limit is None or not 1 <= limit <= API_LIST_MAX_LIMIT:
                raise ApiError(
                    400,
                    "INVALID_QUERY",
                    f"invalid limit: must be integer in range 1-{API_LIST_MAX_LIMIT}",
                )
        button_id = js_trim(query.get("button_id") or "") or None
        tenant = js_trim(query.get("tenant_id") or "") or None
        if tenant is not None and not _NAME_RE.match(tenant):
            raise ApiError(400, "INVALID_QUERY", f"invalid tenant_id filter: {tenant}")
        if context.scoped:
            if tenant is not None and tenant != context.tenant:
                raise ApiError(
                    403, "TENANT_FORBIDDEN", f"tenant query denied: {tenant}"
                )
            tenant = context.tenant
        rows = self.index.list(statuses, button_id, tenant, limit)
        return json_response(
            200,
            None,
            text=plain_json(
                {
                    "ok": True,
                    "filters": {
                        "status": statuses,
                        "button_id": button_id,
                        "tenant_id": tenant,
                        "limit": limit,
                    },
                    "executions": [public_execution(r) for r in rows],
                }
            ),
        )

    def api_get_execution(self, req, context) -> ApiResponse:
        execution_id = req.execution_id
        if not execution_id or not _EXECUTION_ID_RE.match(execution_id):
            raise ApiError(400, "INVALID_EXECUTION_ID", "invalid execution id")
        row = self.index.get(execution_id)
        # A scoped caller cannot tell another tenant's execution from none.
        if row is None or (context.scoped and row["tenant_id"] != context.tenant):
            raise ApiError(404, "EXECUTION_NOT_FOUND", "execution not found")
        # The receipt is stored as the compact JSON it is served as.
        text = (
            f'{{"ok":true,"execution":{plain_json(public_execution(row))},'
            f'"receipt":{row.get("receipt") or "null"}}}'
        )
        return json_response(200, None, execution_id=execution_id, text=text)


def parse_request_body(raw: bytes):
    """The JSON value of a request body; an empty body is ``{}``."""
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, "BAD_REQUEST", f"request body is not valid UTF-8 at byte {exc.start}"
        ) from None
    try:
        return parse_json_text(text)
    except RecursionError:
        raise ApiError(
            400, "BAD_REQUEST", f"JSON nested deeper than {JSON_MAX_DEPTH} levels"
        ) from None
    except ValueError as exc:
        raise ApiError(400, "BAD_REQUEST", str(exc)) from None


def validate_create_body(body) -> None:
    """The body checks of ``POST /api/spell-executions``, in the original's order."""

    def bad(message: str) -> ApiError:
        return ApiError(400, "BAD_REQUEST", message)

    if not isinstance(body, dict):
        raise bad("request body must be an object")
    for key in body:
        if key not in _CREATE_FIELDS:
            raise bad(f"unsupported field in request body: {key}")
    button_id = body.get("button_id")
    if not isinstance(button_id, str) or not js_trim(button_id):
        raise bad("button_id is required")
    if "dry_run" in body and not isinstance(body["dry_run"], bool):
        raise bad("dry_run must be boolean")
    if "input" in body and not isinstance(body["input"], dict):
        raise bad("input must be an object")
    if "confirmation" in body and not isinstance(body["confirmation"], dict):
        raise bad("confirmation must be an object")
    role = body.get("actor_role")
    if "actor_role" in body and (not isinstance(role, str) or not js_trim(role)):
        raise bad("actor_role must be a non-empty string")


# HTTP layer ------------------------------------------------------------------


class _HeadError(Exception):
    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.error = ApiError(status, error_code, message)


class _Watchdog:
    """Shuts down sockets whose request did not arrive by its deadline.

    A per-read socket timeout alone lets a client that sends one byte now and
    then hold a thread forever; this bounds the whole head and the whole body.
    """

    TICK_S = 0.2

    def __init__(self):
        self._lock = threading.Lock()
        self._deadlines: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="spell-api-watchdog", daemon=True
        )
        self._thread.start()

    def arm(self, conn, seconds: float) -> None:
        with self._lock:
            self._deadlines[conn] = time.monotonic() + seconds

    def disarm(self, conn) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.TICK_S):
            now = time.monotonic()
            with self._lock:
                late = [c for c, deadline in self._deadlines.items() if deadline < now]
                for conn in late:
                    del self._deadlines[conn]
            for conn in late:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()


class _ApiRequestHandler:
    """HTTP/1.1 front of ``ExecutionApi``: bounded reads, JSON for every error."""

    protocol_version = "HTTP/1.1"
    server_version = "spell-api"
    sys_version = ""

    def setup(self):
        self.timeout = self.server.app.settings.request_timeout_s
        super().setup()

    def handle_one_request(self):
        app, watchdog = self.server.app, self.server.watchdog
        self._started = None
        self.command, self.path = "-", "-"
        watchdog.arm(self.connection, app.settings.request_timeout_s)
        try:
            head = self._read_head()
        except _HeadError as exc:
            self._started = time.monotonic()
            self.close_connection = True
            self._respond(error_response(exc.error))
            return
        except OSError:  # timeout, reset or shut down by the watchdog
            self.close_connection = True
            return
        finally:
            watchdog.disarm(self.connection)
        if head is None:
            self.close_connection = True
            return
        self._started = time.monotonic()
        self.raw_requestline, rest = head
        self.requestline = ""
        if len(self.raw_requestline.split()) != 3:
            self.request_version = self.default_request_version
            self.close_connection = True
            self._respond(
                error_response(ApiError(400, "BAD_REQUEST", "bad request line"))
            )
            return
        sock_file, self.rfile = self.rfile, _io.BytesIO(rest)
        try:
            parsed = self.parse_request()
        finally:
            self.rfile = sock_file
        if not parsed:
            return
        req = ApiRequest(
            self.command,
            self.path,
            self.headers,
            client=self.client_address[0] if self.client_address else "unknown",
            body_reader=self._read_body,
        )
        response = app.handle(req)
        if (
            self.command == "POST"
            or self.headers.get("content-length")
            or self.headers.get("transfer-encoding")
        ):
            if not req.body_read:
                self._discard_body()
        self._respond(response)

    def _read_head(self):
        """The request line and the header block, or None at end of stream."""
        line = self.rfile.readline(API_REQUEST_LINE_MAX_BYTES + 1)
        while line in (b"\r\n", b"\n"):  # tolerated before a request line
            line = self.rfile.readline(API_REQUEST_LINE_MAX_BYTES + 1)
        if not line:
            return None
        if len(line) > API_REQUEST_LINE_MAX_BYTES:
            raise _HeadError(414, "URI_TOO_LONG", "request line too long")
        lines, total = [], 0
        while True:
            header = self.rfile.readline(API_HEADER_LINE_MAX_BYTES + 1)
            if not header:
                return None
            if len(header) > API_HEADER_LINE_MAX_BYTES:
                raise _HeadError(431, "HEADERS_TOO_LARGE", "header line too long")
            total += len(header)
            if total > API_HEADERS_MAX_BYTES:
                raise _HeadError(431, "HEADERS_TOO_LARGE", "request headers too large")
            if header in (b"\r\n", b"\n"):
                break
            name = header.split(b":", 1)[0]
            if b":" not in header or not name or name != name.strip():
                # No colon, an empty name, or folded or padded names (RFC 9112 5.1).
                raise _HeadError(400, "BAD_REQUEST", "invalid header line")
            lines.append(header)
            if len(lines) > API_HEADERS_MAX_COUNT:
                raise _HeadError(431, "HEADERS_TOO_LARGE", "too many request headers")
        return line, b"".join(lines) + b"\r\n"

    def handle_expect_100(self):
        # Answered only once the body is wanted (see _read_body): a request
        # refused earlier never makes the client send its body.
        return True

    def _body_framing(self):
        """("length", n), ("chunked", None) or ("none", 0); ApiError 400 when unclear."""
        te = self.headers.get_all("transfer-encoding") or []
        lengths = self.headers.get_all("content-length") or []
        if te:
            if lengths or ",".join(te).strip().lower() != "chunked":
                self.close_connection = True
                raise ApiError(400, "BAD_REQUEST", "unsupported transfer-encoding")
            return "chunked", None
        values = {v.strip() for item in lengths for v in item.split(",")}
        if not values:
            return "none", 0
        value = values.pop()
        if values or not value.isdigit() or len(value) > 18:
            self.close_connection = True
            raise ApiError(400, "BAD_REQUEST", "invalid content-length")
        return "length", int(value)

    def _continue(self) -> None:
        if (
            self.headers.get("expect", "").lower() == "100-continue"
            and self.request_version >= "HTTP/1.1"
        ):
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_body(self, limit: int) -> bytes:
        kind, length = self._body_framing()
        watchdog = self.server.watchdog
        if kind == "none":
            return b""
        if kind == "length" and length > limit:
            expects = self.headers.get("expect", "").lower() == "100-continue"
            if expects or length > API_DRAIN_MAX_BYTES or not self._drain(length):
                self.close_connection = True
            raise _too_large(limit)
        self._continue()
        watchdog.arm(self.connection, self.server.app.settings.request_timeout_s)
        try:
            if kind == "length":
                data = self.rfile.read(length)
                if len(data) < length:
                    self.close_connection = True
                    raise ApiError(400, "BAD_REQUEST", "request body is incomplete")
                return data
            return self._read_chunked(limit)
        except OSError:
            self.close_connection = True
            raise ApiError(
                408, "REQUEST_TIMEOUT", "request body not received in time"
            ) from None
        finally:
            watchdog.disarm(self.connection)

    def _read_chunked(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(API_HEADER_LINE_MAX_BYTES + 1)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "BAD_REQUEST", "invalid chunked body") from None
            if size < 0:
                self.close_connection = True
                raise ApiError(400, "BAD_REQUEST", "invalid chunked body")
            if size == 0:
                break
            if len(body) + size > limit:
                self.close_connection = True
                raise _too_large(limit)
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                self.close_connection = True
                raise ApiError(400, "BAD_REQUEST", "request body is incomplete")
            body += chunk
        for _ in range(API_HEADERS_MAX_COUNT):  # trailer section
            trailer = self.rfile.readline(API_HEADER_LINE_MAX_BYTES + 1)
            if trailer in (b"\r\n", b"\n", b""):
                return bytes(body)
        self.close_connection = True
        raise ApiError(400, "BAD_REQUEST", "invalid chunked body")

    def _drain(self, length: int) -> bool:
        """Read and drop ``length`` body bytes in time; False when that failed."""
        watchdog = self.server.watchdog
        watchdog.arm(self.connection, self.server.app.settings.request_timeout_s)
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    return False
                length -= len(chunk)
            return True
        except OSError:
            return False
        finally:
            watchdog.disarm(self.connection)

    def _discard_body(self) -> None:
        """Skip the body of a request answered before it was read."""
        try:
            kind, length = self._body_framing()
        except ApiError:
            self.close_connection = True
            return
        if kind == "chunked" or (
            kind == "length"
            and length > 0
            and (
                self.headers.get("expect", "").lower() == "100-continue"
                or length > API_DRAIN_MAX_BYTES
                or not self._drain(length)
            )
        ):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself (bad request line, version, ...):
        a JSON body like every other error, never an HTML page, never 5xx."""
        codes = {
            400: "BAD_REQUEST",
            408: "REQUEST_TIMEOUT",
            414: "URI_TOO_LONG",
            431: "HEADERS_TOO_LARGE",
        }
        status = code if code in codes else 400
        try:
            text = message or http.HTTPStatus(code).phrase
        except ValueError:
            text = message or "bad request"
        self.close_connection = True
        if self._started is None:
            self._started = time.monotonic()
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = self.default_request_version
        self._respond(error_response(ApiError(status, codes[status], text.lower())))

    def _respond(self, response: ApiResponse) -> None:
        head = [f"HTTP/1.1 {response.status} {http.HTTPStatus(response.status).phrase}"]
        head += [f"{name}: {value}" for name, value in response.headers]
        head.append(f"Content-Length: {len(response.body)}")
        head.append(f"Date: {self.date_time_string()}")
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if self.command != "HEAD":
            data += response.body
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        ms = (time.monotonic() - self._started) * 1000 if self._started else 0.0
        path = self.path.split("?", 1)[0] if isinstance(self.path, str) else "-"
        self.server.app.log.request(
            self.command or "-", path, response.status, ms, response.execution_id
        )

    def log_message(self, format, *args):
        pass  # one JSON line per request is written by _respond


class _ApiHTTPServer:
    """Threaded server with a cap on connections served at once."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, app: ExecutionApi):
        host, port = app.settings.host, app.settings.port
        infos = socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        self.address_family = infos[0][0]
        self.app = app
        self.watchdog = _Watchdog()
        self._slots = threading.BoundedSemaphore(app.settings.max_connections)
        try:
            super().__init__(infos[0][4][:2], _http_classes()[0])
        except BaseException:
            self.watchdog.stop()
            raise

    def server_bind(self):
        # Skips HTTPServer's reverse DNS lookup of the bound address.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            body = compact_json(
                error_body(ApiError(503, "SERVER_BUSY", "too many connections"))
            ).encode()
            try:
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                    + _JSON_TYPE.encode()
                    + f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        if os.environ.get("SPELL_DEBUG") == "1":
            super().handle_error(request, client_address)


_HTTP_CLASSES: list = []  # filled once by _http_classes(); never changed after


def _http_classes() -> tuple[type, type]:
    """The request handler and server classes, built on first use.

    They are ``http.server`` classes with this section's behaviour mixed in
    first.  ``http.server`` pulls in ``http.client``, ``email`` and ``ssl``,
    a good part of this module's import time that only ``spell api`` needs.
    """
    if not _HTTP_CLASSES:
        import http.server

        handler = type(
            "ApiRequestHandler",
            (_ApiRequestHandler, http.server.BaseHTTPRequestHandler),
            {"__doc__": _ApiRequestHandler.__doc__},
        )
        server = type(
            "ApiHTTPServer",
            (_ApiHTTPServer, http.server.ThreadingHTTPServer),
            {"__doc__": _ApiHTTPServer.__doc__},
        )
        _HTTP_CLASSES[:] = [handler, server]
    return _HTTP_CLASSES[0], _HTTP_CLASSES[1]


class ApiServer:
    """A running Execution API: ``.port``, ``.host``, ``.url``, ``.app``, ``.close()``."""

    def __init__(self, app: ExecutionApi, http_server: _ApiHTTPServer):
        self.app = app
        self.http = http_server
        self.host = app.settings.host
        self.port = http_server.server_address[1]
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{name}:{self.port}"
        self._thread = threading.Thread(
            target=http_server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="spell-api-http",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    def close(self, cancel: bool = False) -> None:
        """Stop listening, then wait for running executions (``cancel`` stops them)."""
        if self._closed:
            return
        self._closed = True
        self.http.shutdown()
        self.http.server_close()
        self.http.watchdog.stop()
        self._thread.join()
        self.app.close(cancel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_execution_api_server(**options) -> ApiServer:
    """Start the Execution API in this process (for embedding and tests).

    Options are ``ApiSettings`` fields or the original's camelCase names
    (``registryPath``, ``authKeys``, ...); ``port`` defaults to 0 (ephemeral)
    and ``host`` to 127.0.0.1.  Returns once the socket listens.
    """
    settings = options.pop("settings", None) or api_settings(**options)
    return _serve(settings)


def _serve(settings: ApiSettings) -> ApiServer:
    app = ExecutionApi(settings)
    try:
        http_server = _http_classes()[1](app)
    except OSError as exc:
        app.close()
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        reason = (exc.strerror or str(exc)).lower()
        raise SpellError(
            f"listen {code}: {reason} {settings.host}:{settings.port}"
        ) from None
    except (OverflowError, socket.gaierror) as exc:
        app.close()
        raise SpellError(
            f"listen failed: {settings.host}:{settings.port}: {exc}"
        ) from None
    app.jobs.worker.wait_ready(API_WORKER_READY_TIMEOUT_S)
    return ApiServer(app, http_server)


def cmd_api(args, io) -> int:
    """`spell api`: serve until SIGINT or SIGTERM; a second signal stops running casts."""
    settings = api_settings_from_env(
        io.env, host=args.host, port=args.port, registry=args.registry
    )
    server = _serve(settings)
    host = f"[{server.host}]" if ":" in server.host else server.host
    io.out(f"spell execution api listening on {host}:{server.port}")
    signals = []
    stop = threading.Event()

    def on_signal(signum, frame):
        signals.append(signum)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        while not stop.wait(0.5):
            pass
        closer = threading.Thread(target=server.close, name="spell-api-close")
        closer.start()
        while closer.is_alive():
            closer.join(0.2)
            if len(signals) > 1:
                server.app.jobs.close(cancel=True)
                break
        closer.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# OpenAPI document ------------------------------------------------------------


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict, required=(), extra: bool = False) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": extra,
    }


def _json_content(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {
        400: "Invalid request",
        401: "Missing or invalid token",
        403: "Forbidden (role, tenant, host or origin)",
        404: "Not found",
        408: "Request not received in time",
        413: "Body or merged input too large",
        429: "Rate or concurrency limit (see Retry-After)",
        500: "Internal error",
    }
    return {
        str(code): dict(description=text[code], **_json_content(_ref("Error")))
        for code in codes
    }


def openapi_document() -> dict:
    """The OpenAPI 3.1 description of every route, built fresh on each call.

    Every route below is also served without the ``/api`` prefix; the tests
    validate real responses against these schemas.
    """
    string, boolean = {"type": "string"}, {"type": "boolean"}
    nullable_string = {"type": ["string", "null"]}
    state = {"type": "string", "enum": list(EXECUTION_STATES)}
    manifest = _obj(
        {
            "name": string,
            "summary": string,
            "risk": {"type": "string", "enum": list(RISKS)},
            "billing": _obj(
                {
                    "enabled": boolean,
                    "mode": string,
                    "currency": string,
                    "max_amount": {"type": "number"},
                },
                ("enabled", "mode", "currency", "max_amount"),
            ),
            "effects": {
                "type": "array",
                "items": _obj(
                    {"type": string, "target": string, "mutates": boolean},
                    ("type", "target", "mutates"),
                ),
            },
            "permissions": {
                "type": "array",
                "items": _obj(
                    {"connector": string, "scopes": {"type": "array", "items": string}},
                    ("connector", "scopes"),
                ),
            },
            "runtime": _obj(
                {
                    "execution": string,
                    "platforms": {"type": "array", "items": string},
                    "docker_image": string,
                },
                ("execution", "platforms"),
            ),
            "signed": boolean,
        },
        (
            "name",
            "summary",
            "risk",
            "billing",
            "effects",
            "permissions",
            "runtime",
            "signed",
        ),
    )
    schemas = {
        "Error": _obj(
            {"ok": {"const": False}, "error_code": string, "message": string},
            ("ok", "error_code", "message"),
        ),
        "Health": _obj({"ok": {"const": True}}, ("ok",)),
        "Manifest": dict(
            manifest,
            description=(
                "The installed bundle's manifest as a launch summary; null when the "
                "pinned version is not installed."
            ),
        ),
        "Button": _obj(
            {
                "button_id": string,
                "label": string,
                "description": string,
                "spell_id": string,
                "version": string,
                "defaults": {"type": "object"},
                "required_confirmations": _obj(
                    {"risk": boolean, "billing": boolean}, ("risk", "billing")
                ),
                "require_signature": boolean,
                "allowed_roles": {"type": "array", "items": string, "minItems": 1},
                "manifest": {"oneOf": [_ref("Manifest"), {"type": "null"}]},
            },
            (
                "button_id",
                "label",
                "description",
                "spell_id",
                "version",
                "defaults",
                "required_confirmations",
                "require_signature",
                "allowed_roles",
                "manifest",
            ),
        ),
        "ButtonList": _obj(
            {
                "ok": {"const": True},
                "version": {"const": "v1"},
                "buttons": {"type": "array", "items": _ref("Button")},
            },
            ("ok", "version", "buttons"),
        ),
        "CreateExecution": _obj(
            {
                "button_id": dict(string, minLength=1),
                "dry_run": boolean,
                "input": {
                    "type": "object",
                    "description": "Deep-merged over the defaults",
                },
                "confirmation": {
                    "type": "object",
                    "properties": {
                        "risk_acknowledged": boolean,
                        "billing_acknowledged": boolean,
                    },
                },
                "actor_role": dict(
                    string,
                    minLength=1,
                    description=("Ignored when the key binds a role"),
                ),
                "tenant": {"description": "Accepted and ignored"},
                "tenant_id": {"description": "Accepted and ignored"},
            },
            ("button_id",),
        ),
        "Accepted": _obj(
            {
                "ok": {"const": True},
                "execution_id": {
                    "type": "string",
                    "pattern": "^exec_[0-9]+_[0-9a-f]{8}$",
                },
                "tenant_id": string,
                "status": {"const": "queued"},
            },
            ("ok", "execution_id", "tenant_id", "status"),
        ),
        "ExecutionSummary": _obj(
            {
                "execution_id": string,
                "button_id": string,
                "spell_id": string,
                "version": string,
                "require_signature": boolean,
                "status": state,
                "tenant_id": string,
                "actor_role": string,
                "created_at": string,
                "started_at": string,
                "finished_at": string,
                "error_code": string,
                "message": string,
                "runtime_execution_id": string,
            },
            (
                "execution_id",
                "button_id",
                "spell_id",
                "version",
                "require_signature",
                "status",
                "tenant_id",
                "actor_role",
                "created_at",
            ),
        ),
        "ReceiptStep": _obj(
            {
                "stepName": string,
                "uses": string,
                "started_at": string,
                "finished_at": string,
                "success": boolean,
                "exitCode": {"type": "integer"},
                "message": string,
            }
        ),
        "Receipt": dict(
            _obj(
                {
                    "execution_id": string,
                    "id": string,
                    "version": string,
                    "started_at": string,
                    "finished_at": string,
                    "summary": {"type": "object"},
                    "checks": {
                        "type": "array",
                        "items": _obj(
                            {"type": string, "success": boolean, "message": string},
                            (),
                            True,
                        ),
                    },
                    "steps": {"type": "array", "items": _ref("ReceiptStep")},
                    "success": boolean,
                    "error": string,
                    "tenant_id": string,
                },
                ("steps", "tenant_id"),
            ),
            description=(
                "Sanitized from the cast's log: no input, outputs or raw step output."
            ),
        ),
        "ExecutionList": _obj(
            {
                "ok": {"const": True},
                "filters": _obj(
                    {
                        "status": {"type": "array", "items": state},
                        "button_id": nullable_string,
                        "tenant_id": nullable_string,
                        "limit": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": API_LIST_MAX_LIMIT,
                        },
                    },
                    ("status", "button_id", "tenant_id", "limit"),
                ),
                "executions": {"type": "array", "items": _ref("ExecutionSummary")},
            },
            ("ok", "filters", "executions"),
        ),
        "ExecutionDetail": _obj(
            {
                "ok": {"const": True},
                "execution": _ref("ExecutionSummary"),
                "receipt": {"oneOf": [_ref("Receipt"), {"type": "null"}]},
            },
            ("ok", "execution", "receipt"),
        ),
    }
    secured = [{"bearer": []}, {"apiKey": []}]

    def op(summary, responses, **extra):
        return dict({"summary": summary, "responses": responses}, **extra)

    def ok(description, schema):
        return dict(description=description, **_json_content(schema))

    query = [
        {
            "name": "status",
            "in": "query",
            "schema": string,
            "description": "Comma-separated states",
        },
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": API_LIST_MAX_LIMIT},
        },
        {"name": "button_id", "in": "query", "schema": string},
        {
            "name": "tenant_id",
            "in": "query",
            "schema": dict(string, pattern=_NAME_RE.pattern),
        },
    ]
    paths = {
        "/": {
            "get": op(
                "Receipts page",
                {
                    "200": {
                        "description": "HTML page",
                        "content": {"text/html": {"schema": string}},
                    }
                },
            )
        },
        "/ui/app.js": {
            "get": op(
                "Receipts page script",
                {
                    "200": {
                        "description": "Script",
                        "content": {"text/javascript": {"schema": string}},
                    }
                },
            )
        },
        "/api/health": {"get": op("Liveness", {"200": ok("Alive", _ref("Health"))})},
        "/api/openapi.json": {
            "get": op(
                "This document", {"200": ok("OpenAPI 3.1 document", {"type": "object"})}
            )
        },
        "/api/buttons": {
            "get": op(
                "Button registry",
                dict(
                    {"200": ok("Buttons in registry order", _ref("ButtonList"))},
                    **_errors(401, 500),
                ),
                security=secured,
            )
        },
        "/api/spell-executions": {
            "post": op(
                "Run a button",
                dict(
                    {"202": ok("Accepted and queued", _ref("Accepted"))},
                    **_errors(400, 401, 403, 404, 408, 413, 429, 500),
                ),
                security=secured,
                requestBody={
                    "required": False,
                    **_json_content(_ref("CreateExecution")),
                },
            ),
            "get": op(
                "List executions, newest first",
                dict(
                    {"200": ok("Executions", _ref("ExecutionList"))},
                    **_errors(400, 401, 403, 500),
                ),
                security=secured,
                parameters=query,
            ),
        },
        "/api/spell-executions/{execution_id}": {
            "get": op(
                "One execution and its receipt",
                dict(
                    {"200": ok("Execution", _ref("ExecutionDetail"))},
                    **_errors(400, 401, 404, 500),
                ),
                security=secured,
                parameters=[
                    {
                        "name": "execution_id",
                        "in": "path",
                        "required": True,
                        "schema": dict(string, pattern=_EXECUTION_ID_RE.pattern),
                    }
                ],
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "spell Execution API",
            "version": __version__,
            "description": (
                "Runs registry buttons as spell casts and serves their receipts. Every "
                "/api route is also served without the /api prefix."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


# Receipts page ---------------------------------------------------------------
# Plain HTML and an ES module, no build step.  The script builds every node
# with textContent, so no string from the server is ever parsed as HTML.

RECEIPTS_PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Spell Receipts UI</title>
<style>
:root { --ink: #1d2330; --muted: #5d6675; --line: #d9dee7; --bg: #f4f6f9;
  --card: #fff; --accent: #2f5fd0; --good: #1f7a45; --bad: #b3261e; --wait: #9a6400; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--ink); background: var(--bg); }
header { display: flex; flex-wrap: wrap; gap: 12px 24px; align-items: center;
  padding: 14px 24px; background: var(--ink); color: #fff; }
header h1 { font-size: 19px; margin: 0 auto 0 0; }
header label { font-size: 13px; }
header input { width: 260px; }
main { display: grid; grid-template-columns: minmax(300px, 1fr) minmax(340px, 1.3fr);
  gap: 18px; padding: 18px 24px; }
@media (max-width: 960px) { main { grid-template-columns: 1fr; } }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 16px; min-width: 0; }
h2 { font-size: 16px; margin: 0 0 4px; }
.hint { color: var(--muted); font-size: 13px; margin: 0 0 10px; }
input, select, textarea, button { font: inherit; }
select { max-width: 220px; }
input[type=text], input[type=password], input[type=number], select, textarea {
  border: 1px solid var(--line); border-radius: 5px; padding: 5px 8px; }
textarea { width: 100%; min-height: 110px; font-family: ui-monospace, monospace; font-size: 13px; }
button { border: 1px solid var(--accent); background: var(--accent); color: #fff;
  border-radius: 5px; padding: 5px 12px; cursor: pointer; }
button.quiet { background: transparent; color: var(--accent); }
header button.quiet { color: #fff; border-color: #fff; }
button:disabled { opacity: .5; cursor: not-allowed; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; margin: 8px 0; }
.card.selected { border-color: var(--accent); box-shadow: 0 0 0 2px #2f5fd033; }
.card .title { font-weight: 600; }
.meta { color: var(--muted); font-size: 13px; overflow-wrap: anywhere; }
.pill { display: inline-block; border-radius: 10px; padding: 0 8px; margin: 4px 4px 0 0;
  font-size: 12px; background: #eef1f6; }
.pill.warn { background: #fde9d9; color: #7a3a00; }
.row { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; margin: 8px 0; }
.status { font-weight: 600; text-transform: uppercase; font-size: 12px; letter-spacing: .04em; }
.status.succeeded { color: var(--good); }
.status.failed, .status.timeout { color: var(--bad); }
.status.queued, .status.running { color: var(--wait); }
.exec { display: grid; grid-template-columns: 90px 1fr auto; gap: 4px 10px; align-items: center;
  border-bottom: 1px solid var(--line); padding: 6px 0; }
.message { border-radius: 6px; padding: 8px 10px; margin: 8px 0; font-size: 14px; }
.message.error { background: #fdecea; color: var(--bad); }
.message.info { background: #e8f0fe; color: #173e91; }
.message .tip { display: block; color: var(--ink); margin-top: 4px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; border-bottom: 1px solid var(--line); padding: 4px 6px;
  vertical-align: top; overflow-wrap: anywhere; }
pre { background: #f0f2f6; border-radius: 6px; padding: 8px; overflow: auto; font-size: 12px;
  max-height: 320px; }
dialog { border: 1px solid var(--line); border-radius: 10px; max-width: 560px; width: 92vw; }
dialog::backdrop { background: #0008; }
dialog dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 12px; }
dialog dt { color: var(--muted); }
dialog dd { margin: 0; overflow-wrap: anywhere; }
.wide { grid-column: 1 / -1; }
</style>
</head>
<body>
<header>
  <h1>Spell Receipts UI</h1>
  <label for="apiToken">API key</label>
  <input id="apiToken" type="password" autocomplete="off"
    placeholder="needed when the server has keys">
  <button id="saveToken" type="button" class="quiet">Use key</button>
  <button id="forgetToken" type="button" class="quiet">Forget</button>
  <span id="connection" class="meta" style="color:#cfd6e4"></span>
</header>
<main>
  <section id="buttonsPanel">
    <h2>Buttons</h2>
    <p class="hint">Each button runs one pinned spell from the server's registry.</p>
    <div id="buttons"></div>
  </section>
  <section id="formPanel">
    <h2>Launch</h2>
    <p class="hint">Only the button id, your input and your consent are sent; the server
      decides the rest.</p>
    <form id="runForm" autocomplete="off">
      <div class="row">
        <label for="buttonId">Button</label>
        <input id="buttonId" type="text" readonly placeholder="select a button">
        <button id="clearSelection" type="button" class="quiet">Clear</button>
      </div>
      <div class="row">
        <label for="actorRole">Role</label>
        <input id="actorRole" type="text" value="admin" size="12">
        <label><input id="dryRun" type="checkbox"> dry run</label>
      </div>
      <p id="guardHint" class="hint">Select a button to see what it asks for.</p>
      <p id="roleHint" class="hint">Allowed roles: -</p>
      <label for="inputJson">Input (JSON, merged over the button's defaults)</label>
      <textarea id="inputJson" spellcheck="false">{}</textarea>
      <div class="row">
        <button id="launch" type="submit">Launch</button>
      </div>
    </form>
    <div id="formMessage"></div>
  </section>
  <section id="executionsPanel">
    <h2>Executions</h2>
    <p class="hint">Newest first; refreshes every few seconds.</p>
    <div class="row">
      <label for="executionStatus">Status</label>
      <select id="executionStatus">
        <option value="">all</option>
        <option value="queued">queued</option>
        <option value="running">running</option>
        <option value="succeeded">succeeded</option>
        <option value="failed">failed</option>
        <option value="timeout">timeout</option>
      </select>
      <label for="executionButton">Button</label>
      <select id="executionButton"><option value="">all</option></select>
      <label for="executionLimit">Show</label>
      <input id="executionLimit" type="number" min="1" max="500" value="20" style="width:70px">
    </div>
    <div id="listMessage"></div>
    <div id="executions"></div>
  </section>
  <section id="detailPanel">
    <h2>Receipt</h2>
    <p class="hint">What ran and how it ended. Raw step output never leaves the server.</p>
    <div id="executionDetail"><p class="meta">Select an execution.</p></div>
  </section>
</main>
<dialog id="confirmDialog">
  <form id="confirmForm" method="dialog">
    <h2 id="confirmTitle">Confirm launch</h2>
    <p class="hint">This button asks for your explicit consent. Read what it will do.</p>
    <dl id="confirmSummary"></dl>
    <div id="confirmChecks"></div>
    <div class="row">
      <button id="confirmLaunch" type="button">Launch now</button>
      <button id="confirmCancel" type="button" class="quiet">Cancel</button>
    </div>
  </form>
</dialog>
<script type="module" src="/ui/app.js"></script>
</body>
</html>
"""

RECEIPTS_PAGE_JS = r"""// Receipts page of the spell Execution API. Plain ES module, no build step.
// Every piece of server data reaches the page through textContent, never as HTML.

const TOKEN_KEY = "spell.apiKey";
const REFRESH_MS = 2500;
const TERMINAL = new Set(["succeeded", "failed", "timeout"]);
const TIPS = {
  AUTH_REQUIRED: "This server needs an API key: paste it at the top and press Use key.",
  AUTH_INVALID: "The server refused this key. Check it, or ask for a new one.",
  ROLE_NOT_ALLOWED: "Your role may not run this button. Use a key bound to an allowed role.",
  RISK_CONFIRMATION_REQUIRED: "This button needs an explicit risk acknowledgement.",
  BILLING_CONFIRMATION_REQUIRED: "This button needs an explicit billing acknowledgement.",
  RATE_LIMITED: "Too many launches from here; wait a moment and try again.",
  CONCURRENCY_LIMITED: "The server is running as many executions as it allows; retry shortly.",
  INPUT_TOO_LARGE: "The input is larger than the server accepts; send less data.",
  BUTTON_NOT_FOUND: "The registry no longer has this button; reload the buttons.",
  BAD_REQUEST: "The request was malformed; check the input JSON.",
  TENANT_FORBIDDEN: "Your key can only see its own tenant.",
  CONNECTOR_TOKEN_MISSING: "The server lacks a connector token (CONNECTOR_<NAME>_TOKEN).",
  SIGNATURE_REQUIRED: "The bundle must be signed by a trusted publisher key.",
  INPUT_SCHEMA_INVALID: "The merged input does not match the spell's schema.",
  EXECUTION_TIMEOUT: "The execution ran past the server's time limit and was stopped.",
  STEP_TIMEOUT: "A step ran past its time limit.",
  PLATFORM_UNSUPPORTED: "The spell does not support the server's platform.",
  SERVER_RESTARTED: "The server stopped while this ran; launch it again.",
  NETWORK_ERROR: "The server could not be reached. Is it running?",
  EXECUTION_FAILED: "The cast failed; the receipt below shows the step that failed.",
};

const state = {
  buttons: [],
  executions: [],
  selectedButton: null,
  selectedExecution: null,
  pendingLaunch: null,
};

const $ = (id) => document.getElementById(id);

// Builds an element; children may be nodes or strings (added as text).
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function token() {
  return $("apiToken").value.trim();
}

function makeApiHeaders(withBody) {
  const headers = {};
  const key = token();
  if (key) headers.authorization = `Bearer ${key}`;
  if (withBody) headers["content-type"] = "application/json";
  return headers;
}

// Every call resolves to {status, body}; network and parse failures included.
async function api(path, options = {}) {
  try {
    const response = await fetch(path, options);
    let body;
    try {
      body = await response.json();
    } catch {
      body = { ok: false, error_code: "BAD_RESPONSE", message: `HTTP ${response.status}` };
    }
    const retry = response.headers.get("retry-after");
    if (retry && body && body.ok === false) body.retry_after = retry;
    return { status: response.status, body };
  } catch (error) {
    return {
      status: 0,
      body: { ok: false, error_code: "NETWORK_ERROR", message: String(error.message || error) },
    };
  }
}

function showMessage(target, kind, text, code, retryAfter) {
  const box = $(target);
  box.replaceChildren();
  if (!text) return;
  const message = el("div", { className: `message ${kind}` }, text);
  let tip = code ? TIPS[code] : null;
  if (retryAfter) tip = `${tip || ""} Retry in ${retryAfter} s.`.trim();
  if (tip) message.append(el("span", { className: "tip" }, tip));
  box.append(message);
}

function showError(target, body) {
  const code = body.error_code || "";
  showMessage(target, "error", `${code ? code + ": " : ""}${body.message || "request failed"}`,
    code, body.retry_after);
}

function setConnection(text) {
  $("connection").textContent = text;
}

// Buttons ------------------------------------------------------------------

async function loadButtons() {
  const { body } = await api("/api/buttons", { headers: makeApiHeaders(false) });
  if (body.ok !== true) {
    state.buttons = [];
    renderButtons();
    showError("formMessage", body);
    setConnection(body.error_code === "NETWORK_ERROR" ? "offline" : "key needed");
    return;
  }
  setConnection("connected");
  state.buttons = body.buttons || [];
  if (state.selectedButton) {
    state.selectedButton =
      state.buttons.find((b) => b.button_id === state.selectedButton.button_id) || null;
  }
  renderButtons();
  renderButtonFilter();
  updateGuardHints();
}

function pill(text, warn) {
  return el("span", { className: warn ? "pill warn" : "pill" }, text);
}

function renderButtons() {
  const box = $("buttons");
  box.replaceChildren();
  if (!state.buttons.length) {
    box.append(el("p", { className: "meta" }, "No buttons to show."));
    return;
  }
  for (const button of state.buttons) {
    const m = button.manifest;
    const needs = button.required_confirmations || {};
    const card = el("div", {
      className: "card" + (state.selectedButton === button ? " selected" : ""),
      dataset: { buttonId: button.button_id },
    },
      el("div", { className: "title" }, button.label || button.button_id),
      button.description ? el("div", { className: "meta" }, button.description) : null,
      el("div", { className: "meta" }, `${button.spell_id}@${button.version}`),
      el("div", {},
        pill(`risk: ${m ? m.risk : "unknown"}`, m && (m.risk === "high" || m.risk === "critical")),
        pill(needs.risk ? "asks risk consent" : "no risk consent", needs.risk),
        pill(needs.billing ? "asks billing consent" : "no billing", needs.billing),
        pill(button.require_signature ? "signature required" : "unsigned allowed", false),
        m ? null : pill("not installed", true)),
      el("div", { className: "meta" }, `roles: ${(button.allowed_roles || []).join(", ")}`),
    );
    const select = el("button", { type: "button", className: "quiet select-button" }, "Select");
    select.addEventListener("click", () => selectButton(button));
    card.append(el("div", { className: "row" }, select));
    box.append(card);
  }
}

function renderButtonFilter() {
  const select = $("executionButton");
  const current = select.value;
  select.replaceChildren(el("option", { value: "" }, "all"));
  for (const button of state.buttons) {
    select.append(el("option", { value: button.button_id }, button.label || button.button_id));
  }
  select.value = state.buttons.some((b) => b.button_id === current) ? current : "";
}

function selectButton(button) {
  state.selectedButton = button;
  $("buttonId").value = button ? button.button_id : "";
  $("inputJson").value = "{}";
  $("dryRun").checked = false;
  showMessage("formMessage");
  renderButtons();
  updateGuardHints();
}

function updateGuardHints() {
  const button = state.selectedButton;
  if (!button) {
    $("guardHint").textContent = "Select a button to see what it asks for.";
    $("roleHint").textContent = "Allowed roles: -";
    return;
  }
  const needs = button.required_confirmations || {};
  const asks = [];
  if (needs.risk) asks.push("risk consent");
  if (needs.billing) asks.push("billing consent");
  $("guardHint").textContent =
    (asks.length ? `Asks for ${asks.join(" and ")} before it runs.`
      : "Runs without a consent step.") +
    (button.require_signature ? " Requires a signed bundle." : "");
  $("roleHint").textContent = `Allowed roles: ${(button.allowed_roles || []).join(", ")}`;
}

// Launch -------------------------------------------------------------------

function prepareLaunch(event) {
  event.preventDefault();
  const button = state.selectedButton;
  if (!button) {
    showMessage("formMessage", "error", "Select a button first.");
    return;
  }
  const role = $("actorRole").value.trim() || "anonymous";
  // With a key the server binds the role itself, so only check without one.
  if (!token() && !(button.allowed_roles || []).includes(role)) {
    showMessage("formMessage", "error", `actor role not allowed for selected button: ${role}`,
      "ROLE_NOT_ALLOWED");
    return;
  }
  let input;
  try {
    input = JSON.parse($("inputJson").value || "{}");
  } catch (error) {
    showMessage("formMessage", "error", `The input is not valid JSON: ${error.message}`);
    return;
  }
  if (input === null || typeof input !== "object" || Array.isArray(input)) {
    showMessage("formMessage", "error", "The input must be a JSON object.");
    return;
  }
  const launch = { button, role, input, dryRun: $("dryRun").checked };
  const needs = button.required_confirmations || {};
  if (needs.risk || needs.billing) openConfirmation(launch);
  else submitLaunch(launch, {});
}

function summaryRow(list, label, value) {
  list.append(el("dt", {}, label), el("dd", {}, value));
}

function openConfirmation(launch) {
  const { button } = launch;
  const m = button.manifest;
  const needs = button.required_confirmations || {};
  state.pendingLaunch = launch;
  $("confirmTitle").textContent = `Launch ${button.label || button.button_id}?`;
  const list = $("confirmSummary");
  list.replaceChildren();
  summaryRow(list, "spell", `${button.spell_id}@${button.version}`);
  if (m) {
    summaryRow(list, "name", m.name);
    summaryRow(list, "summary", m.summary);
    summaryRow(list, "risk", m.risk);
    const b = m.billing;
    summaryRow(list, "billing", b.enabled
      ? `${b.mode}, up to ${b.max_amount} ${b.currency}` : "none");
    const effects = el("ul", { id: "confirmEffects" });
    for (const effect of m.effects) {
      effects.append(el("li", {},
        `${effect.type} → ${effect.target}${effect.mutates ? " (changes it)" : " (read only)"}`));
    }
    if (!m.effects.length) effects.append(el("li", {}, "none declared"));
    summaryRow(list, "effects", effects);
    summaryRow(list, "connectors",
      m.permissions.map((p) => `${p.connector} (${p.scopes.join(", ")})`).join("; ") || "none");
    summaryRow(list, "runs on", m.runtime.execution);
  } else {
    summaryRow(list, "manifest", "not installed on the server: the launch will fail");
  }
  summaryRow(list, "mode", launch.dryRun ? "dry run (nothing executes)" : "real run");
  const checks = $("confirmChecks");
  checks.replaceChildren();
  const boxes = [];
  if (needs.risk) {
    boxes.push(["riskAck", `I accept the ${m ? m.risk : "declared"} risk of this spell.`]);
  }
  if (needs.billing) boxes.push(["billingAck", "I accept that this spell may bill."]);
  for (const [id, text] of boxes) {
    const box = el("input", { type: "checkbox", id });
    box.addEventListener("change", updateConfirmButton);
    checks.append(el("div", { className: "row" }, el("label", {}, box, " ", text)));
  }
  updateConfirmButton();
  $("confirmDialog").showModal();
}

function updateConfirmButton() {
  const boxes = $("confirmChecks").querySelectorAll("input[type=checkbox]");
  $("confirmLaunch").disabled = ![...boxes].every((box) => box.checked);
}

function confirmLaunch() {
  const launch = state.pendingLaunch;
  if (!launch) return;
  const risk = $("riskAck");
  const billing = $("billingAck");
  $("confirmDialog").close();
  state.pendingLaunch = null;
  submitLaunch(launch, {
    risk_acknowledged: Boolean(risk && risk.checked),
    billing_acknowledged: Boolean(billing && billing.checked),
  });
}

async function submitLaunch(launch, confirmation) {
  $("launch").disabled = true;
  const payload = {
    button_id: launch.button.button_id,
    dry_run: launch.dryRun,
    input: launch.input,
    confirmation,
  };
  if (!token()) payload.actor_role = launch.role;
  const { body } = await api("/api/spell-executions", {
    method: "POST",
    headers: makeApiHeaders(true),
    body: JSON.stringify(payload),
  });
  $("launch").disabled = false;
  if (body.ok !== true) {
    showError("formMessage", body);
    return;
  }
  showMessage("formMessage", "info", `Accepted as ${body.execution_id}; following it below.`);
  state.selectedExecution = body.execution_id;
  await loadExecutions();
  await loadDetail();
}

// Executions -----------------------------------------------------------------

function listLimit() {
  const field = $("executionLimit");
  let limit = Number.parseInt(field.value, 10);
  if (!Number.isInteger(limit) || limit < 1) limit = 20;
  if (limit > 500) limit = 500;
  field.value = String(limit);
  return limit;
}

async function loadExecutions() {
  const params = new URLSearchParams();
  if ($("executionStatus").value) params.set("status", $("executionStatus").value);
  if ($("executionButton").value) params.set("button_id", $("executionButton").value);
  params.set("limit", String(listLimit()));
  const { body } = await api(`/api/spell-executions?${params}`, {
    headers: makeApiHeaders(false),
  });
  if (body.ok !== true) {
    showError("listMessage", body);
    return;
  }
  showMessage("listMessage");
  state.executions = body.executions || [];
  renderExecutions();
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function renderExecutions() {
  const box = $("executions");
  box.replaceChildren();
  if (!state.executions.length) {
    box.append(el("p", { className: "meta" }, "No executions match."));
    return;
  }
  for (const execution of state.executions) {
    const view = el("button", { type: "button", className: "quiet view-execution" }, "View");
    view.addEventListener("click", () => {
      state.selectedExecution = execution.execution_id;
      loadDetail();
    });
    box.append(el("div", { className: "exec", dataset: { executionId: execution.execution_id } },
      el("span", { className: `status ${execution.status}` }, execution.status),
      el("div", {},
        el("div", {}, execution.button_id),
        el("div", { className: "meta" },
          `${execution.execution_id} · ${when(execution.created_at)}` +
          (execution.error_code ? ` · ${execution.error_code}` : ""))),
      view));
  }
}

async function loadDetail() {
  const id = state.selectedExecution;
  if (!id) return;
  const { body } = await api(`/api/spell-executions/${encodeURIComponent(id)}`, {
    headers: makeApiHeaders(false),
  });
  if (id !== state.selectedExecution) return;
  renderDetail(body);
}

function renderDetail(body) {
  const box = $("executionDetail");
  box.replaceChildren();
  if (body.ok !== true) {
    const holder = el("div", { id: "detailMessage" });
    box.append(holder);
    showError("detailMessage", body);
    return;
  }
  const ex = body.execution;
  box.append(
    el("div", { className: "row" },
      el("span", { id: "detailStatus", className: `status ${ex.status}` }, ex.status),
      el("strong", {}, ex.button_id),
      el("span", { className: "meta" }, `${ex.spell_id}@${ex.version}`)),
    el("div", { className: "meta" },
      `${ex.execution_id} · role ${ex.actor_role} · tenant ${ex.tenant_id}`),
    el("div", { className: "meta" },
      `created ${when(ex.created_at)}` +
      (ex.finished_at ? ` · finished ${when(ex.finished_at)}` : "")),
  );
  if (ex.message && ex.status !== "succeeded") {
    const holder = el("div", { id: "detailMessage" });
    box.append(holder);
    showMessage("detailMessage", TERMINAL.has(ex.status) ? "error" : "info",
      `${ex.error_code ? ex.error_code + ": " : ""}${ex.message}`, ex.error_code);
  } else if (!TERMINAL.has(ex.status)) {
    box.append(el("p", { className: "meta" }, "Still running; this view refreshes by itself."));
  }
  const receipt = body.receipt;
  if (receipt) {
    const steps = el("tbody");
    for (const step of receipt.steps || []) {
      steps.append(el("tr", {},
        el("td", {}, step.stepName), el("td", {}, step.uses),
        el("td", { className: `status ${step.success ? "succeeded" : "failed"}` },
          step.success ? "ok" : "failed"),
        el("td", {}, step.exitCode === undefined ? "" : step.exitCode),
        el("td", {}, step.message || "")));
    }
    box.append(el("h3", {}, "Steps"),
      el("table", { id: "receiptSteps" },
        el("thead", {}, el("tr", {}, el("th", {}, "step"), el("th", {}, "kind"),
          el("th", {}, "result"), el("th", {}, "exit"), el("th", {}, "message"))),
        steps));
    const checks = el("ul", { id: "receiptChecks" });
    for (const check of receipt.checks || []) {
      const mark = check.success ? "✓" : "✗";
      checks.append(el("li", {}, `${mark} ${check.type}: ${check.message}`));
    }
    box.append(el("h3", {}, "Checks"), checks);
    if (receipt.error) box.append(el("p", { className: "message error" }, receipt.error));
  } else if (TERMINAL.has(ex.status)) {
    box.append(el("p", { className: "meta" }, "No receipt was recorded for this execution."));
  }
  box.append(el("details", {}, el("summary", {}, "Raw JSON"),
    el("pre", {}, JSON.stringify(body, null, 2))));
}

// Wiring -------------------------------------------------------------------

function useToken() {
  const key = token();
  if (key) sessionStorage.setItem(TOKEN_KEY, key);
  else sessionStorage.removeItem(TOKEN_KEY);
  refreshAll();
}

function forgetToken() {
  $("apiToken").value = "";
  sessionStorage.removeItem(TOKEN_KEY);
  refreshAll();
}

async function refreshAll() {
  await loadButtons();
  await loadExecutions();
  await loadDetail();
}

async function tick() {
  await loadExecutions();
  const selected = state.executions.find((e) => e.execution_id === state.selectedExecution);
  const shown = $("detailStatus");
  if (state.selectedExecution && (!shown || !TERMINAL.has(shown.textContent) ||
      (selected && selected.status !== shown.textContent))) {
    await loadDetail();
  }
  setTimeout(tick, REFRESH_MS);
}

function start() {
  $("apiToken").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("saveToken").addEventListener("click", useToken);
  $("forgetToken").addEventListener("click", forgetToken);
  $("apiToken").addEventListener("keydown", (event) => {
    if (event.key === "Enter") useToken();
  });
  $("runForm").addEventListener("submit", prepareLaunch);
  $("clearSelection").addEventListener("click", () => selectButton(null));
  $("confirmLaunch").addEventListener("click", confirmLaunch);
  $("confirmCancel").addEventListener("click", () => {
    state.pendingLaunch = null;
    $("confirmDialog").close();
  });
  for (const id of ["executionStatus", "executionButton", "executionLimit"]) {
    $(id).addEventListener("change", loadExecutions);
  }
  updateGuardHints();
  loadButtons().then(() => tick());
}

start();
"""
# Command line ################################################################


class IO:
    """The streams and environment a command works with (tests pass their own)."""

    def __init__(self, stdout, stderr, env=None):
        self.stdout = stdout
        self.stderr = stderr
        self.env = os.environ if env is None else env

    def out(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def err(self, text: str) -> None:
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def warn(self, text: str) -> None:
        self.err("warning: " + escape_text(text))


class _ParserExit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class SpellArgumentParser(argparse.ArgumentParser):
    """argparse that never exits the process and exits 1 on bad arguments."""

    stdout = sys.stdout

    def print_help(self, file=None):
        super().print_help(file or self.stdout)

    def _print_message(self, message, file=None):
        # argparse writes help and --version to sys.stdout; use our stream.
        if message:
            (self.stdout if file is None or file is sys.stdout else file).write(message)

    def exit(self, status=0, message=None):
        if message:
            raise UsageError(message.strip(), self.format_usage())
        raise _ParserExit(status)

    def error(self, message):
        raise UsageError(f"error: {message}", self.format_help())


class _Unbuilt:
    """Stands in for the parser of a command this run will not parse."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


#: Every command name, so ``main`` can build just the parser it needs.
COMMANDS = ("install", "list", "inspect", "cast", "sign", "license", "trust",
            "verify", "policy", "log", "api")


def _command_of(argv: list[str]) -> str | None:
    """The command ``argv`` names, when that alone needs parsing (else None)."""
    for arg in argv:
        if arg == "--" or arg.startswith("-"):
            return None  # an option before the command: parse it all
        return arg if arg in COMMANDS else None
    return None


def build_parser(stdout=None, only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; each command names its handler with ``func``.

    With ``only``, the other commands' parsers are not built (building all of
    them is a good part of a short command's start-up); parsing an argument
    list that names ``only`` gives the same result.
    """

    class Parser(SpellArgumentParser):
        pass

    Parser.stdout = stdout or sys.stdout
    parser = Parser(
        prog="spell",
        description="Minimal runtime for SpellBundle v1",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"spell {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="<command>")

    def command(name, func, help_text, **kw):
        if only and name != only:
            return _Unbuilt()
        sub = commands.add_parser(
            name, help=help_text, description=help_text, allow_abbrev=False, **kw
        )
        sub.set_defaults(func=func, parser=sub)
        return sub

    def group(name, help_text):
        if only and name != only:
            return _Unbuilt(), _Unbuilt()
        sub = commands.add_parser(
            name, help=help_text, description=help_text, allow_abbrev=False
        )
        sub.set_defaults(func=None, parser=sub)
        return sub, sub.add_subparsers(title="commands", metavar="<command>")

    def subcommand(parent, name, func, help_text, **kw):
        if isinstance(parent, _Unbuilt):
            return parent
        sub = parent.add_parser(
            name, help=help_text, description=help_text, allow_abbrev=False, **kw
        )
        sub.set_defaults(func=func, parser=sub)
        return sub

    p = command(
        "install",
        cmd_install,
        "Install a spell bundle from local path or git URL",
        epilog="example: spell install ./my-spell   or   "
        "spell install https://example.com/spells.git#v1.0.0",
    )
    p.add_argument(
        "source", help="Path to local spell bundle or git URL (git requires #<ref>)"
    )

    p = command("list", cmd_list, "List installed spells")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("inspect", cmd_inspect, "Inspect installed spell")
    p.add_argument("id", help="Spell id")
    p.add_argument("--version", help="Specific version")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "cast",
        cmd_cast,
        "Cast a spell",
        epilog="example: spell cast samples/hello --allow-unsigned -p name=world",
    )
    p.add_argument("id", help="Spell id")
    inputs = p.add_argument_group("input")
    inputs.add_argument("--version", help="Specific version")
    inputs.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="key=value",
        help="Input override (repeatable; JSON-typed values, dotted keys)",
    )
    inputs.add_argument("--input", metavar="file", help="Input JSON file")
    guards = p.add_argument_group("guards")
    guards.add_argument(
        "--dry-run", action="store_true", help="Validate and summarize only"
    )
    guards.add_argument(
        "--yes", action="store_true", help="Acknowledge high or critical risk"
    )
    guards.add_argument(
        "--allow-billing", action="store_true", help="Allow billing-enabled spells"
    )
    guards.add_argument(
        "--require-signature",
        action="store_true",
        help="Require verified signature (the default)",
    )
    guards.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="Allow unsigned bundles (overrides signature requirement)",
    )
    output = p.add_argument_group("output")
    output.add_argument(
        "--verbose", action="store_true", help="Show progress and step output on stderr"
    )
    output.add_argument("--profile", metavar="name", help="Reserved for future use")

    _, sign = group("sign", "Create signing keys and sign spell bundles")
    p = subcommand(
        sign, "keygen", cmd_sign_keygen, "Generate an ed25519 keypair for spell signing"
    )
    p.add_argument("publisher", help="Publisher (id prefix before first slash)")
    p.add_argument("--key-id", default="default", help="Key id (default: default)")
    p.add_argument(
        "--out-dir", default=".spell-keys", help="Output folder (default: .spell-keys)"
    )
    p.add_argument("--force", action="store_true", help="Overwrite existing key files")
    p = subcommand(
        sign,
        "bundle",
        cmd_sign_bundle,
        "Create spell.sig.json for a local spell bundle",
    )
    p.add_argument(
        "local_path",
        metavar="local-path",
        help="Path to local bundle containing spell.yaml",
    )
    p.add_argument(
        "--private-key",
        required=True,
        metavar="file",
        help="Ed25519 private key (PKCS#8 PEM)",
    )
    p.add_argument("--key-id", default="default", help="Key id (default: default)")
    p.add_argument("--publisher", help="Publisher (default: the id's prefix)")

    _, lic = group("license", "Manage local entitlement tokens for billing")
    p = subcommand(
        lic, "add", cmd_license_add, "Add or update a local entitlement token"
    )
    p.add_argument("name", help="License label")
    p.add_argument("token", help="Entitlement token")
    subcommand(lic, "list", cmd_license_list, "List local licenses")
    p = subcommand(lic, "remove", cmd_license_remove, "Remove a local license token")
    p.add_argument("name", help="License label")

    _, trust = group("trust", "Manage trusted publisher keys")
    p = subcommand(
        trust, "add", cmd_trust_add, "Add or update a trusted publisher public key"
    )
    p.add_argument("publisher", help="Publisher (id prefix before first slash)")
    p.add_argument(
        "public_key",
        metavar="public-key",
        help="ed25519 public key (spki der) as base64url",
    )
    p.add_argument("--key-id", default="default", help="Key id (default: default)")
    subcommand(trust, "list", cmd_trust_list, "List trusted publishers")
    p = subcommand(
        trust, "remove", cmd_trust_remove, "Remove a trusted publisher (all keys)"
    )
    p.add_argument("publisher", help="Publisher (id prefix before first slash)")

    p = command(
        "verify", cmd_verify, "Verify an installed spell's signature without casting"
    )
    p.add_argument("id", help="Spell id")
    p.add_argument("--version", help="Specific version")
    p.add_argument("--json", action="store_true", help="print JSON")

    _, policy = group("policy", "Show or validate the runtime policy")
    subcommand(policy, "show", cmd_policy_show, "Print the policy in force")
    p = subcommand(policy, "validate", cmd_policy_validate, "Validate a policy file")
    p.add_argument(
        "--file", required=True, metavar="path", help="Policy file to validate"
    )

    p = command("log", cmd_log, "Show execution log")
    p.add_argument(
        "execution_id", metavar="execution-id", help="Execution log file name"
    )

    p = command("api", cmd_api, "Serve the Execution API and the receipts page")
    p.add_argument(
        "--host", help="Address to bind (default: 127.0.0.1 or SPELL_API_HOST)"
    )
    p.add_argument("--port", help="Port (default: 8787 or SPELL_API_PORT)")
    p.add_argument(
        "--registry", help="Button registry file (default: SPELL_BUTTON_REGISTRY_PATH)"
    )

    p = command("help", None, "display help for command")
    p.add_argument("topic", nargs="*", metavar="command")
    p.set_defaults(func=None, help_topic=True)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _use_utf8(*streams) -> None:
    """Write UTF-8 as the original does, even under an ASCII locale."""
    for stream in streams:
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("_", "-")
        if encoding not in ("utf-8", "utf8") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(encoding="utf-8", errors="backslashreplace")
            except (ValueError, OSError):
                pass


def main(argv: list[str] | None = None, *, stdout=None, stderr=None) -> int:
    """Run the command line; return the exit status (0 success, 1 failure)."""
    if stdout is None and stderr is None:
        _use_utf8(sys.stdout, sys.stderr)
    io = IO(stdout or sys.stdout, stderr or sys.stderr)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(io.stdout, only=_command_of(argv))
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            # Name the command concerned, not the top level, in the usage shown.
            target = getattr(args, "parser", None) or parser
            target.error(f"unrecognized arguments: {' '.join(extras)}")
        if getattr(args, "help_topic", False):
            target = parser
            for name in args.topic:  # `spell help trust add` walks the groups
                target = _subparser(target, name)
                if target is None:
                    topic = " ".join(args.topic)
                    raise UsageError(
                        f"error: unknown command '{topic}'", parser.format_help()
                    )
            target.print_help(io.stdout)
            return 0
        func = getattr(args, "func", None)
        if func is None:
            io.stderr.write((getattr(args, "parser", None) or parser).format_help())
            return 1
        return func(args, io) or 0
    except _ParserExit as exc:
        return exc.status
    except UsageError as exc:
        io.stderr.write(exc.message + "\n")
        if exc.usage:
            io.stderr.write("\n" + exc.usage)
        return 1
    except SpellError as exc:
        io.err(escape_text(exc.message))
        return exc.exit_code
    except KeyboardInterrupt:
        io.err("interrupted")
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        path = exc.filename or ""
        io.err(escape_text(node_error(exc, "open", path) if path else str(exc)))
        return 1
    except Exception as exc:  # a bug: one line unless SPELL_DEBUG asks for more
        if os.environ.get("SPELL_DEBUG") == "1":
            import traceback

            traceback.print_exc(file=io.stderr)
        io.err(escape_text(f"internal error: {type(exc).__name__}: {exc}"))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
