"""``wyng-agent``: the agent's command line.

Without arguments it is the agent: requests on stdin, replies on stdout,
as the qrexec service ``/etc/qubes-rpc/wyng.Agent`` runs it (that entry
calls ``agent.main`` directly and takes no arguments).
"""
import sys

from . import __version__

USAGE = "usage: wyng-agent [--self-check | --version]"


def main(args=None):
    args = sys.argv[1:] if args is None else args
    if not args:
        from .agent import main as agent_main
        return agent_main()
    if args == ["--self-check"]:
        from .selfcheck import run
        return run()
    if args == ["--version"]:
        print("wyng-agent %s" % __version__)
        return 0
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    return 2
