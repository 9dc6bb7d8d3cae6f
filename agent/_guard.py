"""The user's command's guard: the leader of its process group, so nothing it starts outlives the
agent.

Run as a plain script (``python -I -S _guard.py AGENT_PID FAILURE_FILE -- ARGV...``; it imports only
the
standard library) by agent.process.ProcessGroup. It

- marks itself a child subreaper, so descendants whose parent exits (``setsid`` daemons included)
  become
  its children instead of PID 1's;
- asks the kernel for SIGTERM when the agent (its parent) dies, SIGKILL included;
- forks and execs ARGV first (in the guard's process group; ctypes is imported while the command
  starts),
  reaps every child, and exits as the command did (same code, same signal); if the guard itself is
  SIGKILLed (the agent's group SIGKILL reaches the command too), the agent, a subreaper as well,
  finds what
  is left at its stop;
- when the agent dies: SIGKILLs every descendant it can find, writes FAILURE_FILE if it does not
  exist,
  and exits.

Signals sent to the group by the agent (SIGTERM, SIGINT) reach the command directly; the guard
ignores them.
"""

import os
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_WATCHED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class _AgentGone(Exception):
    pass


def _prctl(libc, option, value):
    if libc is not None:
        libc.prctl(option, value, 0, 0, 0)


def _descendants(root):
    """PIDs under ``root`` in the process tree (from /proc), deepest last."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def _kill_all(me):
    """SIGKILL every descendant (a subreaper gets the orphans, so the tree holds them all) until
    none is left."""
    for _ in range(200):
        pids = _descendants(me)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        while True:  # reap what died
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        if not pids:
            return
        time.sleep(0.01)


def _write_failure(path, agent):
    if not path or os.path.exists(path):
        return
    text = (
        f"The TorchBay agent (PID {agent}) died while the training script ran (killed, or out of "
        "memory); "
        "the script and every process it started were stopped. Nothing was uploaded at the end.\n"
    )
    try:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError:
        pass


def _exit_like(status):
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ImportError, ValueError, OSError):
            pass
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(
        os.waitstatus_to_exitcode(status)
        if hasattr(os, "waitstatus_to_exitcode")
        else os.WEXITSTATUS(status)
    )


def main(args):
    agent, failure, argv = int(args[0]), args[1], args[3:]
    me = os.getpid()

    def on_signal(signum, frame):
        if os.getppid() != agent:
            raise _AgentGone()

    for signum in _WATCHED:
        signal.signal(signum, on_signal)
    try:
        # The command starts first; ctypes (tens of ms to import) is loaded while it starts up.
        child = os.fork()
        if child == 0:
            try:
                for signum in _WATCHED:
                    signal.signal(signum, signal.SIG_DFL)
                os.execvp(argv[0], argv)
            except OSError as err:
                os.write(2, f"torchbay: cannot start {argv[0]!r}: {err.strerror}\n".encode())
            os._exit(127)
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
        except (ImportError, OSError):
            libc = None
        _prctl(libc, _PR_SET_CHILD_SUBREAPER, 1)
        _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != agent:  # it died before the parent-death signal was armed
            raise _AgentGone()
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == child:
                _exit_like(status)
    except _AgentGone:
        if os.getpid() != me:  # the child, before its exec
            os._exit(137)
        _kill_all(me)
        _write_failure(failure, agent)
        os._exit(128 + signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1:])
