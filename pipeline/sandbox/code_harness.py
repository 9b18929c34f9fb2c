"""The test harness of the `code` verifier: runs inside the sandbox (standard library only).

Two processes, so that no model-written code ever runs where the tests and the verdict are:
* the harness reads the problem and a nonce from stdin, runs the problem's tests, and writes
  ``<nonce> passed`` only after ``check(candidate)`` has returned; it makes itself
  non-dumpable first, so no other process of the sandbox can read its memory or descriptors;
* the solution runs in a child interpreter (``--serve``) started afresh, which never sees the
  nonce or the tests. ``candidate`` in the tests is a stub that sends each call's arguments to
  the child and reads back the ``repr`` of what the solution returned, parsed as a literal:
  only plain values (numbers, strings, lists, tuples, dicts, sets, None) come back.

So a solution that exits (``sys.exit``, ``os._exit``, an ``atexit`` hook), re-runs itself
(``python -O``), ``exec``s another program, patches built-ins or modules, returns an object
that equals anything, or looks for the nonce or the answers in its memory, files or argv,
reaches none of it. What it cannot do is written down in docs/robustness.md: a solution that
mutates its arguments does so on its own copy.
"""

import ast
import builtins
import ctypes
import json
import math
import os
import subprocess
import sys

_PR_SET_DUMPABLE = 4


def literal(text):
    """A plain value from its ``repr``; also ``nan`` and ``inf``, which ``repr`` writes as names."""
    tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in ("nan", "inf"):
            node.__class__, node.value = ast.Constant, math.inf if node.id == "inf" else math.nan
    return ast.literal_eval(tree)


def serve():
    """The child: run the solution, then answer calls of its entry point, one JSON line each."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the solution's prints go to stderr, not into the replies
    requests = sys.stdin
    problem = json.loads(requests.readline())
    solution = {"__name__": "solution", "__builtins__": builtins}
    exec(compile(problem["program"], "<solution>", "exec"), solution)
    candidate = solution[problem["entry_point"]]
    for line in requests:
        args, kwargs = literal(json.loads(line))
        try:
            reply = ["return", repr(candidate(*args, **kwargs))]
        except Exception as error:  # noqa: BLE001 - the tests may expect it: raised again in the harness
            reply = ["raise", type(error).__name__, str(error)[:1000]]
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class Candidate:
    """What the tests call: the solution's entry point, across the process boundary."""

    def __init__(self, child):
        self.child = child

    def __call__(self, *args, **kwargs):
        self.child.stdin.write(json.dumps(repr((args, kwargs))) + "\n")
        self.child.stdin.flush()
        line = self.child.stdout.readline()
        if not line:
            raise RuntimeError("the solution ended before it answered")
        reply = json.loads(line)
        if reply[0] == "return":
            return literal(reply[1])
        error = getattr(builtins, reply[1], None)  # a built-in exception the tests may catch, by its name
        if isinstance(error, type) and issubclass(error, Exception):
            raise error(reply[2])
        raise RuntimeError(f"{reply[1]}: {reply[2]}")


def main():
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    problem = json.loads(sys.stdin.buffer.read())
    with open(os.devnull, "rb") as devnull:
        os.dup2(devnull.fileno(), 0)
    child = subprocess.Popen([sys.executable, "-I", __file__, "--serve"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, close_fds=True)
    try:
        child.stdin.write(json.dumps({"program": problem["program"], "entry_point": problem["entry_point"]}) + "\n")
        child.stdin.flush()
        tests = {"__name__": "tests", "__builtins__": builtins}
        if isinstance(problem["prompt"], str):  # its helpers (HumanEval/32's `poly`), which the tests call
            try:
                exec(compile(problem["prompt"], "<prompt>", "exec"), tests)
            except Exception:  # noqa: BLE001 - a prompt in prose, or one that is not code on its own
                pass
        # Some tests call the function by its name (HumanEval/33): that name is the solution's too.
        tests[problem["entry_point"]] = candidate = Candidate(child)
        exec(compile(problem["test"], "<tests>", "exec"), tests)
        tests["check"](candidate)
        verdict = "passed"
    except BaseException as error:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
        verdict = f"failed: {type(error).__name__}"
    finally:
        child.kill()
    print(f"\n{problem['nonce']} {verdict}", flush=True)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main()
