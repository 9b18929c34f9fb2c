"""The test harness of the `code` verifier: runs inside the sandbox (standard library only), reads
a problem from stdin, runs the solution and then the problem's tests, and reports the verdict.

A pass is a line ``<nonce> passed`` that this harness writes after ``check(candidate)`` has
returned. The nonce comes on stdin, which is closed before the solution runs, and it is never in
a file, so a solution that exits early (``sys.exit``, ``os._exit``, an ``atexit`` hook), re-runs
itself (``python -O`` strips the asserts) or ``exec``s another program leaves no pass behind;
``SystemExit`` raised inside the tests is caught with every other ``BaseException``.

Against a solution that cheats the comparison:
* the candidate's results must be of plain built-in types, all the way down (no object whose
  ``__eq__`` is always true, no ``int`` subclass);
* the tests see the built-ins as they were before the solution ran, and a solution that patched
  a built-in or a module the tests use (``math.isclose``) fails;
* the tests are not in a file the solution could read back.

What a harness in the solution's own interpreter cannot stop is written down in
docs/robustness.md: a solution that searches its process's memory (frames, the garbage collector)
for the nonce or the tests can forge a pass. The sandbox still contains what it does.
"""

import builtins
import json
import os
import sys

PLAIN = (bool, int, float, complex, str, bytes, type(None))
CONTAINERS = (list, tuple, set, frozenset, dict)
# Modules the tests of HumanEval-style problems call: imported before the solution runs, so that a
# solution that patches one of them is caught.
WATCHED = ("math", "re", "string", "collections", "itertools", "functools", "heapq", "operator", "hashlib", "random")


class NotPlain(TypeError):
    pass


def require_plain(value, _type=type, _plain=PLAIN, _containers=CONTAINERS):
    """Raise unless ``value`` is built of plain built-in types only (defaults bind them now)."""
    kind = _type(value)
    if kind in _plain:
        return
    if kind not in _containers:
        raise NotPlain(f"the solution returned a {kind.__name__}, not a plain built-in value")
    for item in (value.items() if kind is dict else value):
        if kind is dict:
            require_plain(item[0])
            require_plain(item[1])
        else:
            require_plain(item)


def checked(candidate, _require=require_plain):
    def call(*args, **kwargs):
        result = candidate(*args, **kwargs)
        _require(result)
        return result

    return call


def tampered(builtins_before, modules_before, _vars=vars, _id=id):
    """The built-ins and watched module attributes the solution or tests replaced."""
    names = [f"builtins.{k}" for k, v in builtins_before.items() if _id(_vars(builtins).get(k)) != _id(v)]
    for module, attributes in modules_before.items():
        now = _vars(sys.modules.get(module, builtins))
        names += [f"{module}.{k}" for k, v in attributes.items() if _id(now.get(k)) != _id(v)]
    return names


def main():
    problem = json.loads(sys.stdin.buffer.read())
    nonce = problem.pop("nonce")
    with open(os.devnull, "rb") as devnull:
        os.dup2(devnull.fileno(), 0)
    verdict_fd = os.dup(1)  # a solution that closes stdout cannot take the verdict's channel with it
    write = os.write
    builtins_before = dict(vars(builtins))
    modules_before = {name: dict(vars(__import__(name))) for name in WATCHED}
    try:
        solution = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(problem["program"], "<solution>", "exec"), solution)
        candidate = solution[problem["entry_point"]]
        # The tests see the solution's names (a prompt may define helpers they call) and the
        # built-ins from before the solution ran.
        tests = dict(solution, __builtins__=dict(builtins_before))
        exec(compile(problem["test"], "<tests>", "exec"), tests)
        tests["check"](checked(candidate))
        patched = tampered(builtins_before, modules_before)
        verdict = f"failed: patched {', '.join(patched)}" if patched else "passed"
    except BaseException as error:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
        verdict = f"failed: {type(error).__name__}"
    write(verdict_fd, f"\n{nonce} {verdict}\n".encode())  # on a line of its own
    os._exit(0)  # no atexit hook or finalizer of the solution's runs after the verdict


if __name__ == "__main__":
    main()
