#!/usr/bin/env python3
"""A taskrunner task program in Python (standard library only) that speaks
the preload protocol (README, "Preload protocol").

Declared in the daemon's config as

    programs:
      - {path: examples/preload/preload_tasks.py, preload: true}

the daemon starts it once; `setup()` runs once (where an application would
import its libraries and load its data: a Rails application would boot
here); then every try is a child forked from this booted process. Without
`preload: true` (or run by hand) it is an ordinary task program: it reads
TASKRUNNER_TASK, the options on stdin, writes the result on stdout and
exits 0 (1 for a failure, 65 for options that do not fit).

The options are YAML; Python's standard library has no YAML parser, so the
tasks here read simple `key: value` lines only.
"""

import ctypes
import errno
import fcntl
import os
import platform
import resource
import socket
import sys
import time
import traceback

# ---------------------------------------------------------------------------
# The program's task types and its one-time initialization.

TASKS = {}
BOOTED_IN = None
TRIES_SEEN = 0


def task(function):
    TASKS[function.__name__] = function
    return function


def setup():
    """The one-time initialization: runs once in a preloaded parent."""
    global BOOTED_IN
    time.sleep(int(os.environ.get("PROBE_SETUP_MS", "0")) / 1000.0)
    BOOTED_IN = os.getpid()


def simple_options(text):
    options = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("---"):
            key, value = line.split(":", 1)
            options[key.strip()] = value.strip()
    return options


@task
def PyProbe(text):
    """Reports how its try was started, as the Rust probe does."""
    global TRIES_SEEN
    TRIES_SEEN += 1
    options = simple_options(text)
    if options.get("quiet") == "true":
        return "ok"
    time.sleep(int(options.get("sleep_ms", "0")) / 1000.0)
    if "fail" in options:
        raise RuntimeError(options["fail"])
    fds = [fd for fd in range(1024) if _is_open(fd)]
    env = sorted(
        f"{name}={value}"
        for name, value in os.environ.items()
        if name.startswith("TASKRUNNER_") or name.startswith("PROBE_")
    )
    return (
        f"pid: {os.getpid()}\npgid: {os.getpgid(0)}\nppid: {os.getppid()}\n"
        f"booted_in: {BOOTED_IN}\nfds: {fds}\ntries_seen: {TRIES_SEEN}\n"
        f"env: {env}\ncwd: {os.getcwd()}\ncgroup: {_own_cgroup()}\n"
    )


def _own_cgroup():
    with open("/proc/self/cgroup") as lines:
        return " ".join(lines.read().split())


def _is_open(fd):
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# The process protocol (every task program speaks it).


def run_task():
    """Runs the type TASKRUNNER_TASK names; returns the exit status."""
    name = os.environ.get("TASKRUNNER_TASK") or (sys.argv[1] if len(sys.argv) > 1 else "")
    function = TASKS.get(name)
    if function is None:
        print(f"unknown task type `{name}`; this program has: {', '.join(TASKS)}", file=sys.stderr)
        return 1
    options = sys.stdin.read()
    try:
        result = function(options)
    except Exception as error:  # a failed try: its message is the result text
        print(error, file=sys.stderr)
        return 1
    sys.stdout.write(result)
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------
# The preload protocol.

HELLO = b"hello\0taskrunner-preload-1\0"
CLONE_PARENT = 0x00008000
SIGCHLD = 17
PR_SET_PDEATHSIG = 1
SYS_CLONE = {"x86_64": 56, "aarch64": 220}[platform.machine()]

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def serve_preloaded():
    setup()
    # Standard input is a SOCK_SEQPACKET socket to the daemon.
    daemon = socket.socket(fileno=0)
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        print(f"cannot preload: {threads} threads are alive; a fork copies only one", file=sys.stderr)
        return 1
    daemon.send(HELLO)
    while True:
        message, fds, _, _ = socket.recv_fds(daemon, 1 << 20, 3)
        if not message and not fds:
            return 0  # the daemon retired this parent
        try:
            request = parse(message)
            if len(fds) != 3:
                raise ValueError(f"a request with {len(fds)} descriptors, not 3")
            answer = f"pid\0{fork_try(daemon, request, fds)}\0"
        except Exception as error:
            # Out of processes or memory: the machine's shortage, not the
            # task's; the daemon gives the try back uncounted.
            short = isinstance(error, OSError) and error.errno in (errno.EAGAIN, errno.ENOMEM)
            answer = f"{'short' if short else 'error'}\0{error}\0"
        for fd in fds:
            os.close(fd)
        daemon.send(answer.encode())


def parse(message):
    fields = message.split(b"\0")
    request = {"env": {}, "cgroup": []}
    for name, value in zip(fields[0::2], fields[1::2]):
        name = name.decode()
        if name == "env":
            key, _, value = value.partition(b"=")
            request["env"][key] = value
        elif name in ("daemon_pid", "rlimit_as", "rlimit_cpu", "rlimit_nproc", "nice"):
            request[name] = int(value)
        elif name == "workdir":
            request[name] = value
        elif name == "cgroup":
            request["cgroup"].append(value)
    if "daemon_pid" not in request or "workdir" not in request:
        raise ValueError("a request without daemon_pid or workdir")
    return request


def fork_try(daemon, request, fds):
    """clone(CLONE_PARENT): the try's process is the daemon's child."""
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = libc.syscall(SYS_CLONE, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0)
    if pid != 0:
        ctypes.pythonapi.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(ctypes.get_errno(), "clone")
        return pid
    ctypes.pythonapi.PyOS_AfterFork_Child()
    try:
        daemon.detach()  # fd 0 becomes the try's stdin below
        set_up_child(request, fds)
    except BaseException as error:
        os.write(2, f"setting up the try: {error}\n".encode())
        os._exit(127)
    # Whatever the task does, the child leaves by _exit: a sys.exit() or an
    # exception out of the task must not unwind into the parent's loop, nor
    # end the interpreter normally (that runs the parent's atexit handlers
    # and finalizers in the try).
    code = 1
    try:
        code = run_task()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def set_up_child(request, fds):
    """What the daemon does for an exec'd task before exec."""
    for procs in request["cgroup"]:  # the try's cgroup, before anything else
        with open(procs, "w") as joining:
            joining.write("0")
    os.setpgid(0, 0)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in fds]
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.chdir(request["workdir"])
    if libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")
    if os.getppid() != request["daemon_pid"]:
        raise RuntimeError("the daemon is gone (or is not this process's parent)")
    for name, kind, extra in (
        ("rlimit_as", resource.RLIMIT_AS, 0),
        ("rlimit_cpu", resource.RLIMIT_CPU, 1),
        ("rlimit_nproc", resource.RLIMIT_NPROC, 0),
    ):
        if name in request:
            resource.setrlimit(kind, (request[name], request[name] + extra))
    if "nice" in request:
        os.setpriority(os.PRIO_PROCESS, 0, request["nice"])
    os.environ.clear()
    for key, value in request["env"].items():
        os.environb[key] = value


def main():
    if "--list-tasks" in sys.argv[1:]:
        print("\n".join(TASKS))
        return 0
    if os.environ.get("TASKRUNNER_PRELOAD") == "1":
        return serve_preloaded()
    setup()
    return run_task()


if __name__ == "__main__":
    sys.exit(main())
