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
import hashlib
import json
import os
import re
import secrets
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
YAML_MAX_NODES = 100_000
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
    """A number as JavaScript prints it (``10`` not ``10.0``, ``1e+21``)."""
    return spell_runner.dumps_js(value)


def dump_json(value) -> str:
    """Pretty JSON as the original writes its files: 2 spaces, trailing newline."""
    return spell_runner.dumps_js(value, indent=2) + "\n"


#: Primary collation ranks of printable ASCII in ICU root order (letters
#: case-folded); verified against Node's localeCompare, see docs/compatibility.md.
_LOCALE_ORDER = " _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789abcdefghijklmnopqrstuvwxyz"
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

    value = json.loads(text, parse_constant=reject_constant)
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
    """An OS error in Node's words: ``ENOENT: no such file or directory, open '<p>'``."""
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
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
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


def read_file(path: str, limit: int, what: str, *, follow_symlinks: bool = False) -> bytes:
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


def iso_now() -> str:
    return spell_runner.iso_now()


# Manifest ####################################################################


class YamlTimestamp(str):
    """A YAML timestamp, kept as its ISO string; it is not a manifest string."""


_yaml_loader = None


def _yaml_loader_class():
    """A PyYAML loader with the original's YAML 1.2 core semantics.

    Only ``true``/``false`` (three casings) are booleans, ``010`` is decimal,
    ``0o``/``0x``/``0b`` prefixes work, timestamps are recognised and duplicate
    keys are an error.  Depth, alias uses and expanded size are bounded.
    """
    global _yaml_loader  # a cache of an immutable class, built once
    if _yaml_loader is not None:
        return _yaml_loader
    yaml = require("yaml", "PyYAML")

    class Loader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self._depth = 0
            self._aliases = 0

        def compose_node(self, parent, index):
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

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, "unhashable mapping key", key_node.start_mark
                    ) from None
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicated mapping key '{key}'", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    Loader.yaml_implicit_resolvers = {}
    resolvers = [
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        (
            "int",
            r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+)$",
            "-+0123456789",
        ),
        (
            "float",
            r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
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
    ]
    for name, pattern, first in resolvers:
        Loader.add_implicit_resolver(f"tag:yaml.org,2002:{name}", re.compile(pattern), first)

    def construct_int(loader, node):
        text = loader.construct_scalar(node).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        text = text.lstrip("+-")
        for prefix, base in (("0o", 8), ("0x", 16), ("0b", 2)):
            if text.startswith(prefix):
                return sign * int(text[2:], base)
        return sign * int(text, 10)

    def construct_float(loader, node):
        text = loader.construct_scalar(node).replace("_", "").lower()
        if text.endswith(".inf"):
            return float("-inf") if text.startswith("-") else float("inf")
        if text == ".nan":
            return float("nan")
        return float(text)

    def construct_timestamp(loader, node):
        value = yaml.SafeLoader.construct_yaml_timestamp(loader, node)
        import datetime as _dt

        if not isinstance(value, _dt.datetime):
            value = _dt.datetime(value.year, value.month, value.day)
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return YamlTimestamp(value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z")

    Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    Loader.add_constructor("tag:yaml.org,2002:float", construct_float)
    Loader.add_constructor("tag:yaml.org,2002:timestamp", construct_timestamp)
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
    loader = _yaml_loader_class()(text)
    try:
        try:
            value = loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as exc:
        detail = " ".join(str(exc).split())
        raise ManifestError(f"failed to parse spell.yaml: {detail}") from None
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
    fields = {key: _require_string(raw, key) for key in
              ("id", "version", "name", "summary", "inputs_schema")}
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
        raise ManifestError(f"version must not contain '/' or '\\' or be '.' or '..': {version}")

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
                raise ManifestError(f"permissions[{i}].scopes[{j}] must be a non-empty string")
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
    billing = {"enabled": enabled, "mode": mode, "currency": currency,
               "max_amount": max_amount}

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
        raise ManifestError("runtime.docker_image is required when runtime.execution=docker")

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
        checks.append({"type": check_type, "params": params if isinstance(params, dict) else {}})

    _check_bundle_files(root, fields["inputs_schema"], steps)
    manifest = dict(fields)
    manifest.update(risk=risk, permissions=permissions, effects=effects,
                    billing=billing, runtime=runtime, steps=steps, checks=checks)
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
    return (lowered.startswith("https://") or lowered.startswith("ssh://")
            or _GIT_SCP_RE.match(source) is not None)


def _new_temp_dir(prefix: str) -> str:
    """A private folder under ``<store>/tmp`` (same filesystem as the store)."""
    base = store_path("tmp")
    ensure_dir(base)
    _clean_stale_temp_dirs(base)
    path = os.path.join(base, f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}")
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
    cmd = ["git", "-c", "protocol.ext.allow=never", "-c", "protocol.fd.allow=never",
           "-c", "core.hooksPath=/dev/null", *args]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              env=env, timeout=GIT_TIMEOUT_SECONDS)
    except FileNotFoundError:
        raise InstallError("git executable not found: install git and ensure it is on PATH") from None
    except subprocess.TimeoutExpired:
        raise InstallError(f"{prefix}: git timed out after {GIT_TIMEOUT_SECONDS}s") from None
    except OSError as exc:
        raise InstallError(f"failed to run git command for '{source}': {exc}") from None
    if proc.returncode != 0:
        detail = (proc.stderr.decode("utf-8", "replace").strip()
                  or proc.stdout.decode("utf-8", "replace").strip()
                  or f"git exited with code {proc.returncode}")
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
        _run_git(["-C", target, "remote", "add", "origin", "--", url], source, clone_prefix)
        try:
            _run_git(["-C", target, "fetch", "-q", "--depth", "1", "origin", ref],
                     source, clone_prefix)
        except InstallError:
            _run_git(["-C", target, "fetch", "-q", "origin"], source, clone_prefix)
        _run_git(["-C", target, "-c", "advice.detachedHead=false", "checkout", "-q",
                  ref, "--"], source, clone_prefix)
    else:
        _run_git(["clone", "-q", "--depth", "1", "--branch", ref, "--", url, target],
                 source, clone_prefix)
    commit = _run_git(["-C", target, "rev-parse", "HEAD"], source,
                      f"failed to resolve git commit for '{source}'").strip()
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
            raise InstallError(f"step '{step['name']}' run path must be inside steps/: {step['run']}")
    if len(id_key(manifest["id"])) > NAME_MAX or len(manifest["version"].encode()) > NAME_MAX:
        raise InstallError("id or version is too long to store")


def install_bundle(source: str) -> dict:
    """Install a bundle from a folder or ``<git url>#<ref>``; return its manifest."""
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
                raise InstallError(node_error(exc, "realpath", os.path.abspath(source))) from None
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
        write_atomic(os.path.join(version_stage, "source.json"), dump_json(record), 0o644)
        if not os.path.isdir(id_dir):
            write_atomic(os.path.join(stage, "id", "spell.id.txt"), spell_id + "\n", 0o644)
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


def _read_id_file(path: str) -> str | None:
    try:
        return js_trim(read_file(path, 4096, "spell.id.txt").decode("utf-8", "replace"))
    except OSError:
        return None


def _version_dirs(id_dir: str) -> list[str]:
    try:
        entries = list(os.scandir(id_dir))
    except OSError:
        return []
    return [e.name for e in entries
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]


def resolve_installed(spell_id: str, version: str | None) -> tuple[str, dict]:
    """Find an installed bundle by id and optional version (spec: latest rule)."""
    id_dir = store_path("spells", id_key(spell_id))
    if len(id_key(spell_id)) > NAME_MAX or not os.path.isdir(id_dir):
        raise NotFound(f"spell not installed: {spell_id}")
    stored = _read_id_file(os.path.join(id_dir, "spell.id.txt"))
    if stored is None:
        raise NotFound(f"missing spell.id.txt for {spell_id}")
    if stored != spell_id:
        raise SpellError(f"id mismatch in spell.id.txt: expected '{spell_id}', found '{stored}'")
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
        stored = _read_id_file(os.path.join(entry.path, "spell.id.txt"))
        if stored is None:
            if warn:
                warn(f"skipping {entry.path}: missing spell.id.txt")
            continue
        for version in _version_dirs(entry.path):
            path = os.path.join(entry.path, version)
            try:
                manifest = load_manifest(path)
            except SpellError as exc:
                if warn:
                    warn(f"skipping {path}: {exc.message}")
                continue
            if manifest["id"] != stored:
                if warn:
                    warn(f"skipping {path}: id mismatch under {entry.path}: "
                         f"spell.id.txt='{stored}', spell.yaml.id='{manifest['id']}'")
                continue
            found.append((path, manifest))
    found.sort(key=lambda item: locale_key(item[1]["version"]), reverse=True)
    found.sort(key=lambda item: locale_key(item[1]["id"]))
    return found


def schema_summary(schema) -> tuple[list[str], list[str]]:
    """The (required, "key: type") lists ``inspect`` prints for a schema."""
    if not isinstance(schema, dict):
        return [], []
    required = [r for r in schema.get("required", []) if isinstance(r, str)] \
        if isinstance(schema.get("required"), list) else []
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
        io.out(spell_runner.dumps_js([
            {"id": m["id"], "version": m["version"], "name": m["name"],
             "summary": m["summary"], "risk": m["risk"], "billing": m["billing"],
             "runtime": m["runtime"], "path": path}
            for path, m in bundles
        ], indent=2))
        return 0
    if not bundles:
        io.out("No spells installed")
        return 0
    io.out("id@version\tname\trisk\tbilling.enabled\truntime.execution")
    for _, m in bundles:
        row = [f"{m['id']}@{m['version']}", m["name"], m["risk"],
               "true" if m["billing"]["enabled"] else "false", m["runtime"]["execution"]]
        io.out("\t".join(escape_text(cell) for cell in row))
    return 0


def cmd_inspect(args, io) -> int:
    bundle_dir, m = resolve_installed(args.id, args.version)
    schema = load_schema(bundle_dir, m)
    required, key_types = schema_summary(schema)
    if args.json:
        io.out(spell_runner.dumps_js({
            "id": m["id"], "version": m["version"], "name": m["name"],
            "summary": m["summary"], "risk": m["risk"],
            "inputs": {"required": required, "key_types": key_types},
            "permissions": m["permissions"], "effects": m["effects"],
            "billing": m["billing"], "runtime": m["runtime"], "steps": m["steps"],
            "checks": m["checks"], "path": bundle_dir,
            "source": _read_source_record(bundle_dir),
        }, indent=2))
        return 0
    e = escape_text
    billing, runtime = m["billing"], m["runtime"]
    lines = ["識別", f"  id@version: {e(m['id'])}@{e(m['version'])}", f"  name: {e(m['name'])}",
             f"  summary: {e(m['summary'])}", "供物",
             f"  required: {e(','.join(required)) if required else '(none)'}",
             f"  key types: {e(','.join(key_types)) if key_types else '(none)'}", "鍵穴"]
    lines += [f"  connector={e(p['connector'])} scopes={e(','.join(p['scopes']))}"
              for p in m["permissions"]] or ["  (none)"]
    lines.append("作用")
    lines += [f"  type={e(x['type'])} target={e(x['target'])} "
              f"mutates={'true' if x['mutates'] else 'false'}" for x in m["effects"]]
    lines += ["代償",
              f"  enabled={'true' if billing['enabled'] else 'false'} mode={e(billing['mode'])} "
              f"max_amount={js_number(billing['max_amount'])} currency={e(billing['currency'])}",
              "実行",
              f"  execution={runtime['execution']} "
              f"docker_image={e(runtime.get('docker_image', '-'))} "
              f"platforms={e(','.join(runtime['platforms']))}",
              "封印"]
    lines += [f"  type={c['type']} params={e(spell_runner.dumps_js(c['params']))}"
              for c in m["checks"]]
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


def cmd_sign_keygen(args, io) -> int:
    raise SpellError("sign keygen: not implemented yet")


def cmd_sign_bundle(args, io) -> int:
    raise SpellError("sign bundle: not implemented yet")


def cmd_verify(args, io) -> int:
    raise SpellError("verify: not implemented yet")


# Trust store #################################################################


def cmd_trust_add(args, io) -> int:
    raise SpellError("trust add: not implemented yet")


def cmd_trust_list(args, io) -> int:
    raise SpellError("trust list: not implemented yet")


def cmd_trust_remove(args, io) -> int:
    raise SpellError("trust remove: not implemented yet")


# Entitlements and licences ###################################################


def cmd_license_add(args, io) -> int:
    raise SpellError("license add: not implemented yet")


def cmd_license_list(args, io) -> int:
    raise SpellError("license list: not implemented yet")


def cmd_license_remove(args, io) -> int:
    raise SpellError("license remove: not implemented yet")


# Policy ######################################################################


def cmd_policy_show(args, io) -> int:
    raise SpellError("policy show: not implemented yet")


def cmd_policy_validate(args, io) -> int:
    raise SpellError("policy validate: not implemented yet")


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
    input_max = parse_js_integer(env.get("SPELL_RUNTIME_INPUT_MAX_BYTES"),
                                 "SPELL_RUNTIME_INPUT_MAX_BYTES", 1, DEFAULT_INPUT_MAX_BYTES)
    execution = parse_js_integer(env.get("SPELL_RUNTIME_EXECUTION_TIMEOUT_MS"),
                                 "SPELL_RUNTIME_EXECUTION_TIMEOUT_MS", 0, 0)
    step = parse_js_integer(env.get("SPELL_RUNTIME_STEP_TIMEOUT_MS"),
                            "SPELL_RUNTIME_STEP_TIMEOUT_MS", 1, DEFAULT_STEP_TIMEOUT_MS)
    return {"input_max_bytes": input_max, "execution_timeout_ms": execution or None,
            "step_timeout_ms": step}


def execution_id_for(spell_id: str, version: str, now: float | None = None) -> str:
    """A unique execution id in the original's shape (docs/compatibility.md).

    ``<UTC YYYYMMDDTHHMMSS><milliseconds>Z_<id>_<version>_<4 hex>.json``: the
    milliseconds and the random suffix keep two casts apart even within one
    millisecond; the log file is also created exclusively.
    """
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"
    return f"{stamp}_{sanitize(spell_id)}_{sanitize(version)}_{secrets.token_hex(2)}.json"


# Input ---------------------------------------------------------------------


def _read_input_file(path: str, limit: int):
    absolute = os.path.abspath(path)
    try:
        value = read_json_file(absolute, "--input file",
                               limit=max(limit * INPUT_FILE_FACTOR, 1024 * 1024))
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

_DRAFT7_IDS = ("http://json-schema.org/draft-07/schema", "https://json-schema.org/draft-07/schema")


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
        return ["must NOT have additional properties"] * max(1, _count_additional(error))
    if kind in ("dependencies", "dependentRequired") and isinstance(value, dict):
        for prop, deps in value.items():
            if isinstance(deps, list) and error.message.endswith(f" is a dependency of {prop!r}"):
                noun = "property" if len(deps) == 1 else "properties"
                return [f"must have {noun} {', '.join(map(str, deps))} when property "
                        f"{prop} is present"]
    if kind in ("additionalItems", "items") and value is False and isinstance(parent, dict):
        tuple_items = parent.get("items" if kind == "additionalItems" else "prefixItems")
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
        return ["must be " + (",".join(value) if isinstance(value, list) else str(value))]
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if kind in bounds:
        return [f"must be {bounds[kind]} {js_number(value)}"]
    counted = {"minLength": ("fewer", "characters"), "maxLength": ("more", "characters"),
               "minItems": ("fewer", "items"), "maxItems": ("more", "items"),
               "minProperties": ("fewer", "properties"),
               "maxProperties": ("more", "properties")}
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
    properties = parent.get("properties") if isinstance(parent.get("properties"), dict) else {}
    patterns = parent.get("patternProperties")
    patterns = list(patterns) if isinstance(patterns, dict) else []
    return sum(1 for key in instance
               if key not in properties and not any(re.search(p, key) for p in patterns))


# The common subset, checked without jsonschema ---------------------------------
#
# Importing jsonschema costs more than the rest of a cast's start-up together,
# and most input schemas use a handful of keywords. A schema made only of
# those (and well formed) is checked here, with jsonschema's semantics, error
# order and paths; anything else goes to jsonschema. tests/test_cast.py
# compares the two on random schemas.

_FAST_DIALECTS = ("https://json-schema.org/draft/2020-12/schema", *_DRAFT7_IDS)
_FAST_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
_FAST_BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">",
                "exclusiveMaximum": "<"}
_FAST_COUNTS = {"minLength": ("string", "fewer", "characters"),
                "maxLength": ("string", "more", "characters"),
                "minItems": ("array", "fewer", "items"), "maxItems": ("array", "more", "items"),
                "minProperties": ("object", "fewer", "properties"),
                "maxProperties": ("object", "more", "properties")}
_FAST_TEXT = ("title", "description", "$comment", "format")
_FAST_FLAGS = ("readOnly", "writeOnly", "deprecated")


def _is_type(value, kind: str) -> bool:
    """jsonschema's type test (booleans are not numbers; 1.0 is an integer)."""
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return kind == "number" or isinstance(value, int) or value.is_integer()
    return {"string": str, "object": dict, "array": list, "boolean": bool,
            "null": type(None)}[kind] is type(value)


def _json_equal(one, two) -> bool:
    """Equality as JSON Schema means it: ``true`` is not ``1``, ``1`` is ``1.0``."""
    if isinstance(one, str) or isinstance(two, str):
        return one == two
    if isinstance(one, list) and isinstance(two, list):
        return len(one) == len(two) and all(map(_json_equal, one, two))
    if isinstance(one, dict) and isinstance(two, dict):
        return one.keys() == two.keys() and all(_json_equal(one[k], two[k]) for k in one)
    if isinstance(one, bool) or isinstance(two, bool):
        return type(one) is type(two) and one == two
    return type(one) not in (list, dict) and type(two) not in (list, dict) and one == two


def _fast_schema(schema, root: bool) -> bool:
    """True when ``schema`` is a well-formed schema of the common subset."""
    if not isinstance(schema, dict):
        return False
    for key, value in schema.items():
        if key == "$schema":
            if not root or not isinstance(value, str) or value.rstrip("#") not in [
                    d.rstrip("#") for d in _FAST_DIALECTS]:
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
            if not kinds or any(k not in _FAST_TYPES for k in kinds) \
                    or len(set(kinds)) != len(kinds):
                return False
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value) \
                    or len(set(value)) != len(value):
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
            if not isinstance(value, dict) or not all(_fast_schema(v, False)
                                                      for v in value.values()):
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
    """Errors of ``value`` against a ``_fast_schema`` schema, as jsonschema orders them."""
    errors: list[str] = []
    where = _pointer(path)
    is_object, is_array = isinstance(value, dict), isinstance(value, list)
    for key, rule in schema.items():
        if key == "type":
            kinds = rule if isinstance(rule, list) else [rule]
            if not any(_is_type(value, k) for k in kinds):
                errors.append(f"{where} must be {','.join(kinds)}")
        elif key == "required" and is_object:
            errors += [f"{where} must have required property '{name}'"
                       for name in rule if name not in value]
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
            failed = {"minimum": value < rule, "maximum": value > rule,
                      "exclusiveMinimum": value <= rule, "exclusiveMaximum": value >= rule}[key]
            if failed:
                errors.append(f"{where} must be {_FAST_BOUNDS[key]} {js_number(rule)}")
        elif key in _FAST_COUNTS:
            kind, word, unit = _FAST_COUNTS[key]
            if _is_type(value, kind):
                too_few = key.startswith("min")
                if (len(value) < rule) if too_few else (len(value) > rule):
                    errors.append(f"{where} must NOT have {word} than {js_number(rule)} {unit}")
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
        raise CastError(f"schema is invalid: data{where if where != '/' else ''} {exc.message}")
    registry = referencing.Registry(retrieve=refuse)
    return cls(schema, registry=registry)


def _schema_errors(schema: dict, value) -> list[str]:
    if _fast_schema(schema, True):
        return _fast_errors(schema, value)
    validator = _schema_validator(schema)
    try:
        return [f"{_pointer(e.absolute_path)} {message}"
                for e in validator.iter_errors(value) for message in _ajv_messages(e)]
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
        errors = _run_bounded(lambda: _schema_errors(schema, value),
                              SCHEMA_VALIDATION_TIMEOUT_S)
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
    import selectors

    chunks, deadline = [], time.monotonic() + timeout_s
    with os.fdopen(read_fd, "rb", buffering=0) as handle, \
            selectors.DefaultSelector() as selector:
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

_ARCH_NAMES = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64",
               "armv7l": "arm", "armv6l": "arm", "i386": "ia32", "i686": "ia32",
               "x86": "ia32", "ppc64le": "ppc64", "s390x": "s390x", "riscv64": "riscv64",
               "loongarch64": "loong64"}


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
    lines = ["=== Execution Summary ===",
             f"id@version: {e(manifest['id'])}@{e(manifest['version'])}",
             f"risk: {manifest['risk']}", "effects:"]
    lines += [f"  - type={e(x['type'])}, target={e(x['target'])}, "
              f"mutates={'true' if x['mutates'] else 'false'}"
              for x in manifest["effects"]] or ["  - none"]
    lines.append("permissions:")
    lines += [f"  - connector={e(p['connector'])}, scopes={e(','.join(p['scopes']))}"
              for p in manifest["permissions"]] or ["  - none"]
    billing, runtime = manifest["billing"], manifest["runtime"]
    lines.append(f"billing: enabled={'true' if billing['enabled'] else 'false'}, "
                 f"mode={e(billing['mode'])}, max_amount={js_number(billing['max_amount'])}, "
                 f"currency={e(billing['currency'])}")
    lines.append(f"runtime: execution={runtime['execution']}, "
                 f"docker_image={e(runtime.get('docker_image', '-'))}")
    return "\n".join(lines)


# Redaction -----------------------------------------------------------------


def secret_values(env, input_obj=None) -> list[str]:
    """Values to mask everywhere: secret env values and secret-keyed inputs.

    Longest first, so a secret that contains another is masked whole.
    """
    found = set()
    for name, value in env.items():
        if (_SECRET_ENV_RE.search(name) and not name.startswith(_BENIGN_ENV_PREFIXES)
                and js_trim(value)):
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
    return sorted((v for v in found if len(v) >= SECRET_MIN_LENGTH), key=len, reverse=True)


def redact_text(text: str, secrets_list: list[str]) -> str:
    for value in secrets_list:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _BEARER_RE.sub(lambda m: m.group(1) + REDACTED, text)
    return _TOKEN_LIKE_RE.sub(REDACTED, text)


def redact(value, secrets_list: list[str]):
    """A redacted copy: secret-named keys masked whole, secrets masked in text."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY_RE.search(str(k)) else redact(v, secrets_list)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets_list) for v in value]
    if isinstance(value, str):
        return redact_text(value, secrets_list)
    return value


# The cast ------------------------------------------------------------------


def _new_log(execution_id: str, started_at: str, spell_id: str, version: str) -> dict:
    return {
        "execution_id": execution_id, "started_at": started_at, "finished_at": started_at,
        "id": spell_id, "version": version, "input": {},
        "summary": {"risk": "low",
                    "billing": {"enabled": False, "mode": "none", "currency": "USD",
                                "max_amount": 0},
                    "runtime": {"execution": "host", "platforms": []},
                    "license": {"licensed": False}},
        "steps": [], "outputs": {}, "checks": [], "success": False,
    }


def write_log(log: dict, secrets_list: list[str]) -> str:
    """Write the redacted log under a name no other cast has taken; return its path.

    The file is written beside its final name and hard-linked into place, so
    it appears whole and never replaces another cast's log.
    """
    ensure_store_dirs()
    logs = store_path("logs")
    tmp = os.path.join(logs, f".{secrets.token_hex(8)}.tmp")
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
                log["execution_id"] = log["execution_id"][:-9] + f"{secrets.token_hex(2)}.json"
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _cast_options(args) -> dict:
    return {"id": args.id, "version": args.version, "params": list(args.param or []),
            "input_file": args.input, "dry_run": args.dry_run, "yes": args.yes,
            "allow_billing": args.allow_billing,
            "require_signature": args.require_signature,
            "allow_unsigned": args.allow_unsigned, "verbose": args.verbose,
            "profile": args.profile}


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
    log = _new_log(execution_id_for(opts["id"], requested_version or "latest"), started_at,
                   opts["id"], requested_version or "latest")
    secrets_list = secret_values(env)
    outcome = {"ok": False, "execution_id": None, "log_path": None, "error": None,
               "error_code": None}
    restore = _trap_sigterm()
    try:
        _cast_pipeline(opts, io, log, env, secrets_list)
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
    finally:
        restore()
    secrets_list = secret_values(env, log.get("input"))
    log["finished_at"] = iso_now()
    log["error"] = message
    outcome.update(error=redact_text(message, secrets_list), error_code=code,
                   execution_id=log["execution_id"])
    try:
        outcome["log_path"] = write_log(log, secrets_list)
    except OSError as exc:
        io.warn(f"could not write the execution log: {exc}")
    io.err(escape_text(outcome["error"]))
    return outcome


def _trap_sigterm():
    """Turn SIGTERM into KeyboardInterrupt while a cast runs, so steps are stopped."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _cast_pipeline(opts: dict, io, log: dict, env, secrets_list: list) -> None:
    limits = runtime_limits(env)
    bundle_dir, manifest = resolve_installed(opts["id"], opts.get("version"))
    log["execution_id"] = execution_id_for(manifest["id"], manifest["version"])
    log["id"], log["version"] = manifest["id"], manifest["version"]
    log["summary"] = {"risk": manifest["risk"], "billing": manifest["billing"],
                      "runtime": manifest["runtime"], "license": {"licensed": False}}

    publisher = publisher_from_id(manifest["id"])
    policy = load_policy()
    reason = policy and evaluate_policy(policy, publisher, manifest["risk"],
                                        manifest["runtime"]["execution"])
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
        raise CastError(f"merged input is {size} bytes, exceeds "
                        f"SPELL_RUNTIME_INPUT_MAX_BYTES={limits['input_max_bytes']}")
    log["input"] = merged
    validate_input(load_schema(bundle_dir, manifest), merged)

    try:
        result = verify_bundle(manifest, bundle_dir)
    except (SpellError, OSError, ValueError) as exc:
        text = exc.message if isinstance(exc, SpellError) else str(exc)
        result = {"ok": False, "status": "invalid", "publisher": publisher, "message": text}
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
        result = run_in_docker(manifest, bundle_dir, merged, limits, docker, env, io,
                               verbose=bool(opts.get("verbose")))
    else:
        result = _run_on_host(manifest, bundle_dir, merged, limits, env, io,
                              verbose=bool(opts.get("verbose")))
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


def _run_on_host(manifest: dict, bundle_dir: str, merged: dict, limits: dict, env, io,
                 *, verbose: bool) -> dict:
    import tempfile

    workdir = tempfile.mkdtemp(prefix="spell-input-")  # 0700
    try:
        input_path = os.path.join(workdir, "input.json")
        fd = os.open(input_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(spell_runner.dumps_js(merged).encode("utf-8"))
        plan = {"bundle_dir": bundle_dir, "steps": manifest["steps"],
                "checks": manifest["checks"], "input": merged, "input_path": input_path,
                "env": step_environment(env), "step_timeout_ms": limits["step_timeout_ms"],
                "execution_timeout_ms": limits["execution_timeout_ms"]}
        on_event = _progress_printer(io, secret_values(env, merged)) if verbose else None
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
    pids = parse_js_integer(env.get("SPELL_DOCKER_PIDS_LIMIT"), "SPELL_DOCKER_PIDS_LIMIT",
                            0, DEFAULT_PIDS_LIMIT)
    memory = js_trim(env.get("SPELL_DOCKER_MEMORY", ""))
    if memory and not _MEMORY_RE.match(memory):
        raise DockerError("SPELL_DOCKER_MEMORY must be a positive integer optionally "
                          "suffixed with b, k, m, or g")
    cpus = js_trim(env.get("SPELL_DOCKER_CPUS", ""))
    if cpus:
        # float() alone would take "1_5", "nan" or other scripts' digits.
        value = float(cpus) if _DECIMAL_RE.match(cpus) else float("nan")
        if not (value > 0 and value != float("inf")):
            raise DockerError("SPELL_DOCKER_CPUS must be a number > 0")
    return {"image": image, "network": network, "user": user, "read_only": read_only == "1",
            "pids_limit": pids, "memory": memory, "cpus": cpus}


def _tmpfs_owner(user: str) -> str:
    """``,uid=U,gid=G`` for a numeric ``--user``, so that user can write the copy."""
    match = re.match(r"^([0-9]+)(?::([0-9]+))?$", user)
    if not match:
        return ""  # the image's default user (or a named one) owns nothing special
    uid, gid = match.group(1), match.group(2) or match.group(1)
    return f",uid={uid},gid={gid}"


def docker_run_args(settings: dict, bundle_dir: str, share_dir: str, name: str,
                    passed_env: list[str], *, events: bool) -> list[str]:
    """The ``docker run`` argument list; environment values never appear in it."""
    for path in (bundle_dir, share_dir):
        if "," in path or ":" in path:
            raise DockerError(f"cannot mount a path holding ',' or ':': {path}")
    args = ["run", "--rm", "--pull", "never", "--name", name,
            "--network", settings["network"], "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "--tmpfs", f"/tmp:{TMP_TMPFS}",
            "--tmpfs", f"{CONTAINER_WORKDIR}:{WORKDIR_TMPFS}{_tmpfs_owner(settings['user'])}",
            "--workdir", CONTAINER_BUNDLE,
            "-v", f"{bundle_dir}:{CONTAINER_BUNDLE}:ro",
            "-v", f"{share_dir}:{CONTAINER_INPUT_DIR}:ro",
            "-e", f"INPUT_JSON={CONTAINER_INPUT_DIR}/input.json"]
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
    args += ["--", settings["image"], "spell-runner", "--plan",
             f"{CONTAINER_INPUT_DIR}/plan.json"]
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
    if "cannot connect to the docker daemon" in lowered or "error during connect" in lowered \
            or "is the docker daemon running" in lowered:
        return DockerError(f"docker daemon is not reachable: {text}")
    if "no such image" in lowered or "unable to find image" in lowered \
            or "pull access denied" in lowered:
        return DockerError(f"docker image not found: {image} (build it locally; "
                           f"see docs/docker.md)")
    if code in (126, 127) or "executable file not found" in lowered:
        return DockerError(f"docker image {image} cannot run spell-runner "
                           f"(put spell_runner.pyz on its PATH; see docs/docker.md): {text}")
    return DockerError(text or f"docker exited with code {code}")


def _docker_cleanup(name: str, client_env: dict) -> None:
    """Kill and remove the container (``rm -f`` does both); errors are ignored."""
    try:
        subprocess.run(["docker", "rm", "-f", name], env=client_env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=DOCKER_CLEANUP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        pass


def run_in_docker(manifest: dict, bundle_dir: str, merged: dict, limits: dict,
                  settings: dict, env, io, *, verbose: bool) -> dict:
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
    name = f"spell-{secrets.token_hex(8)}"
    proc = None
    try:
        share = os.path.join(workdir, "share")
        os.mkdir(share, 0o755)
        os.chmod(share, 0o755)  # the container's uid must read it
        plan = {"bundle_dir": CONTAINER_BUNDLE, "workdir_copy_to": CONTAINER_WORKDIR,
                "steps": manifest["steps"], "checks": manifest["checks"], "input": merged,
                "input_path": f"{CONTAINER_INPUT_DIR}/input.json", "env": {},
                "step_timeout_ms": limits["step_timeout_ms"],
                "execution_timeout_ms": timeout_ms}
        for filename, value in (("input.json", merged), ("plan.json", plan)):
            write_atomic(os.path.join(share, filename), spell_runner.dumps_js(value), 0o644)
        args = docker_run_args(settings, bundle_dir, share, name, sorted(passed),
                               events=verbose)
        on_event = _progress_printer(io, secret_values(env, merged)) if verbose else None
        if verbose:
            io.err(f"[spell] starting docker execution in {escape_text(settings['image'])}")
        try:
            proc = subprocess.Popen(["docker", *args], env=client_env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise DockerError("docker not found: install docker and ensure it is on PATH") \
                from None
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
        if limit is not None:
            def expire():
                timer_fired.set()
                _docker_cleanup(name, client_env)

            timer = threading.Timer(max(0.0, limit - (time.monotonic() - started)), expire)
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
        "stepResults": result.get("stepResults") if isinstance(result.get("stepResults"), list)
        else [],
        "outputs": result.get("outputs") if isinstance(result.get("outputs"), dict) else {},
        "checks": result.get("checks") if isinstance(result.get("checks"), list) else [],
    }
    if not normalised["success"]:
        error = result.get("error")
        normalised["error"] = error if isinstance(error, str) and error else "docker spell failed"
    return normalised


# Execution API ###############################################################


def cmd_api(args, io) -> int:
    raise SpellError("api: not implemented yet")


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

    def exit(self, status=0, message=None):
        if message:
            raise UsageError(message.strip(), self.format_usage())
        raise _ParserExit(status)

    def error(self, message):
        raise UsageError(f"error: {message}", self.format_help())


def build_parser(stdout=None) -> argparse.ArgumentParser:
    """The whole command line; each command names its handler with ``func``."""

    class Parser(SpellArgumentParser):
        pass

    Parser.stdout = stdout or sys.stdout
    parser = Parser(prog="spell", description="Minimal runtime for SpellBundle v1",
                    allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"spell {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="<command>")

    def command(name, func, help_text, **kw):
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  allow_abbrev=False, **kw)
        sub.set_defaults(func=func, parser=sub)
        return sub

    def group(name, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  allow_abbrev=False)
        sub.set_defaults(func=None, parser=sub)
        return sub, sub.add_subparsers(title="commands", metavar="<command>")

    def subcommand(parent, name, func, help_text, **kw):
        sub = parent.add_parser(name, help=help_text, description=help_text,
                                allow_abbrev=False, **kw)
        sub.set_defaults(func=func, parser=sub)
        return sub

    p = command("install", cmd_install, "Install a spell bundle from local path or git URL",
                epilog="example: spell install ./my-spell   or   "
                       "spell install https://example.com/spells.git#v1.0.0")
    p.add_argument("source", help="Path to local spell bundle or git URL (git requires #<ref>)")

    p = command("list", cmd_list, "List installed spells")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("inspect", cmd_inspect, "Inspect installed spell")
    p.add_argument("id", help="Spell id")
    p.add_argument("--version", help="Specific version")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("cast", cmd_cast, "Cast a spell",
                epilog="example: spell cast samples/hello --allow-unsigned -p name=world")
    p.add_argument("id", help="Spell id")
    inputs = p.add_argument_group("input")
    inputs.add_argument("--version", help="Specific version")
    inputs.add_argument("-p", "--param", action="append", default=[], metavar="key=value",
                        help="Input override (repeatable; JSON-typed values, dotted keys)")
    inputs.add_argument("--input", metavar="file", help="Input JSON file")
    guards = p.add_argument_group("guards")
    guards.add_argument("--dry-run", action="store_true",
                        help="Validate and summarize only")
    guards.add_argument("--yes", action="store_true", help="Acknowledge high or critical risk")
    guards.add_argument("--allow-billing", action="store_true",
                        help="Allow billing-enabled spells")
    guards.add_argument("--require-signature", action="store_true",
                        help="Require verified signature (the default)")
    guards.add_argument("--allow-unsigned", action="store_true",
                        help="Allow unsigned bundles (overrides signature requirement)")
    output = p.add_argument_group("output")
    output.add_argument("--verbose", action="store_true",
                        help="Show progress and step output on stderr")
    output.add_argument("--profile", metavar="name", help="Reserved for future use")

    _, sign = group("sign", "Create signing keys and sign spell bundles")
    p = subcommand(sign, "keygen", cmd_sign_keygen, "Generate an ed25519 keypair for spell signing")
    p.add_argument("publisher", help="Publisher (id prefix before first slash)")
    p.add_argument("--key-id", default="default", help="Key id (default: default)")
    p.add_argument("--out-dir", default=".spell-keys", help="Output folder (default: .spell-keys)")
    p.add_argument("--force", action="store_true", help="Overwrite existing key files")
    p = subcommand(sign, "bundle", cmd_sign_bundle, "Create spell.sig.json for a local spell bundle")
    p.add_argument("local_path", metavar="local-path",
                   help="Path to local bundle containing spell.yaml")
    p.add_argument("--private-key", required=True, metavar="file",
                   help="Ed25519 private key (PKCS#8 PEM)")
    p.add_argument("--key-id", default="default", help="Key id (default: default)")
    p.add_argument("--publisher", help="Publisher (default: the id's prefix)")

    _, lic = group("license", "Manage local entitlement tokens for billing")
    p = subcommand(lic, "add", cmd_license_add, "Add or update a local entitlement token")
    p.add_argument("name", help="License label")
    p.add_argument("token", help="Entitlement token")
    subcommand(lic, "list", cmd_license_list, "List local licenses")
    p = subcommand(lic, "remove", cmd_license_remove, "Remove a local license token")
    p.add_argument("name", help="License label")

    _, trust = group("trust", "Manage trusted publisher keys")
    p = subcommand(trust, "add", cmd_trust_add, "Add or update a trusted publisher public key")
    p.add_argument("publisher", help="Publisher (id prefix before first slash)")
    p.add_argument("public_key", metavar="public-key",
                   help="ed25519 public key (spki der) as base64url")
    p.add_argument("--key-id", default="default", help="Key id (default: default)")
    subcommand(trust, "list", cmd_trust_list, "List trusted publishers")
    p = subcommand(trust, "remove", cmd_trust_remove, "Remove a trusted publisher (all keys)")
    p.add_argument("publisher", help="Publisher (id prefix before first slash)")

    p = command("verify", cmd_verify, "Verify an installed spell's signature without casting")
    p.add_argument("id", help="Spell id")
    p.add_argument("--version", help="Specific version")
    p.add_argument("--json", action="store_true", help="print JSON")

    _, policy = group("policy", "Show or validate the runtime policy")
    subcommand(policy, "show", cmd_policy_show, "Print the policy in force")
    p = subcommand(policy, "validate", cmd_policy_validate, "Validate a policy file")
    p.add_argument("--file", required=True, metavar="path", help="Policy file to validate")

    p = command("log", cmd_log, "Show execution log")
    p.add_argument("execution_id", metavar="execution-id", help="Execution log file name")

    p = command("api", cmd_api, "Serve the Execution API and the receipts page")
    p.add_argument("--host", help="Address to bind (default: 127.0.0.1 or SPELL_API_HOST)")
    p.add_argument("--port", help="Port (default: 8787 or SPELL_API_PORT)")
    p.add_argument("--registry", help="Button registry file (default: SPELL_BUTTON_REGISTRY_PATH)")

    p = command("help", None, "display help for command")
    p.add_argument("topic", nargs="?", metavar="command")
    p.set_defaults(func=None, help_topic=True)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def main(argv: list[str] | None = None, *, stdout=None, stderr=None) -> int:
    """Run the command line; return the exit status (0 success, 1 failure)."""
    io = IO(stdout or sys.stdout, stderr or sys.stderr)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(io.stdout)
    try:
        args = parser.parse_args(argv)
        if getattr(args, "help_topic", False):
            target = _subparser(parser, args.topic) if args.topic else parser
            if target is None:
                raise UsageError(f"error: unknown command '{args.topic}'", parser.format_help())
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
