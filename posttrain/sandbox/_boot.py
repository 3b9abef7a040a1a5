"""Bootstrap of one sandboxed program; ``posttrain.sandbox.runner`` starts it.

Run as ``python -I -S -B _boot.py CONFIG_JSON`` with the job as JSON on stdin. Standard library only:
inside the sandbox nothing but the interpreter, its standard library and this directory exist.

The job holds the program, the *questions* of its tests and a nonce; never an expected answer. For an
assert the parent can decide (``assert f(3) == 7``, ``assert abs(f(x) - 0.5) < 1e-6``, or a straight
line of assignments and such asserts) the question is the list of sub-expressions only the program can
evaluate (``f(3)``), after the assignments ran; their values come back serialised as plain data (exact
built-in types; anything else is "not a plain value") and the parent compares them. A stdin/stdout case sends only the input; the parent compares the output. Only a
free-form snippet (several statements, a loop) runs to a pass/fail here, in a fresh namespace with
fresh builtins, after the standard modules it names are restored to their state before the program ran.

Order: read the job (then stdin is /dev/null); the OS backend's own user namespace and noexec remounts;
rlimits; capabilities dropped and no_new_privs; the seccomp filter; snapshots of builtins and modules;
the audit hook; then the program, then each test. Every outcome line on the results pipe starts with
the nonce.
"""

import json
import os
import sys


def encode(value, depth=0):
    """Plain data as tagged JSON: exact built-in types only (a subclass, or an object with its own
    ``__eq__``, is refused), so the parent can rebuild the value and compare it itself."""
    kind = type(value)
    if depth > 50:
        raise ValueError("nested too deep")
    if value is None:
        return ["none"]
    if kind is bool:
        return ["bool", value]
    if kind is int:
        return ["int", str(value)]  # as text: no float rounding in any JSON reader
    if kind is float:
        return ["float", value.hex()]
    if kind is complex:
        return ["complex", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["str", value]
    if kind is bytes:
        return ["bytes", value.hex()]
    if kind in (list, tuple, set, frozenset):
        items = list(value)
        if kind in (set, frozenset):
            items = sorted(items, key=repr)  # any order: the parent rebuilds the set
        return [kind.__name__, [encode(v, depth + 1) for v in items]]
    if kind is dict:
        return ["dict", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    if kind is range:
        return ["range", str(value.start), str(value.stop), str(value.step)]
    raise ValueError(f"not a plain value: {kind.__name__}")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    job = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    code, tests, cases, nonce = job["code"], job["tests"], job["cases"], job["nonce"]
    del job

    import builtins
    import io
    import types

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I left this directory out
    import _bpf
    import _guard

    # Everything used after the program starts is bound here, in locals: the program may patch builtins
    # (`builtins.exec = lambda *a: None`) or module attributes, and cannot reach this frame.
    _exec, _eval, _compile, _len, _type, _str, _dict, _list, _range = (
        exec, eval, compile, len, type, str, dict, list, range,
    )  # fmt: skip
    _BaseException, _SystemExit, _StringIO = BaseException, SystemExit, io.StringIO
    write, exit_, dumps, statvfs, _encode = os.write, os._exit, json.dumps, os.statvfs, encode
    results_fd, workdir, out_cap = cfg["results_fd"], cfg["workdir"], cfg["max_output_bytes"]

    def report(line: str) -> None:
        try:
            write(results_fd, f"{nonce} {line}\n".encode())
        except OSError:
            pass

    try:
        if cfg["os"]:
            _guard.enter_user_namespace(workdir, mapped=cfg["mapped"])
        failed = _guard.set_limits(cfg)
        if sys.platform == "linux":  # elsewhere (the process backend only) the rlimits and the hook remain
            _guard.drop_privileges()
            if os.uname().machine in _bpf.ARCHES:  # the OS backend refuses to run without a table
                _guard.install_seccomp(_bpf.to_bytes(_bpf.boot_filter(os.uname().machine, os.getpid())))
            else:
                failed.append("seccomp")
    except OSError as e:
        report(f"setup-failed {e}".replace("\n", " "))
        exit_(70)
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # importing it again is refused; the cached copy must go too

    # Standard modules the tests name, imported now, so that their state before the program ran can be
    # put back before each test (a program that patches math.isclose patches its own copy only).
    for name in cfg["preimport"]:
        try:
            __import__(name)
        except _BaseException:
            pass
    import collections
    import enum
    import typing

    pristine_builtins = _dict(builtins.__dict__)
    allowed = {collections.namedtuple.__code__, typing._caller.__code__, enum.EnumType._create_.__code__}
    allowed.add(types.coroutine.__code__)  # asyncio: co.replace(co_flags=...)

    def describe(error) -> str:
        """``ValueError: boom (<program>, line 2)`` without the traceback module (which walks frames)."""
        try:
            text = f"{_type(error).__name__}: {error}"[:500]
        except _BaseException:  # a __str__ that raises is the program's problem, not the harness's
            text = f"{_type(error).__name__}"
        where, tb = None, error.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename
            if name.startswith("<"):
                where = f"{name}, line {tb.tb_lineno}"
            tb = tb.tb_next
        if where is None and _type(error) is SyntaxError:
            where = f"{error.filename}, line {error.lineno}"
        return text + (f" ({where})" if where else "")

    allowed.add(describe.__code__)
    if cfg["guard"]:
        _guard.install_guard(
            workdir, cfg["violations_fd"], max_threads=cfg["max_threads"], allowed_frame_code=allowed
        )
    # After the guard: its replacements (no signal handlers, counted threads) are part of the state put back.
    snapshot = {
        n: (m, _dict(m.__dict__))
        for n, m in _list(sys.modules.items())
        if n not in ("__main__", "builtins") and _type(m) is types.ModuleType
    }
    report("ready " + ",".join(f"-{n}" for n in failed))

    def restore() -> None:
        for name, (module, state) in snapshot.items():
            sys.modules[name] = module
            current = module.__dict__
            for key in [k for k in current if k not in state]:
                del current[key]
            current.update(state)

    def fresh(namespace: dict) -> dict:
        ns = _dict(namespace)
        ns["__builtins__"] = _dict(pristine_builtins)
        return ns

    def full() -> bool:
        try:
            st = statvfs(workdir)
            return st.f_bavail == 0 or st.f_favail == 0
        except OSError:
            return False

    def run(source: str, filename: str, namespace: dict, *, exit_ok: bool):
        """None when it ran, else the error's description."""
        try:
            _exec(_compile(source, filename, "exec"), namespace)
            return None
        except _SystemExit as error:
            # A program that ends with sys.exit(0) still gets its tests run; a test never passes by exiting.
            if exit_ok and error.code in (None, 0):
                return None
            return describe(error)
        except _BaseException as error:
            return describe(error)

    def program_namespace() -> dict:
        module = types.ModuleType("__main__")
        module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = module
        return module.__dict__

    if cases:  # stdin/stdout: the program once per case, fresh each time; the parent compares the output
        real_stdin, real_stdout = sys.stdin, sys.stdout
        for i in _range(_len(cases)):
            restore()
            sys.stdin, sys.stdout = _StringIO(cases[i]), _StringIO()
            captured = sys.stdout
            error = run(code, "<program>", program_namespace(), exit_ok=True)
            sys.stdin, sys.stdout = real_stdin, real_stdout
            text = captured.getvalue()[:out_cap]
            report(f"case {i} err {dumps(error)}" if error else f"case {i} ok {dumps(text)}")
    else:
        namespace = program_namespace()
        error = run(code, "<program>", namespace, exit_ok=True)
        report(f"program err {dumps(error)}" if error else "program ok")
        if full():
            report("violation workdir full (disk fill)")
        for i in _range(_len(tests)):
            if error:
                break
            test = tests[i]
            restore()
            ns = fresh(namespace)
            if test["kind"] == "snippet":
                failure = run(test["source"], f"<test {i}>", ns, exit_ok=False)
                report(f"test {i} fail {dumps(failure)}" if failure else f"test {i} pass")
                continue
            per_assert, failure = [], None
            for kind, payload in test["steps"]:
                if kind == "run":  # a statement binding names (x = f(1)); its outcome is not a verdict
                    failure = run(payload, f"<test {i}>", ns, exit_ok=False)
                    if failure:
                        break
                    continue
                values = []
                for leaf in payload:  # the values the parent's assert needs, as plain data
                    try:
                        values.append(_encode(_eval(_compile(leaf, f"<test {i}>", "eval"), ns)))
                    except _BaseException as e:
                        failure = describe(e)
                        break
                if failure:
                    break
                per_assert.append(values)
            report(f"test {i} err {dumps(failure)}" if failure else f"test {i} ok {dumps(per_assert)}")
    if full():
        report("violation workdir full (disk fill)")
    times = os.times()
    report(f"end {times.user + times.system:.4f}")  # CPU seconds, for the run log and the benchmark
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    exit_(0)  # without waiting for threads the program left running


if __name__ == "__main__":
    main()
