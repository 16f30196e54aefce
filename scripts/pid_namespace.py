"""The first process of a fresh PID namespace: run one command, reap every orphan, exit as it did.

    unshare --pid --fork --mount-proc python scripts/pid_namespace.py COMMAND [ARGS...]

What `scripts/dev.sh test` runs each pytest-xdist worker under. moectl's no_other_training guard
looks at every process of the machine (SPEC §5: no torchrun or engine process may be running), so
two workers on one machine would refuse each other's runs. In a PID namespace of its own, with its
own /proc, a worker and everything it starts (torchrun, the Slurm daemons of its own local cluster)
see only their own processes: to each worker the machine is quiet, as it is to a suite run alone.

An init must reap: a process whose parent dies is handed to the namespace's first process, and a
zombie left unreaped still counts as running for psutil (and for the tests that wait for a killed
trainer's children to be gone). Stdlib only; signals it is sent go on to the command. When it
exits, the kernel ends whatever is left in the namespace."""
import os
import signal
import sys


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: pid_namespace.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    child = os.fork()
    if child == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"pid_namespace.py: cannot run {argv[0]}: {exc}", file=sys.stderr)
            os._exit(127)

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()  # the command, or any orphan handed to us
        except ChildProcessError:
            return 1  # (not reached: the command is our child until we have seen it end)
        except InterruptedError:
            continue
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
