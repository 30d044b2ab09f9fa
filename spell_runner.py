"""Step engine of spell: shell and http steps, templating, outputs and checks.

One engine serves two callers. ``spell.py`` imports it for host-mode casts, and
the same file is packed as ``spell_runner.pyz`` and run as ``spell-runner``
inside the hardened docker container. The host has already validated the
manifest and the input, so this module needs neither YAML nor JSON Schema; it
takes a *plan* (a JSON object, see ``run_plan``) and returns a result object in
the shape the host logs verbatim.

Standard library only, Python >= 3.10.

Where this differs from spell-runtime 1.2.5 on purpose (see
``docs/compatibility.md``):

- a failed run keeps the earlier step results, the failing step's own record
  and the outputs gathered so far; a thrown check keeps the checks before it;
- shell steps get stdin from /dev/null, run in their own process group, and
  nothing they start outlives the step (group kill, child subreaper, sweep of
  adopted orphans); a timeout is reported on time;
- captured output is bounded (head and tail kept, the cut is marked) and is
  decoded as a whole, so multi-byte characters are never split at read
  boundaries;
- templating looks up own keys only, substitutes every token in one pass and
  never expands an inserted value again;
- ``jsonpath_equals`` compares objects and arrays by value, and http steps and
  the ``http_status`` check have a bounded timeout.

Known limitations:

- the sweep after a step kills every child of this process that is outside
  this process's session, appeared while the step ran and is not another live
  step; a caller that starts children in new sessions from other threads
  during a step must not rely on them surviving;
- without /proc (not Linux) only the step's process group is killed; a
  descendant that called ``setsid()`` can then survive;
- redirects follow urllib's rules: a 307/308 answer to a method other than
  GET or HEAD is not followed and counts as the final status.
"""

from __future__ import annotations

import codecs
import errno
import functools
import json
import math
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

__all__ = [
    "UNDEFINED",
    "PlanError",
    "StepError",
    "dumps_js",
    "evaluate_checks",
    "iso_now",
    "js_string",
    "main",
    "render_template",
    "resolve_output_ref",
    "run_plan",
]

# Limits and defaults ##################################################################

#: Bytes kept from the start and from the end of each output stream of a shell
#: step. Half a MiB each keeps logs readable and memory small even for a step
#: that prints hundreds of megabytes; the middle is dropped and counted.
OUTPUT_HEAD_BYTES = 512 * 1024
OUTPUT_TAIL_BYTES = 512 * 1024

#: Characters of stdout/stderr kept in a step result (``stdout_head``).
RESULT_HEAD_CHARS = 200

#: What masked text reads (the host's redaction marker).
REDACTED = "[REDACTED]"

#: Defaults used when the plan leaves the value out.
DEFAULT_STEP_TIMEOUT_MS = 60_000
DEFAULT_HTTP_TIMEOUT_MS = 30_000

#: An http step definition is a small JSON object; 1 MiB is far beyond any real
#: one and stops a hostile bundle from making the runner read a huge file.
HTTP_STEP_FILE_MAX_BYTES = 1024 * 1024

#: Response bodies become outputs and land in the execution log; 10 MiB is
#: generous for an API answer and bounds memory and log size.
HTTP_RESPONSE_MAX_BYTES = 10 * 1024 * 1024

#: A response body parsed as JSON becomes an output that the host walks
#: recursively (redaction) and, in docker mode, reads back inside the result
#: with a depth limit of its own; deeper bodies are kept as text. Real API
#: answers are a few levels deep.
RESPONSE_JSON_MAX_DEPTH = 100

#: The plan carries the input (capped by the host, 64 KiB by default but
#: configurable) and the step environment; 64 MiB leaves room for both.
PLAN_MAX_BYTES = 64 * 1024 * 1024

#: Size of one read from a step's pipe (the default Linux pipe buffer size).
READ_CHUNK_BYTES = 64 * 1024

#: ``output`` events carry whole lines; a longer line is sent in pieces of this
#: many characters.
EVENT_LINE_MAX_CHARS = 64 * 1024

#: How often to look for the step's exit when no pidfd is available.
EXIT_POLL_S = 0.02

#: After the step is over and its processes are killed, how long to keep
#: reading what is left in the pipes. Writers are dead by then, so EOF comes at
#: once; the bound only matters if a writer escaped the kill.
DRAIN_GRACE_S = 0.5

#: Bound for killing and reaping the step's leftover processes.
REAP_GRACE_S = 2.0

#: How often the clean-up after a step starts over when signal handlers keep
#: interrupting it (see ``_uninterrupted``).
CLEANUP_ATTEMPTS = 20

#: Extra wait for the http worker thread beyond the socket timeout, so a
#: request that times out in the socket reports its own error first.
HTTP_JOIN_GRACE_S = 0.05

#: Longest single wait handed to select(), join() or a socket. Timeouts are
#: plain integers with no upper bound, and the OS calls overflow past a few
#: weeks; longer waits are made in several rounds.
MAX_WAIT_S = 86_400.0

#: Linux prctl option that makes this process adopt orphaned descendants
#: (<linux/prctl.h>).
PR_SET_CHILD_SUBREAPER = 36

USAGE = "usage: spell-runner --plan <plan.json>"

# Errors ###############################################################################


class StepError(Exception):
    """A step or check failure whose ``message`` is the user-facing error text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PlanError(ValueError):
    """The plan handed to ``run_plan`` is not shaped as documented."""


class _Undefined:
    """The JavaScript value ``undefined``: a missing value, distinct from null."""

    _instance: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED = _Undefined()

# JavaScript-compatible formatting #####################################################

#: Characters ``JSON.stringify`` leaves raw that are escaped here: lone
#: surrogates (not encodable), DEL and the C1 controls (a terminal may act on
#: U+009B, the one-byte CSI, when `spell log` prints a log). The JSON text
#: stays equal in value.
_RAW_UNSAFE = re.compile("[\x7f-\x9f\ud800-\udfff]")


class _EndMarker:
    """Marks an exhausted iterator in the iterative walks below."""


_END = _EndMarker()


def _js_number(value: int | float) -> str:
    """Format a number the way JavaScript's ``Number.prototype.toString`` does.

    Python ints below 1e21 are printed exactly (JavaScript would have rounded
    them to a double first); larger ones and floats follow the ECMAScript
    algorithm on the shortest round-trip digits, which ``repr`` provides.
    """
    if isinstance(value, int):
        if abs(value) < 10**21:
            return str(value)
        try:
            value = float(value)
        except OverflowError:
            return "Infinity" if value > 0 else "-Infinity"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = int_part + frac_part
    # value == 0.<digits> * 10**point
    point = len(int_part) + (int(exponent) if exponent else 0)
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    count = len(digits)
    if count <= point <= 21:
        return sign + digits + "0" * (point - count)
    if 0 < point <= 21:
        return sign + digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return sign + "0." + "0" * -point + digits
    power = point - 1
    suffix = "e" + ("+" if power >= 0 else "-") + str(abs(power))
    if count == 1:
        return sign + digits + suffix
    return sign + digits[0] + "." + digits[1:] + suffix


def _js_quote(text: str) -> str:
    """Quote a string as ``JSON.stringify`` does, escaping ``_RAW_UNSAFE`` too."""
    quoted = json.dumps(text, ensure_ascii=False)
    if _RAW_UNSAFE.search(quoted):
        quoted = _RAW_UNSAFE.sub(lambda m: "\\u%04x" % ord(m.group()), quoted)
    return quoted


def _js_key(key: Any) -> str:
    """Property name for a dict key; JSON object keys are always strings."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return js_string(key)
    raise TypeError(
        f"keys must be str, int, float, bool or None, not {type(key).__name__}"
    )


def _scalar_json(value: Any) -> str:
    """JSON text of a non-container value."""
    if value is None or value is UNDEFINED:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _js_quote(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "null"
        return _js_number(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps_js(value: Any, *, indent: int | None = None) -> str:
    """Serialise ``value`` as JavaScript's ``JSON.stringify(value, null, indent)`` does.

    Compact without spaces when ``indent`` is None or 0; otherwise one member
    per line, with empty objects and arrays kept as ``{}`` and ``[]``. Numbers
    use JavaScript's formatting (``1.0`` -> ``1``, ``1e+21``), NaN and infinities
    become ``null``, non-ASCII text is not escaped (except DEL, the C1
    controls and lone surrogates, written as ``\\uXXXX``), dict order is kept,
    and ``UNDEFINED`` members of a dict are left out (in a list they become
    ``null``; at the top level the result is ``null``). Tuples are arrays.

    The walk is iterative, so any nesting depth works without RecursionError.
    """
    pad = " " * min(indent, 10) if indent and indent > 0 else ""
    colon = ": " if pad else ":"
    out: list[str] = []
    # Each frame: [iterator of members, closing bracket, is_object, members so far]
    stack: list[list[Any]] = []

    def begin(item: Any) -> None:
        if isinstance(item, dict):
            members = [(k, v) for k, v in item.items() if v is not UNDEFINED]
            if not members:
                out.append("{}")
                return
            out.append("{")
            stack.append([iter(members), "}", True, 0])
        elif isinstance(item, (list, tuple)):
            if not item:
                out.append("[]")
                return
            out.append("[")
            stack.append([iter(item), "]", False, 0])
        else:
            out.append(_scalar_json(item))

    begin(value)
    while stack:
        frame = stack[-1]
        depth = len(stack)
        member = next(frame[0], _END)
        if member is _END:
            stack.pop()
            if pad:
                out.append("\n" + pad * (depth - 1))
            out.append(frame[1])
            continue
        if frame[3]:
            out.append(",")
        frame[3] += 1
        if pad:
            out.append("\n" + pad * depth)
        if frame[2]:
            key, item = member
            out.append(_js_quote(_js_key(key)) + colon)
        else:
            item = member
        begin(item)
    return "".join(out)


def js_string(value: Any) -> str:
    """Convert ``value`` to text as JavaScript's ``String(value)`` does.

    ``None`` -> ``"null"``, ``UNDEFINED`` -> ``"undefined"``, booleans ->
    ``"true"``/``"false"``, numbers in JavaScript form, dicts ->
    ``"[object Object]"``, lists -> items joined by ``","`` with null and
    undefined items as empty text (nested lists are joined the same way).
    """
    if not isinstance(value, (list, tuple)):
        return _js_string_scalar(value)
    # Iterative join: a stack of (iterator, parts) for nested lists.
    stack: list[tuple[Any, list[str]]] = [(iter(value), [])]
    while True:
        iterator, parts = stack[-1]
        item = next(iterator, _END)
        if item is _END:
            stack.pop()
            joined = ",".join(parts)
            if not stack:
                return joined
            stack[-1][1].append(joined)
        elif isinstance(item, (list, tuple)):
            stack.append((iter(item), []))
        elif item is None or item is UNDEFINED:
            parts.append("")
        else:
            parts.append(_js_string_scalar(item))


def _js_string_scalar(value: Any) -> str:
    """``String(value)`` for anything but an array."""
    if value is None:
        return "null"
    if value is UNDEFINED:
        return "undefined"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return _js_number(value)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "[object Object]"
    return str(value)


def _js_equal(left: Any, right: Any) -> bool:
    """Deep equality of JSON values: numbers by value, booleans never numbers."""
    pending = [(left, right)]
    while pending:
        a, b = pending.pop()
        if isinstance(a, bool) or isinstance(b, bool):
            if a is not b:
                return False
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if a != b:
                return False
        elif isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                return False
            pending.extend((a[key], b[key]) for key in a)
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            if len(a) != len(b):
                return False
            pending.extend(zip(a, b))
        elif isinstance(a, str) and isinstance(b, str):
            if a != b:
                return False
        elif not (a is b and (a is None or a is UNDEFINED)):
            return False
    return True


def iso_now() -> str:
    """Current UTC time as ISO-8601 with milliseconds: ``2026-01-02T03:04:05.678Z``."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _parse_json_text(text: str) -> Any:
    """Parse JSON as ``JSON.parse`` would: NaN and Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"Unexpected token {name} in JSON")

    return json.loads(text, parse_constant=refuse)


# Templating ###########################################################################

#: JavaScript's whitespace (regex ``\\s`` and ``trim``). Python's own set also
#: holds the control characters 0x1c-0x1f, which JavaScript does not count.
_JS_SPACE = (
    "\t\n\v\f\r \u00a0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_SPACES = "[" + re.escape(_JS_SPACE) + "]*"
_TOKEN = re.compile(
    r"\{\{" + _SPACES + r"(INPUT|ENV)\.([A-Za-z0-9_.-]+)" + _SPACES + r"\}\}"
)
_ANY_BRACES = re.compile(r"\{\{[^}]+\}\}")
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
#: Stands for an inserted value when looking for leftover ``{{...}}`` text, so
#: that braces inside inserted values are never taken for template syntax.
_INSERTED = "\x00"


def _lookup_path(base: Any, path: str) -> Any:
    """Follow a dot path through own dict keys and list indices; else UNDEFINED."""
    current = base
    for segment in path.split("."):
        if isinstance(current, dict):
            if segment not in current:
                return UNDEFINED
            current = current[segment]
        elif isinstance(current, list):
            if not _ARRAY_INDEX.fullmatch(segment) or int(segment) >= len(current):
                return UNDEFINED
            current = current[int(segment)]
        else:
            return UNDEFINED
    return current


def _resolve_token(match: re.Match[str], input_obj: dict, env: dict) -> Any:
    """Value of one ``{{INPUT.x}}``/``{{ENV.X}}`` token, or StepError if unresolved."""
    scope, path = match.group(1), match.group(2)
    if scope == "INPUT":
        value = _lookup_path(input_obj, path)
    else:
        value = env.get(path, UNDEFINED)
    if value is UNDEFINED:
        raise StepError(f"unresolved template: {{{{{scope}.{path}}}}}")
    return value


def _render_string(text: str, input_obj: dict, env: dict) -> Any:
    """Resolve the tokens of one string; a string that is one token keeps the type."""
    whole = _TOKEN.fullmatch(text)
    if whole:
        return _resolve_token(whole, input_obj, env)
    result: list[str] = []
    skeleton: list[str] = []
    last = 0
    for match in _TOKEN.finditer(text):
        value = _resolve_token(match, input_obj, env)
        literal = text[last : match.start()]
        result.append(literal)
        skeleton.append(literal)
        result.append(value if isinstance(value, str) else dumps_js(value))
        skeleton.append(_INSERTED)
        last = match.end()
    result.append(text[last:])
    skeleton.append(text[last:])
    rendered = "".join(result)
    if _ANY_BRACES.search("".join(skeleton)):
        raise StepError(f"unresolved template: {rendered}")
    return rendered


def render_template(value: Any, input_obj: dict, env: dict) -> Any:
    """Resolve ``{{INPUT.path}}`` and ``{{ENV.NAME}}`` tokens in a JSON value.

    Strings are resolved, lists element-wise, dicts value-wise (keys are kept
    literally); other scalars pass through. A string that is exactly one token
    becomes the resolved value with its type. In other strings every token is
    replaced in one pass, strings as they are and other values as compact JSON;
    inserted text is never expanded again. Raises ``StepError`` with
    ``unresolved template: ...`` for a token that does not resolve or for
    leftover ``{{...}}`` text. Tokens are resolved depth-first in document
    order, so the first bad token is the one reported.
    """
    if isinstance(value, str):
        return _render_string(value, input_obj, env)
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else [None] * len(value)
    stack = [(_members(value), root)]
    while stack:
        members, target = stack[-1]
        for key, item in members:
            if isinstance(item, (dict, list)):
                child: Any = {} if isinstance(item, dict) else [None] * len(item)
                target[key] = child
                stack.append((_members(item), child))
                break
            if isinstance(item, str):
                target[key] = _render_string(item, input_obj, env)
            else:
                target[key] = item
        else:
            stack.pop()
    return root


def _members(container: dict | list) -> Any:
    """Iterator of (key, value) pairs of a dict or (index, item) of a list."""
    if isinstance(container, dict):
        return iter(list(container.items()))
    return iter(enumerate(container))


# Output references ####################################################################

_OUTPUT_REF = re.compile(r"step\.([^.]+)\.(stdout|json)(?:\.(.+))?")


def resolve_output_ref(ref: str, outputs: dict) -> Any:
    """Value named by ``step.<name>.stdout`` or ``step.<name>.json[.<dot path>]``.

    A missing dot path gives ``UNDEFINED``. Raises ``StepError`` for a
    malformed reference, a missing output, or a sub-path on stdout.
    """
    match = _OUTPUT_REF.fullmatch(ref)
    if not match:
        raise StepError(f"invalid output reference: {ref}")
    name, kind, sub_path = match.groups()
    key = f"step.{name}.{kind}"
    if key not in outputs:
        raise StepError(f"output reference not found: {ref}")
    if sub_path is None:
        return outputs[key]
    if kind == "stdout":
        raise StepError(f"stdout reference does not support nested path: {ref}")
    return _lookup_path(outputs[key], sub_path)


# Process control ######################################################################

#: Pids of the shell steps running now in this process. The orphan sweep is
#: process-wide (orphans are adopted by the process, not by a thread), so it
#: must know every live step to leave it alone.
_LIVE_STEPS: set[int] = set()
_LIVE_STEPS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _become_subreaper() -> bool:
    """Ask Linux to re-parent orphaned descendants to this process; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class _ProcInfo:
    """The fields of /proc/<pid>/stat that the sweep needs."""

    __slots__ = ("pid", "zombie", "ppid", "session")

    def __init__(self, pid: int, zombie: bool, ppid: int, session: int) -> None:
        self.pid = pid
        self.zombie = zombie
        self.ppid = ppid
        self.session = session


def _processes() -> list[_ProcInfo]:
    """Every process visible in /proc (empty without /proc).

    /proc/<pid>/task/<tid>/children would be cheaper for finding children, but
    many kernels are built without it.
    """
    found: list[_ProcInfo] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        # After the command name, which may hold ')' or spaces:
        # state, ppid, pgrp, session, ...
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) > 3:
            zombie = fields[0] in (b"Z", b"X")
            found.append(_ProcInfo(int(entry), zombie, int(fields[1]), int(fields[3])))
    return found


def _child_pids() -> set[int]:
    me = os.getpid()
    return {info.pid for info in _processes() if info.ppid == me}


def _kill(pid: int, group: bool = False) -> None:
    """SIGKILL a process (or a process group), ignoring one that is already gone."""
    try:
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sweep(step_pid: int, keep: set[int], *, leader_reaped: bool = False) -> None:
    """Kill everything a step started and reap what this process adopted.

    The step leads its own session (``start_new_session``), so its descendants
    are either in that session or, after ``setsid()``, in a newer one; none
    can join this process's session. Each round kills the step's group, every
    live process of the step's session, and every adopted child (a child in
    another session that is not in ``keep`` or a live step), and reaps the
    adopted ones. Killing a process hands its children to this subreaper, so
    rounds repeat until the session is empty and nothing is adopted, bounded
    by REAP_GRACE_S. ``keep`` must hold the step's own pid until Popen has
    reaped it; once it has (``leader_reaped``), its pid may name an unrelated
    process, so only adopted children are swept.
    """
    give_up = time.monotonic() + REAP_GRACE_S
    me = os.getpid()
    own_session = os.getsid(0)
    while True:
        if not leader_reaped:
            _kill(step_pid, group=True)
        with _LIVE_STEPS_LOCK:
            protected = keep | _LIVE_STEPS
        members: list[int] = []
        adopted: list[int] = []
        for info in _processes():
            if info.ppid == me and info.session != own_session:
                if info.pid not in protected:
                    adopted.append(info.pid)
            elif info.session == step_pid and not info.zombie and not leader_reaped:
                members.append(info.pid)
        if (not members and not adopted) or time.monotonic() > give_up:
            return
        for pid in members + adopted:
            _kill(pid)
        for pid in adopted:
            _reap(pid, give_up)
        if not adopted:
            # Killed members die asynchronously; their children are adopted then.
            time.sleep(0.002)


def _reap(pid: int, give_up: float) -> None:
    """Wait for one killed child to be gone, until ``give_up`` (monotonic)."""
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > give_up:
            return
        time.sleep(0.005)


def _has_exited(proc: subprocess.Popen) -> bool:
    """True once the child has exited, without reaping it where the OS allows."""
    if hasattr(os, "waitid"):
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, proc.pid, flags) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


class _CappedBuffer:
    """Keeps the first and last bytes of a stream and counts what it dropped."""

    def __init__(
        self, head_bytes: int = OUTPUT_HEAD_BYTES, tail_bytes: int = OUTPUT_TAIL_BYTES
    ):
        self.head_limit = head_bytes
        self.tail_limit = tail_bytes
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail += data
        excess = len(self.tail) - self.tail_limit
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess

    def text(self, secrets: list[str] | tuple = ()) -> str:
        """The kept bytes as text, with a marker line where the middle was cut.

        Where the cut runs through one of ``secrets``, the part left on either
        side is masked (the host masks whole secrets, not pieces of them).
        """
        if not self.dropped:
            # Nothing was cut, so decode in one piece: no character is split.
            return (self.head + self.tail).decode("utf-8", errors="replace")
        head = self.head.decode("utf-8", errors="replace")
        tail = self.tail.decode("utf-8", errors="replace")
        head, tail = _mask_cut(head, tail, secrets)
        return f"{head}\n[spell: {self.dropped} bytes of output cut]\n{tail}"


class _ProcessResult:
    """What a finished (or killed) step process left behind."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.timed_out = False
        self.stdout = _CappedBuffer()
        self.stderr = _CappedBuffer()


def _spawn(path: str, cwd: str, env: dict[str, str]) -> subprocess.Popen:
    """Start ``path`` without arguments in a session of its own.

    An executable without a shebang fails with ENOEXEC; like execvp (and the
    original under Node), run it as a /bin/sh script then.
    """
    options: dict[str, Any] = dict(
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    try:
        return subprocess.Popen([path], **options)
    except OSError as exc:
        if exc.errno != errno.ENOEXEC:
            raise
    return subprocess.Popen(["/bin/sh", path], **options)


def _run_process(
    path: str,
    cwd: str,
    env: dict[str, str],
    timeout_s: float,
    on_output: Callable[[str, bytes], None] | None,
) -> _ProcessResult:
    """Run one step process to completion or timeout; nothing it started survives.

    Raises OSError if it cannot be started.
    """
    _become_subreaper()
    result = _ProcessResult()
    before = _child_pids()
    started = time.monotonic()
    with _LIVE_STEPS_LOCK:
        proc = _spawn(path, cwd, env)
        _LIVE_STEPS.add(proc.pid)
    end = started + timeout_s
    selector = selectors.DefaultSelector()
    buffers = {
        proc.stdout.fileno(): ("stdout", result.stdout),
        proc.stderr.fileno(): ("stderr", result.stderr),
    }
    pidfd = None
    try:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        try:
            pidfd = os.pidfd_open(proc.pid)  # type: ignore[attr-defined]
            selector.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            pidfd = None
        while not _has_exited(proc):
            left = end - time.monotonic()
            if left <= 0:
                result.timed_out = True
                break
            wait = min(left, MAX_WAIT_S if pidfd is not None else EXIT_POLL_S)
            for key, _ in selector.select(wait):
                if key.fd in buffers:
                    _read_pipe(key.fd, buffers, selector, on_output)
        # Kill what is left before reaping the leader, so the group id cannot
        # be reused by an unrelated process in between.
        _sweep(proc.pid, before | {proc.pid})
        try:
            proc.wait(timeout=REAP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        code = proc.returncode
        # A signal death (negative code) or our kill has no exit code: null.
        if not result.timed_out and code is not None and code >= 0:
            result.returncode = code
        drain_end = time.monotonic() + DRAIN_GRACE_S
        if pidfd is not None:
            selector.unregister(pidfd)
        while selector.get_map():
            left = drain_end - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(left):
                _read_pipe(key.fd, buffers, selector, on_output)
    finally:
        open_fds = [pidfd] if pidfd is not None else []

        def clean_up() -> None:
            selector.close()
            while open_fds:
                os.close(open_fds.pop())
            with _LIVE_STEPS_LOCK:
                _LIVE_STEPS.discard(proc.pid)
            if proc.returncode is None:
                _kill(proc.pid, group=True)
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            _sweep(proc.pid, before, leader_reaped=True)

        # A second Ctrl-C or SIGTERM must not cut the sweep short.
        _uninterrupted(clean_up)
    return result


def _uninterrupted(func: Callable[[], None]) -> None:
    """Run the clean-up ``func`` to its end even when SIGINT or SIGTERM arrive.

    Both are held back in this thread while it runs, and ``func`` is started
    again (it must be safe to repeat) if a handler still raises through
    another thread; the first such exception is raised once it is done.
    Python runs signal handlers between bytecodes, so without this a handler
    raising KeyboardInterrupt half-way through a sweep would leave the
    processes it had not reached yet running.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, OSError, ValueError):
        previous = None
    pending: BaseException | None = None
    try:
        for _ in range(CLEANUP_ATTEMPTS):
            try:
                func()
                break
            except (KeyboardInterrupt, SystemExit) as exc:
                pending = pending or exc
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if pending is not None:
        raise pending


def _read_pipe(
    fd: int,
    buffers: dict[int, tuple[str, _CappedBuffer]],
    selector: selectors.BaseSelector,
    on_output: Callable[[str, bytes], None] | None,
) -> None:
    """Read one chunk from a step pipe into its buffer; unregister it at EOF."""
    try:
        data = os.read(fd, READ_CHUNK_BYTES)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    stream, buffer = buffers[fd]
    if not data:
        selector.unregister(fd)
        return
    buffer.add(data)
    if on_output is not None:
        on_output(stream, data)


# Steps ################################################################################


class _Context:
    """Everything a step needs from the plan, plus the run's execution deadline."""

    def __init__(self, plan: dict, on_event: Callable[[dict], None] | None) -> None:
        _check_plan(plan)
        self.started = time.monotonic()
        self.bundle_dir: str = plan["bundle_dir"]
        self.steps: list[dict] = plan.get("steps") or []
        self.checks: list[dict] = plan.get("checks") or []
        self.input: dict = plan.get("input") or {}
        self.env: dict[str, str] = dict(plan.get("env") or {})
        if plan.get("input_path"):
            self.env["INPUT_JSON"] = plan["input_path"]
        self.step_timeout_ms: int = (
            plan.get("step_timeout_ms") or DEFAULT_STEP_TIMEOUT_MS
        )
        self.execution_timeout_ms: int | None = plan.get("execution_timeout_ms") or None
        self.http_timeout_ms: int = (
            plan.get("http_timeout_ms") or DEFAULT_HTTP_TIMEOUT_MS
        )
        self.workdir_copy_to: str | None = plan.get("workdir_copy_to") or None
        # Longest first, so a secret that holds another is masked whole.
        self.redact: list[str] = sorted(
            {value for value in plan.get("redact") or [] if value},
            key=len,
            reverse=True,
        )
        self.on_event = on_event

    def remaining_ms(self) -> float | None:
        """Milliseconds left before the execution deadline, or None without one."""
        if self.execution_timeout_ms is None:
            return None
        elapsed_ms = (time.monotonic() - self.started) * 1000
        return self.execution_timeout_ms - elapsed_ms

    def check_bound(self) -> tuple[float, str | None]:
        """(seconds an http_status check may take, its error if that is the deadline).

        Checks never run past the execution deadline: the bound is the http
        timeout or what is left before the deadline, whichever is shorter.
        """
        remaining = self.remaining_ms()
        if remaining is None or remaining >= self.http_timeout_ms:
            return self.http_timeout_ms / 1000, None
        late = f"cast execution timed out after {self.execution_timeout_ms}ms"
        return max(remaining, 1) / 1000, late

    def deadline_message(self, step_name: str) -> str:
        return (
            f"cast execution timed out after {self.execution_timeout_ms}ms"
            f" while running step '{step_name}'"
        )

    def emit(self, event: dict) -> None:
        """Report progress; a failing listener never breaks the run."""
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            pass


class _Outcome:
    """Result of one step: its record, its output (if any) and its error (if any)."""

    def __init__(self, record: dict, output: tuple[str, Any] | None, error: str | None):
        self.record = record
        self.output = output
        self.error = error


def _check_plan(plan: Any) -> None:
    """Raise PlanError unless ``plan`` has the documented keys and types."""
    if not isinstance(plan, dict):
        raise PlanError("plan must be a JSON object")

    def expect(key: str, kinds: tuple[type, ...], required: bool = False) -> None:
        if key not in plan or plan[key] is None:
            if required:
                raise PlanError(f"plan.{key} is required")
            return
        value = plan[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(kind.__name__ for kind in kinds)
            raise PlanError(f"plan.{key} must be {names}")

    expect("bundle_dir", (str,), required=True)
    expect("steps", (list,))
    expect("checks", (list,))
    expect("input", (dict,))
    expect("input_path", (str,))
    expect("env", (dict,))
    expect("step_timeout_ms", (int,))
    expect("execution_timeout_ms", (int,))
    expect("http_timeout_ms", (int,))
    expect("workdir_copy_to", (str,))
    expect("redact", (list,))
    if not all(isinstance(value, str) for value in plan.get("redact") or []):
        raise PlanError("plan.redact must be a list of strings")
    for key in ("step_timeout_ms", "http_timeout_ms"):
        if plan.get(key) is not None and plan[key] < 1:
            raise PlanError(f"plan.{key} must be >= 1")
    if (plan.get("execution_timeout_ms") or 0) < 0:
        raise PlanError("plan.execution_timeout_ms must be >= 0")
    for name, value in (plan.get("env") or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise PlanError("plan.env must map strings to strings")
    for index, step in enumerate(plan.get("steps") or []):
        fields = ("name", "uses", "run")
        if not isinstance(step, dict) or not all(
            isinstance(step.get(f), str) for f in fields
        ):
            raise PlanError(f"plan.steps[{index}] must have string name, uses and run")
    for index, check in enumerate(plan.get("checks") or []):
        if not isinstance(check, dict) or not isinstance(check.get("type"), str):
            raise PlanError(f"plan.checks[{index}] must have a string type")
        if not isinstance(check.get("params", {}), (dict, type(None))):
            raise PlanError(f"plan.checks[{index}].params must be an object")


def _head(text: str) -> str:
    return text[:RESULT_HEAD_CHARS]


def _mask(text: str, secrets: list[str] | tuple) -> str:
    """``text`` with every occurrence of each secret (longest first) masked."""
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def _mask_cut(head: str, tail: str, secrets: list[str] | tuple) -> tuple[str, str]:
    """Mask the pieces of a secret that a cut between ``head`` and ``tail`` split."""
    for value in secrets:
        for size in range(len(value) - 1, 1, -1):
            if head.endswith(value[:size]):
                head = head[:-size] + REDACTED
                break
        for size in range(len(value) - 1, 1, -1):
            if tail.startswith(value[-size:]):
                tail = REDACTED + tail[size:]
                break
    return head, tail


class _OutputEvents:
    """Turns raw pipe chunks into ``output`` events of whole lines.

    Each stream is decoded as it comes and sent a line (or several) at a time:
    a secret the step writes in two pieces reaches the listener, which masks
    secrets, in one. Text without a newline waits until one comes, until it
    reaches EVENT_LINE_MAX_CHARS, or until ``flush`` at the end of the step.
    """

    def __init__(self, ctx: _Context, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.decoders = {
            stream: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for stream in ("stdout", "stderr")
        }
        self.pending = {"stdout": "", "stderr": ""}

    def __call__(self, stream: str, data: bytes) -> None:
        text = self.pending[stream] + self.decoders[stream].decode(data)
        cut = text.rfind("\n") + 1
        if not cut and len(text) >= EVENT_LINE_MAX_CHARS:
            cut = len(text)
        self._send(stream, text[:cut])
        self.pending[stream] = text[cut:]

    def flush(self) -> None:
        for stream, decoder in self.decoders.items():
            self._send(stream, self.pending[stream] + decoder.decode(b"", final=True))
            self.pending[stream] = ""

    def _send(self, stream: str, text: str) -> None:
        if text:
            event = {"event": "output", "step": self.name, "stream": stream}
            self.ctx.emit(dict(event, text=text))


def _output_listener(ctx: _Context, name: str) -> _OutputEvents | None:
    """The ``output`` event source of a step, or None without a listener."""
    return _OutputEvents(ctx, name) if ctx.on_event is not None else None


def _shell_step(step: dict, ctx: _Context) -> _Outcome:
    """Run ``bundle_dir/run`` under the step timeout, capped by the deadline."""
    name = step["name"]
    limit_ms: int = ctx.step_timeout_ms
    capped = False
    remaining = ctx.remaining_ms()
    if remaining is not None and 0 < remaining < limit_ms:
        limit_ms = max(1, math.ceil(remaining))
        capped = True
    path = os.path.join(ctx.bundle_dir, step["run"])
    started_at = iso_now()
    events = _output_listener(ctx, name)
    try:
        proc = _run_process(path, ctx.bundle_dir, ctx.env, limit_ms / 1000, events)
    except OSError as exc:
        error = f"failed to execute shell step '{name}': {exc.strerror or exc}"
        record = _shell_record(step, started_at, None, "", "", error)
        return _Outcome(record, None, error)
    if events is not None:
        events.flush()
    stdout = proc.stdout.text(ctx.redact)
    stderr = proc.stderr.text(ctx.redact)
    code = proc.returncode
    error = None
    if proc.timed_out:
        message = "timed out"
        if capped:
            error = ctx.deadline_message(name)
        else:
            error = f"shell step '{name}' timed out after {limit_ms}ms"
    elif code != 0:
        message = f"non-zero exit code: {js_string(code)}"
        error = f"step failed: {name} (exit code {js_string(code)})"
    else:
        message = "ok"
    # Heads are cut from masked text: a cut through a secret must not leave
    # its first characters for the host's redaction to miss.
    record = _shell_record(
        step,
        started_at,
        code,
        _mask(stdout, ctx.redact),
        _mask(stderr, ctx.redact),
        message,
    )
    return _Outcome(record, (f"step.{name}.stdout", stdout), error)


def _shell_record(
    step: dict,
    started_at: str,
    code: int | None,
    stdout: str,
    stderr: str,
    message: str,
) -> dict:
    return {
        "stepName": step["name"],
        "uses": "shell",
        "started_at": started_at,
        "finished_at": iso_now(),
        "success": code == 0 and message == "ok",
        "exitCode": code,
        "stdout_head": _head(stdout),
        "stderr_head": _head(stderr),
        "message": message,
    }


# HTTP #################################################################################


class _HttpFailure(Exception):
    """The request failed; ``reason`` is the client's or the OS's text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _HttpTimeout(Exception):
    """The request did not finish within its bound."""


def _opener() -> urllib.request.OpenerDirector:
    """An opener for http and https only, without proxies (fetch ignores them too)."""
    # Imported here: urllib.request pulls in http.client and email, ~20 ms that
    # every `spell --help` would otherwise pay.
    import urllib.request

    opener = urllib.request.OpenerDirector()
    handlers: list[Any] = [
        urllib.request.HTTPHandler,
        urllib.request.HTTPDefaultErrorHandler,
        urllib.request.HTTPRedirectHandler,
        urllib.request.HTTPErrorProcessor,
        urllib.request.UnknownHandler,
    ]
    if hasattr(urllib.request, "HTTPSHandler"):
        handlers.append(urllib.request.HTTPSHandler)
    for handler in handlers:
        opener.add_handler(handler())
    return opener


def _reason(exc: BaseException) -> str:
    """Short text of a client error: the OS's strerror where there is one."""
    import urllib.error

    if isinstance(exc, urllib.error.URLError) and not isinstance(
        exc, urllib.error.HTTPError
    ):
        inner = exc.reason
        if isinstance(inner, BaseException):
            return _reason(inner)
        return str(inner)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _read_capped(stream: Any, limit: int) -> bytes:
    """Read a response body, failing once it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(READ_CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _HttpFailure(f"response body exceeds {limit} bytes")
        chunks.append(chunk)


def _exchange_blocking(
    method: str,
    url: str,
    headers: dict,
    data: bytes | None,
    timeout_s: float,
    read_body: bool,
) -> tuple[int, bytes]:
    """One request in the calling thread; see ``_exchange`` for the contract."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with _opener().open(
                request, timeout=min(timeout_s, MAX_WAIT_S)
            ) as response:
                body = (
                    _read_capped(response, HTTP_RESPONSE_MAX_BYTES)
                    if read_body
                    else b""
                )
                return response.status, body
        except urllib.error.HTTPError as answer:
            # 4xx and 5xx are answers, not failures.
            with answer:
                body = b""
                if read_body and answer.fp is not None:
                    body = _read_capped(answer, HTTP_RESPONSE_MAX_BYTES)
                return answer.code, body
    except _HttpFailure:
        raise
    except TimeoutError as exc:
        raise _HttpTimeout() from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _HttpTimeout() from exc
        raise _HttpFailure(_reason(exc)) from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise _HttpFailure(_reason(exc)) from exc


def _exchange(
    method: str,
    url: str,
    headers: dict,
    data: bytes | None,
    timeout_s: float,
    read_body: bool = True,
) -> tuple[int, bytes]:
    """Make one request with a hard bound of ``timeout_s`` on the whole exchange.

    The socket timeout bounds each network operation only; running the
    request in a worker thread bounds the total, so a server that trickles
    bytes cannot hold the run. Returns (status, body); raises _HttpFailure or
    _HttpTimeout.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = _exchange_blocking(
                method, url, headers, data, timeout_s, read_body
            )
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc

    worker = threading.Thread(target=work, name="spell-http", daemon=True)
    worker.start()
    give_up = time.monotonic() + timeout_s + HTTP_JOIN_GRACE_S
    while worker.is_alive() and time.monotonic() < give_up:
        worker.join(min(give_up - time.monotonic(), MAX_WAIT_S))
    if worker.is_alive():
        raise _HttpTimeout()
    if "error" in box:
        raise box["error"]
    return box["value"]


class _NotRegularFile(Exception):
    """The path names something other than a regular file."""


class _FileTooLarge(Exception):
    """The file holds more bytes than its cap."""


def _read_regular_file(path: str, limit: int) -> bytes:
    """Read a regular file, never through a symlink, of at most ``limit`` bytes.

    O_NONBLOCK keeps a FIFO planted in place of the file from blocking the
    open. Raises OSError, _NotRegularFile or _FileTooLarge.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _NotRegularFile(path)
        if info.st_size > limit:
            raise _FileTooLarge(path)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, READ_CHUNK_BYTES)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise _FileTooLarge(path)
    return b"".join(chunks)


def _read_step_file(path: str, name: str) -> bytes:
    """Read an http step file: a regular file (no symlink) of bounded size."""
    try:
        return _read_regular_file(path, HTTP_STEP_FILE_MAX_BYTES)
    except OSError as exc:
        raise StepError(
            f"failed to read http step '{name}': {exc.strerror}: {path}"
        ) from exc
    except _NotRegularFile:
        raise StepError(
            f"http step '{name}' file is not a regular file: {path}"
        ) from None
    except _FileTooLarge:
        limit = HTTP_STEP_FILE_MAX_BYTES
        raise StepError(
            f"http step '{name}' file exceeds {limit} bytes: {path}"
        ) from None


def _blank(value: Any) -> bool:
    """True unless ``value`` is a string with non-whitespace text."""
    return not isinstance(value, str) or not value.strip(_JS_SPACE)


def _load_http_definition(path: str, name: str) -> dict:
    """Parse an http step file and check its required fields (§ messages kept)."""
    text = _read_step_file(path, name).decode("utf-8", errors="replace")
    try:
        definition = _parse_json_text(text)
    except (ValueError, RecursionError) as exc:
        raise StepError(f"failed to parse http step '{name}' JSON: {exc}") from exc
    if not isinstance(definition, dict):
        raise StepError(f"http step '{name}' definition must be an object")
    if _blank(definition.get("method")):
        raise StepError("http step definition missing 'method' string")
    if _blank(definition.get("url")):
        raise StepError("http step definition missing 'url' string")
    return definition


def _prepare_request(
    definition: dict, name: str, ctx: _Context
) -> tuple[str, str, dict[str, str], bytes | None]:
    """Template an http step definition into (method, url, headers, body bytes)."""
    method = js_string(
        render_template(definition["method"], ctx.input, ctx.env)
    ).upper()
    url = render_template(definition["url"], ctx.input, ctx.env)
    if not isinstance(url, str):
        raise StepError(f"http step '{name}' url must resolve to string")
    raw_headers = render_template(definition.get("headers", {}), ctx.input, ctx.env)
    if not isinstance(raw_headers, dict):
        raise StepError("http step headers must resolve to an object")
    headers: dict[str, str] = {}
    for header, value in raw_headers.items():
        if not isinstance(value, str):
            raise StepError(f"http step header '{header}' must be string")
        headers[header.lower()] = value
    data = None
    if "body" in definition:
        body = render_template(definition["body"], ctx.input, ctx.env)
        if isinstance(body, str):
            data = body.encode("utf-8", errors="backslashreplace")
            # What fetch sends for a string body; urllib's own default would be
            # a form encoding the body is not.
            headers.setdefault("content-type", "text/plain;charset=UTF-8")
        else:
            data = dumps_js(body).encode("utf-8")
            headers.setdefault("content-type", "application/json")
        if method in ("GET", "HEAD"):
            # fetch's rule and text, kept for compatibility.
            reason = "Request with GET/HEAD method cannot have body."
            raise StepError(f"http step '{name}' request failed: {reason}")
    return method, url, headers, data


def _decode_body(body: bytes) -> Any:
    """Response body as parsed JSON, or as text when it is not JSON.

    JSON nested deeper than RESPONSE_JSON_MAX_DEPTH is kept as text too.
    """
    text = body.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        value = _parse_json_text(text)
    except (ValueError, RecursionError):
        return text
    return text if _nested_deeper(value, RESPONSE_JSON_MAX_DEPTH) else value


def _nested_deeper(value: Any, limit: int) -> bool:
    """True when ``value`` has containers nested more than ``limit`` levels."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            members = item.values() if isinstance(item, dict) else item
            pending.extend((member, depth + 1) for member in members)
    return False


def _http_step(step: dict, ctx: _Context) -> _Outcome:
    """Send the request described by the step's JSON file; any status is success."""
    name = step["name"]
    started_at = iso_now()
    try:
        definition = _load_http_definition(
            os.path.join(ctx.bundle_dir, step["run"]), name
        )
        method, url, headers, data = _prepare_request(definition, name, ctx)
        bound_ms: float = ctx.http_timeout_ms
        remaining = ctx.remaining_ms()
        by_deadline = remaining is not None and remaining < bound_ms
        if by_deadline:
            bound_ms = max(remaining or 0, 1)
        try:
            status, body = _exchange(method, url, headers, data, bound_ms / 1000)
        except _HttpTimeout:
            if by_deadline:
                raise StepError(ctx.deadline_message(name)) from None
            reason = f"timed out after {ctx.http_timeout_ms}ms"
            raise StepError(f"http step '{name}' request failed: {reason}") from None
        except _HttpFailure as exc:
            raise StepError(
                f"http step '{name}' request failed: {exc.reason}"
            ) from None
    except StepError as exc:
        return _Outcome(
            _http_record(name, started_at, False, exc.message), None, exc.message
        )
    message = f"http {method} {url} -> {status}"
    record = _http_record(name, started_at, True, message)
    return _Outcome(record, (f"step.{name}.json", _decode_body(body)), None)


def _http_record(name: str, started_at: str, success: bool, message: str) -> dict:
    return {
        "stepName": name,
        "uses": "http",
        "started_at": started_at,
        "finished_at": iso_now(),
        "success": success,
        "message": message,
    }


# Checks ###############################################################################


def _required_string(params: dict, key: str, check: str) -> str:
    value = params.get(key)
    if _blank(value):
        raise StepError(f"missing required string: {check}.params.{key}")
    return value


def _optional_string(params: dict, key: str) -> str | None:
    """A param that may be absent; present but blank or not a string is an error."""
    if key not in params:
        return None
    value = params[key]
    if _blank(value):
        raise StepError(f"invalid string for {key}")
    return value


def _check_file_exists(params: dict, base_dir: str) -> dict:
    path = _required_string(params, "path", "file_exists")
    target = os.path.normpath(os.path.join(base_dir, path))
    if os.path.exists(target):
        return _check_result("file_exists", True, f"file exists: {target}")
    return _check_result("file_exists", False, f"file missing: {target}")


def _check_http_status(
    params: dict, outputs: dict, http_timeout_s: float, late: str | None = None
) -> dict:
    """Fetch a URL and compare its status; ``late`` is the error when the bound
    hit is the execution deadline rather than the http timeout."""
    expect = params.get("expect")
    if (
        isinstance(expect, bool)
        or not isinstance(expect, (int, float))
        or (isinstance(expect, float) and math.isnan(expect))
    ):
        raise StepError("missing required number: http_status.params.expect")
    url = _optional_string(params, "url")
    ref = _optional_string(params, "url_from_output")
    if url is None:
        if ref is None:
            raise StepError(
                "http_status check needs params.url or params.url_from_output"
            )
        url = resolve_output_ref(ref, outputs)
        if not isinstance(url, str):
            raise StepError(
                f"http_status url_from_output must resolve to string: {ref}"
            )
    try:
        status, _ = _exchange("GET", url, {}, None, http_timeout_s, read_body=False)
    except _HttpTimeout:
        if late is not None:
            raise StepError(late) from None
        raise StepError(
            f"timed out after {_js_number(http_timeout_s * 1000)}ms"
        ) from None
    except _HttpFailure as exc:
        # The client's text alone, without a prefix, as the original reports it.
        raise StepError(exc.reason) from None
    if status == expect:
        return _check_result("http_status", True, f"http status matched: {status}")
    message = f"http status mismatch: got {status}, expected {js_string(expect)}"
    return _check_result("http_status", False, message)


def _check_jsonpath_equals(params: dict, outputs: dict) -> dict:
    ref = _required_string(params, "from_output", "jsonpath_equals")
    path = _required_string(params, "path", "jsonpath_equals")
    actual = _lookup_path(resolve_output_ref(ref, outputs), path)
    expected = params.get("expected", UNDEFINED)
    if _js_equal(expected, actual):
        return _check_result("jsonpath_equals", True, f"jsonpath matched: {path}")
    want, got = js_string(expected), js_string(actual)
    message = f"jsonpath mismatch at {path}: expected {want}, got {got}"
    return _check_result("jsonpath_equals", False, message)


def _check_result(kind: str, success: bool, message: str) -> dict:
    return {"type": kind, "success": success, "message": message}


def _evaluate_check(
    check: dict,
    outputs: dict,
    base_dir: str,
    http_timeout_s: float,
    late: str | None = None,
) -> dict:
    """Evaluate one check into ``{type, success, message}``; StepError if it throws.

    ``late`` is passed to the ``http_status`` check (see there).
    """
    kind = check.get("type")
    params = check.get("params")
    if not isinstance(params, dict):
        params = {}
    if kind == "exit_code":
        # Step failures end the run before checks, so every step succeeded.
        return _check_result("exit_code", True, "all steps succeeded")
    if kind == "file_exists":
        return _check_file_exists(params, base_dir)
    if kind == "http_status":
        return _check_http_status(params, outputs, http_timeout_s, late)
    if kind == "jsonpath_equals":
        return _check_jsonpath_equals(params, outputs)
    raise StepError(f"unsupported check type: {kind}")


def evaluate_checks(
    checks: list, outputs: dict, base_dir: str, *, http_timeout_s: float
) -> list:
    """Evaluate checks in order and return their results.

    A check that throws (bad params, bad reference, network error) raises
    ``StepError`` with its raw message; the results of the checks before it
    are on the exception as ``results``.
    """
    results: list[dict] = []
    for check in checks:
        try:
            results.append(_evaluate_check(check, outputs, base_dir, http_timeout_s))
        except StepError as exc:
            exc.results = results  # type: ignore[attr-defined]
            raise
    return results


# Working copy #########################################################################


def _copy_file(source: str, target: str) -> None:
    """Copy one regular file (never through a symlink), keeping its permission bits.

    Raises OSError or _NotRegularFile.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(source, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _NotRegularFile(source)
        out_flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        out = os.open(target, out_flags, 0o600)
        with os.fdopen(os.dup(fd), "rb") as reader, os.fdopen(out, "wb") as writer:
            shutil.copyfileobj(reader, writer)
        # Permission bits only: set-id bits have no business in a working copy.
        os.chmod(target, stat.S_IMODE(info.st_mode) & 0o777)
    finally:
        os.close(fd)


def _copy_steps(source: str, target: str) -> None:
    """Copy ``steps/`` recursively; symlinks and special files are refused."""
    if os.path.islink(source):
        raise StepError(f"symlink is not allowed in steps/: {source}")
    created: list[tuple[str, int]] = []
    pending = [(source, target)]
    while pending:
        src_dir, dst_dir = pending.pop()
        os.makedirs(dst_dir, mode=0o700, exist_ok=True)
        created.append((dst_dir, stat.S_IMODE(os.lstat(src_dir).st_mode) & 0o777))
        with os.scandir(src_dir) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                dst = os.path.join(dst_dir, entry.name)
                if entry.is_symlink():
                    raise StepError(f"symlink is not allowed in steps/: {entry.path}")
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, dst))
                elif entry.is_file(follow_symlinks=False):
                    try:
                        _copy_file(entry.path, dst)
                    except _NotRegularFile:  # replaced since the scan
                        raise StepError(
                            f"unsupported file type in steps/: {entry.path}"
                        ) from None
                else:
                    raise StepError(f"unsupported file type in steps/: {entry.path}")
    # Directory modes last, so a read-only directory does not stop its own copy.
    for path, mode in reversed(created):
        os.chmod(path, mode | 0o700)


def _copy_bundle(source: str, target: str) -> str:
    """Copy what steps may use (spell.yaml, schema.json, steps/) into ``target``.

    The mounted bundle is read-only and may sit on a ``noexec`` mount, so the
    container runs a copy placed on an exec-capable tmpfs. Returns ``target``.
    """
    try:
        os.makedirs(target, mode=0o700, exist_ok=True)
        _copy_file(
            os.path.join(source, "spell.yaml"), os.path.join(target, "spell.yaml")
        )
        schema = os.path.join(source, "schema.json")
        if os.path.lexists(schema):
            _copy_file(schema, os.path.join(target, "schema.json"))
        _copy_steps(os.path.join(source, "steps"), os.path.join(target, "steps"))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise StepError(f"failed to copy bundle: {exc.strerror or exc}{where}") from exc
    except _NotRegularFile as exc:
        raise StepError(f"failed to copy bundle: not a regular file: {exc}") from None
    return target


# Plan execution #######################################################################

_STEP_KINDS: dict[str, Callable[[dict, _Context], _Outcome]] = {
    "shell": _shell_step,
    "http": _http_step,
}


def _run_step(step: dict, ctx: _Context) -> _Outcome:
    """Run one step and report its start and end as events."""
    name, uses = step["name"], step["uses"]
    kind = _STEP_KINDS.get(uses)
    if kind is None:
        raise StepError(f"unsupported step type: {uses}")
    ctx.emit({"event": "step_start", "step": name, "uses": uses})
    began = time.monotonic()
    outcome = kind(step, ctx)
    ctx.emit(
        {
            "event": "step_end",
            "step": name,
            "success": outcome.record["success"],
            "exit_code": outcome.record.get("exitCode"),
            "duration_ms": round((time.monotonic() - began) * 1000),
        }
    )
    return outcome


def run_plan(plan: dict, *, on_event: Callable[[dict], None] | None = None) -> dict:
    """Run a plan's steps in order, then its checks, and return the result object.

    Plan keys: ``bundle_dir`` (absolute; cwd of shell steps and base of ``run``
    paths and relative ``file_exists`` paths), ``steps`` (``name``, ``uses``,
    ``run``), ``checks`` (``type``, ``params``), ``input``, ``input_path``
    (becomes ``INPUT_JSON``), ``env`` (the whole step environment),
    ``step_timeout_ms`` (default 60000), ``execution_timeout_ms`` (None or 0:
    no deadline; the deadline starts now), ``http_timeout_ms`` (default 30000),
    ``workdir_copy_to`` (copy the bundle there first and run the copy) and
    ``redact`` (secret values the steps may know: masked in the result's
    ``stdout_head``/``stderr_head`` before they are cut to length, and where the
    output cap cuts through one; whole outputs stay as they are for the checks,
    the host masks them when it writes the log).

    Returns ``{"success", "error" (failure only), "stepResults", "outputs",
    "checks"}`` in that order. A failed run keeps the records of the steps
    that ran, the failing one included, and the outputs gathered so far.
    ``on_event`` receives ``step_start``, ``output`` and ``step_end`` events.
    Raises PlanError for a malformed plan.
    """
    ctx = _Context(plan, on_event)
    step_results: list[dict] = []
    outputs: dict[str, Any] = {}
    checks: list[dict] = []
    error: str | None = None
    try:
        if ctx.workdir_copy_to:
            ctx.bundle_dir = _copy_bundle(ctx.bundle_dir, ctx.workdir_copy_to)
        for step in ctx.steps:
            remaining = ctx.remaining_ms()
            if remaining is not None and remaining <= 0:
                # Names the step about to start, as the original does.
                raise StepError(ctx.deadline_message(step["name"]))
            outcome = _run_step(step, ctx)
            step_results.append(outcome.record)
            if outcome.output is not None:
                outputs[outcome.output[0]] = outcome.output[1]
            if outcome.error is not None:
                raise StepError(outcome.error)
        for check in ctx.checks:
            bound_s, late = ctx.check_bound()
            checks.append(
                _evaluate_check(check, outputs, ctx.bundle_dir, bound_s, late)
            )
        failed = next((check for check in checks if not check["success"]), None)
        if failed is not None:
            raise StepError(f"check failed: {failed['message']}")
    except StepError as exc:
        error = exc.message
    result: dict[str, Any] = {"success": error is None}
    if error is not None:
        result["error"] = error
    result["stepResults"] = step_results
    result["outputs"] = outputs
    result["checks"] = checks
    return result


# Command line #########################################################################


def _parse_args(args: list[str]) -> tuple[str, bool] | None:
    """(plan path, events flag), or None on a usage error."""
    plan_path: str | None = None
    events = False
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--events":
            events = True
        elif arg == "--plan" and index + 1 < len(args):
            index += 1
            plan_path = args[index]
        elif arg.startswith("--plan="):
            plan_path = arg[len("--plan=") :]
        else:
            return None
        index += 1
    if not plan_path:
        return None
    return plan_path, events


def _read_plan(path: str) -> dict:
    """Read and parse the plan file: a regular file of at most PLAN_MAX_BYTES."""
    try:
        data = _read_regular_file(path, PLAN_MAX_BYTES)
    except OSError as exc:
        raise PlanError(f"cannot read plan: {exc.strerror}: {path}") from exc
    except _NotRegularFile:
        raise PlanError(f"plan is not a regular file: {path}") from None
    except _FileTooLarge:
        raise PlanError(f"plan exceeds {PLAN_MAX_BYTES} bytes: {path}") from None
    try:
        plan = _parse_json_text(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise PlanError(f"plan is not valid JSON: {exc}") from exc
    if not isinstance(plan, dict):
        raise PlanError("plan must be a JSON object")
    return plan


def _write_line(stream: Any, text: str) -> None:
    """Write one UTF-8 line whatever the locale, and flush it."""
    data = (text + "\n").encode("utf-8", errors="backslashreplace")
    target = getattr(stream, "buffer", None)
    if target is not None:
        stream.flush()
        target.write(data)
        target.flush()
    else:
        stream.write(data.decode("utf-8", errors="replace"))
        stream.flush()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _print_event(event: dict) -> None:
    _write_line(sys.stderr, dumps_js(event))


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).replace("\r", " ")


def main(argv: list[str] | None = None) -> int:
    """``spell-runner --plan <plan.json> [--events]``: run a plan, print one JSON line.

    The step environment is this process's environment overlaid with the
    plan's ``env``. Exits 0 on success and 1 on failure; with ``--events``,
    progress events go to stderr as JSON lines.
    """
    parsed = _parse_args(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        _write_line(sys.stderr, USAGE)
        return 1
    plan_path, events = parsed
    if threading.current_thread() is not threading.main_thread():
        return _run_main(plan_path, events)
    # SIGTERM stops the run like Ctrl-C: the step's processes are killed first.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run_main(plan_path, events)
    finally:
        if previous is None:  # set outside Python: the default is all we can restore
            previous = signal.SIG_DFL
        signal.signal(signal.SIGTERM, previous)


def _run_main(plan_path: str, events: bool) -> int:
    """Read, check and run the plan and print its result (``main`` minus signals)."""
    try:
        plan = _read_plan(plan_path)
        _check_plan(plan)
        env = dict(os.environ)
        env.update(plan.get("env") or {})
        result = run_plan(
            dict(plan, env=env), on_event=_print_event if events else None
        )
    except PlanError as exc:
        _write_line(sys.stderr, _one_line(f"spell-runner: {exc}"))
        return 1
    except KeyboardInterrupt:
        _write_line(sys.stderr, "spell-runner: interrupted")
        return 1
    except Exception as exc:  # a bug: one line, never a traceback with secrets
        _write_line(sys.stderr, _one_line(f"spell-runner: internal error: {exc!r}"))
        return 1
    _write_line(sys.stdout, dumps_js(result))
    return 0 if result["success"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
