"""chatctl: the operator's command line for chatd and holderd.

Each subcommand has --help; the ones that report take --json for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from chatd.control import default_socket as control_socket, instance_sockets
from chatd.journal import process_identity
from fdkeep.errors import Error
from fdkeep.peer import someone_listens
from fdkeep.text import plural
from holderd.client import HolderClient, default_socket as holderd_socket

from . import control, install, lineclient, selftest
from .launch import SOURCE_ROOT, wait_until
from .story import Story, play_demo

SHELL_HELP = """\
chatctl shell: crash and restore a chatd by hand, and watch two clients' TCP
connections live through it. It starts its own chatd and two clients, C1 and
C2, paired, in a scratch directory (not the chatd you may run elsewhere; no
root, no systemd); holderd only when you type create. Instructions
(case-insensitive):
  1to2      C1 sends a message to C2        2to1      C2 sends a message to C1
  create    start holderd, which keeps copies of chatd's sockets (chatd finds it at once)
  backup    chatd stores all its sockets in holderd again; says what holderd keeps
  crash     chatd dies of SIGSEGV (without holderd, the clients' connections die too)
  restart   start a new chatd in restore mode (it waits for `restore`)
  restore   the new chatd takes its sockets back; C1 and C2 chat on
  status    what chatd and holderd report  help      this text
  exit      stop everything and leave
The story: 1to2, 2to1, create, backup, 1to2, crash, 1to2 (it waits in the
kernel), restart, restore, 1to2, 2to1, status, exit.
Each client numbers the messages it receives: #1, #2, …"""


def _print(args, reply: dict, text: str) -> None:
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print(text)


def cmd_status(args) -> int:
    report = {}
    try:
        report["chatd"] = control.call("status", args.control)
    except Error as exc:
        report["chatd"] = {"ok": False, "error": exc.code, "message": exc.message}
    report["instances"] = instances_status(args.control)
    try:
        report["holderd"] = {"ok": True, **HolderClient(args.holder, timeout=3).ping()}
    except Error as exc:
        report["holderd"] = {"ok": False, "error": exc.code, "message": exc.message}
    chat, holder = report["chatd"], report["holderd"]
    lines = []
    if not chat["ok"]:
        lines.append(f"chatd: {chat['message']}")
    elif not report["instances"]:  # a chatd alone, not taking turns
        lines.append(f"chatd: {chatd_line(chat)}")
    for instance in report["instances"]:
        lines.append(f"chatd@{instance['instance']}: {chatd_line(instance) if instance['ok'] else instance['message']}")
    if chat["ok"] and chat.get("cluster"):
        lines.append(cluster_line(chat["cluster"]))
    if holder["ok"]:
        lines.append(f"holderd: protocol {holder['version']}, {holderd_holds(holder, chat)}")
    else:
        lines.append(f"holderd: {holder['message']}")
    _print(args, report, "\n".join(lines))
    return 0 if chat["ok"] else 1


def instances_status(control_path: str) -> list[dict]:
    """The status of each chatd taking turns (``chatd --lease``), by its own control socket;
    a socket file nobody listens on (its process died) is left out."""
    found = []
    for name, path in sorted(instance_sockets(control_path).items()):
        try:
            found.append({**control.call("status", path, timeout=3), "instance": name})
        except Error as exc:
            if someone_listens(path):
                found.append({"ok": False, "instance": name, "message": f"does not answer: {exc.message}"})
    return found


def chatd_line(chat: dict) -> str:
    if chat.get("role") == "standby":
        ready = chat.get("prepared")
        ready = (f"; ready: {plural(ready['sockets'], 'client socket')} and {plural(ready['records'], 'record')}, "
                 f"read {ready['refreshed_ms_ago']} ms ago" if ready and ready.get("refreshed_ms_ago") is not None
                 else "")
        return f"pid {chat['pid']}, standby: takes over the moment the one serving dies{ready}"
    if chat.get("awaiting_restore"):
        return f"pid {chat['pid']}, waiting for `chatctl restore`"
    held = chat.get("held", {})
    holders = ", ".join(
        f"{name} {'ok' if ok else 'down' if ok is False else 'unused yet'}"
        + (f" ({plural(held[name], 'fd')})" if held.get(name) is not None else "")
        for name, ok in chat["holders"].items()
    ) or "none"
    web = f" (web {chat['http_port']})" if chat.get("http_port") else ""
    web += f" (metrics {chat['metrics']})" if chat.get("metrics") else ""
    adopting = f" ({chat['adopting']} restored, still being adopted)" if chat.get("adopting") else ""
    started = ""
    if (chat.get("restore") or {}).get("journal") == "state-dir":
        started = f"; started from {chat['journal']}, the holders having kept nothing"
    return (f"pid {chat['pid']}, serving port {chat['port']}{web}, {plural(chat['clients'], 'client')}{adopting}, "
            f"{plural(chat['pairs'], 'pair')}; holders: {holders}{started}")


def holderd_holds(holder: dict, chat: dict) -> str:
    """What holderd holds, in words that agree with chatd's line: chatd's fds are held for
    chatd's uid, which is not the asking one when chatctl runs as root."""
    chatd_uid = chat.get("uid") if chat["ok"] else None
    chatd_held = chat.get("held", {}).get("holderd") if chat["ok"] else None
    if chatd_uid is None or chatd_held is None:
        return f"holds {plural(holder['held'], 'fd')} for uid {holder['uid']} (this user)"
    words = f"holds {plural(chatd_held, 'fd')} for chatd (uid {chatd_uid})"
    if holder["uid"] != chatd_uid and holder["held"]:
        words += f" and {plural(holder['held'], 'fd')} for uid {holder['uid']} (this user)"
    return words


def cluster_line(cluster: dict) -> str:
    """chatd across hosts: who is up, the nicks this host holds, how far behind the stream it is."""
    bus = cluster["bus"]
    link = f"connected to {bus['connected']}" if cluster["connected"] else "NOT connected to NATS (reconnecting)"
    lag = "unknown yet" if bus["lag"] is None else plural(bus["lag"], "message")
    others = ", ".join(cluster["hosts_alive"]) or "none"
    problem = f"; FAILED: {bus['failed']}" if bus.get("failed") else ""
    if cluster.get("fenced"):  # its lease may have lapsed: it told its clients to move (chatd.fencing)
        problem += f"; FENCED: lease not renewed, {plural(cluster.get('moved', 0), 'client')} told to move"
    return (f"cluster: host {cluster['host']}, {link}; other hosts up: {others}; "
            f"{plural(cluster['nicks_held_here'], 'nick')} held here, {cluster['members_elsewhere']} elsewhere; "
            f"stream read to {cluster['cursor']}, lag {lag}; {cluster['forwards_in_flight']} forwards in flight, "
            f"{cluster['stashed']} waiting here{problem}")


def cmd_clients(args) -> int:
    reply = control.call("clients", args.control)
    rows = reply["clients"]
    table = [f"{'ID':>5}  {'NICK':<12} {'TARGET':<12} {'PEER':<12} {'RECV':>6}  {'HELD':<5} REMOTE"]
    for row in rows:
        held = "?" if row["held"] is None else "yes" if row["held"] else "no"
        table.append(
            f"{row['id']:>5}  {row['nick'] or '-':<12} {row['target'] or '-':<12} {row['peer'] or '-':<12} "
            f"{row['received']:>6}  {held:<5} {row['remote']}"
        )
    _print(args, rows, "\n".join(table) if rows else "no clients")
    return 0


def cmd_backup(args) -> int:
    reply = control.call("backup", args.control)
    lines, backed_up = control.backup_report(reply)
    _print(args, reply, "\n".join(lines))
    return 0 if backed_up else 1


def cmd_crash(args) -> int:
    reply = control.call("crash", args.control)
    _print(args, reply, f"chatd (pid {reply['pid']}) is dying of SIGSEGV")
    return 0


def cmd_restore(args) -> int:
    reply = control.call("restore", args.control)
    _print(
        args,
        reply,
        f"restored {plural(reply['clients'], 'client')} and {plural(reply['pairs'], 'pair')} on port {reply['port']} "
        f"in {reply['milliseconds']} ms",
    )
    return 0


def cmd_drain(args) -> int:
    reply = control.call("drain", args.control)
    _print(args, reply, f"ended {reply['drained']} connections (each got BYE; the holders forgot them)")
    return 0


def cmd_handover(args) -> int:
    reply, took = hand_over(args.control, args.timeout)
    _print(args, {**reply, "milliseconds": round(took, 1)},
           f"chatd@{reply['instance']} (pid {reply['pid']}) handed over to chatd@{reply['standby']['instance']} "
           f"(pid {reply['standby']['pid']}), which serves after {took:.0f} ms; the one that handed over exited")
    return 0


def hand_over(control_path: str, timeout: float) -> tuple[dict, float]:
    """Ask the serving chatd to hand over; wait until its standby serves at ``control_path`` and it
    has exited. Its reply, and the milliseconds until the standby served."""
    asked_at = time.monotonic()
    reply = control.call("handover", control_path)
    successor = reply["standby"]["pid"]
    wait_until(lambda: _serving_pid(control_path) == successor, timeout,
               f"chatd@{reply['standby']['instance']} (pid {successor}) to serve")
    took = (time.monotonic() - asked_at) * 1000
    wait_until(lambda: process_identity(reply["pid"]) is None, timeout, f"pid {reply['pid']} to exit")
    return reply, took


def _serving_pid(control_path: str) -> int | None:
    try:
        status = control.call("status", control_path, timeout=3)
    except Error:
        return None  # between the two: nobody answers for a moment
    return status["pid"] if status.get("role") == "serving" else None


def cmd_upgrade(args) -> int:
    """Under systemd: the standby restarted on the new release, the serving one hands over to it,
    then restarted to stand by. Each step printed as it is done; exits 1 at the first that fails,
    with whichever chatd serves still serving."""
    echo = (lambda text: None) if args.json else print
    steps = []

    def done(text: str) -> None:
        steps.append(text)
        echo(text)

    try:
        serving, standby = _the_two_units(args.control)
        old_standby_pid = standby["pid"]
        _systemctl("restart", standby["unit"])
        fresh = wait_until(lambda: _standing_by(args.control, standby["instance"], old_standby_pid), args.timeout,
                           f"{standby['unit']} to stand by")
        done(f"restarted {standby['unit']} on the new release: pid {fresh['pid']} stands by")
        reply, took = hand_over(args.control, args.timeout)
        done(f"{serving['unit']} (pid {reply['pid']}) handed over to {standby['unit']} (pid {fresh['pid']}), "
             f"which serves after {took:.0f} ms with {plural(control.call('status', args.control)['clients'], 'client')}")
        wait_until(lambda: _systemctl("show", "-p", "ActiveState", "--value", serving["unit"]) == "inactive",
                   args.timeout, f"{serving['unit']} to stop (its process exited 0)")
        _systemctl("start", serving["unit"])
        again = wait_until(lambda: _standing_by(args.control, serving["instance"], serving["pid"]), args.timeout,
                           f"{serving['unit']} to stand by")
        done(f"started {serving['unit']} on the new release: pid {again['pid']} stands by")
    except (Error, UpgradeFailed) as exc:
        message = exc.message if isinstance(exc, Error) else str(exc)
        _print(args, {"ok": False, "steps": steps, "message": message}, f"chatctl upgrade: FAILED: {message}")
        return 1
    _print(args, {"ok": True, "steps": steps, "handover_milliseconds": round(took, 1)},
           "upgraded: both instances run the new release")
    return 0


class UpgradeFailed(Exception):
    pass


def _the_two_units(control_path: str) -> tuple[dict, dict]:
    """The serving and the standing-by chatd, each with its systemd unit, or UpgradeFailed saying
    why an upgrade cannot begin (nothing has been touched then)."""
    if shutil.which("systemctl") is None:
        raise UpgradeFailed("systemctl not found: chatctl upgrade restarts systemd's chatd@1 and chatd@2; "
                            "without systemd, start a chatd --lease of the new release beside the one "
                            "serving, then run chatctl handover")
    instances = instances_status(control_path)
    roles = {role: [i for i in instances if i.get("ok") and i.get("role") == role] for role in ("serving", "standby")}
    if len(roles["serving"]) != 1 or len(roles["standby"]) != 1:
        found = ", ".join(f"chatd@{i['instance']} {i.get('role', i.get('message'))}" for i in instances) or "none"
        raise UpgradeFailed(f"an upgrade needs one chatd serving and one standing by (chatd@1 and chatd@2, "
                            f"`systemctl start chatd`); found: {found}")
    for instance in (*roles["serving"], *roles["standby"]):
        instance["unit"] = f"chatd@{instance['instance']}.service"
        main_pid = _systemctl("show", "-p", "MainPID", "--value", instance["unit"])
        if main_pid != str(instance["pid"]):
            raise UpgradeFailed(f"chatd@{instance['instance']} (pid {instance['pid']}) is not systemd's "
                                f"{instance['unit']} (its main pid is {main_pid or 'none'}); without systemd, "
                                "start a chatd --lease of the new release, then run chatctl handover")
    return roles["serving"][0], roles["standby"][0]


def _standing_by(control_path: str, instance: str, not_pid: int) -> dict | None:
    """The status of ``instance`` once a process other than ``not_pid`` stands by there."""
    path = instance_sockets(control_path).get(instance)
    try:
        status = control.call("status", path, timeout=3) if path else None
    except Error:
        return None
    return status if status and status["role"] == "standby" and status["pid"] != not_pid else None


def _systemctl(*argv: str) -> str:
    done = subprocess.run(["systemctl", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise UpgradeFailed(f"systemctl {' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout.strip()


def cmd_install_units(args) -> int:
    try:
        report = install.install_units(args.prefix, args.unit_dir, args.chatd_options, reload=not args.no_reload)
    except install.InstallError as exc:
        print(f"chatctl install-units: {exc}", file=sys.stderr)
        return 1
    lines = [f"wrote {unit}" for unit in report["units"]]
    lines += [f"created system user {user}" for user in report["users_created"]]
    if "defaults" in report:
        lines.append(f"wrote {report['defaults']}")
    lines.append("systemd reloaded; start with: systemctl enable --now chatd" if report["reloaded"]
                 else "not reloaded (--no-reload): run systemctl daemon-reload")
    _print(args, report, "\n".join(lines))
    return 0


def cmd_selftest(args) -> int:
    echo = (lambda text: None) if args.json else print
    try:
        report = selftest.run(args.host, args.port, args.control, crash=not args.no_crash,
                              timeout=args.timeout, echo=echo)
    except (selftest.SelftestFailed, OSError) as exc:
        report = {"ok": False, "message": str(exc)}
        _print(args, report, f"FAIL: {exc}")
        return 1
    if args.json:
        _print(args, report, "")
    return 0


def cmd_client(args) -> int:
    return lineclient.run(args.host, args.port, args.nick, args.pair, sessions=not args.no_session,
                          session_file=args.session_file, retries=args.retries, backoff=args.backoff,
                          backoff_cap=args.backoff_cap, dead_after=args.dead_after)


def cmd_demo(args) -> int:
    return play_demo()


def cmd_cluster(args) -> int:
    from .haproxy import HAProxy, missing_haproxy, tls_cert_problem
    from .hosts import Hosts, missing_for_cluster

    if args.hosts < 1 or args.nats_nodes < 1 or args.lease <= 0:
        print("chatctl cluster: --hosts and --nats-nodes must be 1 or more, --lease more than 0", file=sys.stderr)
        return 2
    if args.tls_cert is not None:
        if not args.haproxy:
            print("chatctl cluster: --tls-cert needs --haproxy PORT,WEBPORT: TLS ends in HAProxy, in front of "
                  "chatd (a TLS session would die with chatd)", file=sys.stderr)
            return 2
        if problem := tls_cert_problem(args.tls_cert):
            print(f"chatctl cluster: {problem}", file=sys.stderr)
            return 2
    missing = missing_for_cluster()
    if args.haproxy and missing_haproxy():
        missing = " and ".join(filter(None, [missing, missing_haproxy()]))
    if missing:
        print(f"chatctl cluster: needs {missing}", file=sys.stderr)
        return 2
    sys.stdout.reconfigure(line_buffering=True)  # each line as it happens, also into a pipe or `tee`
    # `kill PID` and a closed terminal stop everything as Ctrl-C does (rather than leave the hosts
    # running), and so does SIGINT where the shell started us with it ignored (`chatctl cluster &`).
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _interrupt)
    with Hosts(args.hosts, args.nats_nodes, lease=args.lease) as hosts:
        try:
            hosts.start()
        except Error as exc:
            print(f"chatctl cluster: could not start: {exc.message}\n{hosts.logs()[-4000:]}", file=sys.stderr)
            return 1
        chatctl = chatctl_command()
        for index, host in enumerate(hosts.hosts):
            print(f"h{index}: line port {host.port}, web port {host.http_port or '-'}; chatctl for it: "
                  f"{chatctl} --control {host.control_socket} --holder {host.holder_socket}")
        print(f"NATS JetStream: {', '.join(hosts.nats.urls)}; everything in {hosts.workdir}")
        if hosts.nats.secure:
            print(f"NATS is secured: TLS (clients and routes) and a key per host with its permissions, all in "
                  f"{hosts.nats.secrets.directory} (README: Security across hosts)")
        balancer = None
        if args.haproxy:
            line_port, web_port = args.haproxy
            if any(host.http_port is None for host in hosts.hosts):
                print("chatctl cluster: --haproxy needs each host's web port, and this Python lacks h11 or "
                      "wsproto (pip install -e '.[test]')", file=sys.stderr)
                return 2
            balancer = HAProxy(os.path.join(hosts.workdir, "haproxy"),
                               [(host.port, host.http_port) for host in hosts.hosts], line_port, web_port,
                               tls_cert=args.tls_cert)
        try:
            return _run_cluster(args, hosts, balancer, chatctl)
        finally:
            if balancer is not None:
                balancer.close()


def cmd_nats_secrets(args) -> int:
    from .natssecrets import LOOPBACK_NAMES, Secrets, make_secrets

    hosts = [name.strip() for name in args.hosts.split(",") if name.strip()]
    nodes = [name.strip() for name in args.nodes.split(",") if name.strip()]
    names = [name.strip() for name in args.names.split(",") if name.strip()] if args.names else list(LOOPBACK_NAMES)
    if not nodes:
        print("chatctl nats-secrets: --nodes names at least one NATS node (n0,n1,n2)", file=sys.stderr)
        return 2
    try:
        revoke = [name.strip() for name in (args.revoke or "").split(",") if name.strip()]
        changed = make_secrets(args.directory, hosts, nodes, names=names, revoke=revoke)
    except Error as exc:
        print(f"chatctl nats-secrets: {exc.message}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"chatctl nats-secrets: needs {exc.name} (pip install 'process-backup[cluster]')", file=sys.stderr)
        return 2
    secrets = Secrets(args.directory)
    reply = {"ok": True, "directory": secrets.directory, "ca": secrets.ca, **changed,
             "hosts": {host: secrets.host_seed(host) for host in hosts},
             "nodes": {node: {"include": secrets.node_include(node),
                              "include_in_cluster": secrets.node_include(node, routes=True)} for node in nodes}}
    lines = [f"NATS secrets in {secrets.directory}: made {', '.join(changed['made']) or 'nothing new'}"
             + (f"; REVOKED {', '.join(changed['revoked'])} (their keys removed)" if changed["revoked"] else "")]
    for host in hosts:
        lines.append(f"host {host}: copy {secrets.host_seed(host)} (secret: mode 0600, chatd's user) and "
                     f"{secrets.ca} to it; chatd --nats-creds FILE --nats-ca FILE")
    for node in nodes:
        lines.append(f"node {node}: its nats-server.conf includes {secrets.node_include(node)} at the top and "
                     f"{secrets.node_include(node, routes=True)} inside cluster {{ }} (nats-server's include paths "
                     "are relative to the config file)")
    lines.append("then reload every node: nats-server --signal reload (or systemctl reload nats-server); "
                 "a host left out is cut off at the reload")
    _print(args, reply, "\n".join(lines))
    return 0


def _run_cluster(args, hosts, balancer, chatctl: str) -> int:
    """The hosts started: start HAProxy in front of them (if asked), say how to reach them, and
    restart what dies until Ctrl-C, SIGTERM or a crash loop."""
    from .hosts import CrashLoop, RestartLimit, how_it_ended

    haproxy_limit = RestartLimit()
    first, last = hosts.hosts[0], hosts.hosts[-1]
    try:
        if balancer is not None:
            try:
                balancer.start()
            except Error as exc:
                print(f"chatctl cluster: could not start haproxy: {exc.message}", file=sys.stderr)
                return 1
            print(f"HAProxy in front of every host: line port {balancer.line_port}, web port "
                  f"{balancer.web_port} ({balancer.web_url}{', TLS ends here' if balancer.tls_cert else ''}); its config "
                  f"{balancer.config_path}, its log {balancer.log_path}")
        if args.demo:
            return _cluster_demo(hosts)
        # Before the last line: whoever reads it may stop us at once.
        if balancer is not None:
            print(f"through HAProxy: {chatctl} client --port {balancer.line_port} --nick ann --pair bob  and  "
                  f"{chatctl} client --port {balancer.line_port} --nick bob --pair ann")
        print(f"chat across hosts: {chatctl} client --port {first.port} --nick ann --pair bob  and  "
              f"{chatctl} client --port {last.port} --nick bob --pair ann\n"
              f"see one host: {chatctl} --control {first.control_socket} --holder {first.holder_socket} "
              "status\nA chatd or NATS node that dies is restarted (a chatd takes its clients back from its "
              "holderd and journal); Ctrl-C stops everything.")
        while True:
            for line in hosts.revive():
                print(line)
            if balancer is not None and balancer.proc.poll() is not None:
                print(_revive_haproxy(balancer, haproxy_limit, how_it_ended))
            time.sleep(0.2)
    except CrashLoop as exc:
        print(f"chatctl cluster: {exc}\nstopping every host and NATS", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"{exc.args[0] if exc.args else 'SIGINT'}: stopping every host and NATS")
        return 0


def _port_pair(text: str) -> tuple[int, int]:
    try:
        line, web = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two ports, the line port and the web port: 5000,8000") \
            from None
    if not (0 < line < 65536 and 0 < web < 65536) or line == web:
        raise argparse.ArgumentTypeError(f"{text!r}: two different ports, each 1 to 65535")
    return line, web


def _host_ports(text: str) -> tuple[str, int, int]:
    address, _, ports = text.rpartition(":")
    try:
        line, web = _port_pair(ports)
    except argparse.ArgumentTypeError:
        line = web = None
    if not address or line is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give a host's address, its line port and its web port: "
                                         "10.0.0.11:5001,8001")
    return address, line, web


def cmd_haproxy_config(args) -> int:
    from .haproxy import haproxy_config, tls_cert_problem

    if args.tls_cert is not None and (problem := tls_cert_problem(args.tls_cert)):
        # Said, not refused: the config may be meant for another machine, where the file is.
        print(f"chatctl haproxy-config: warning: {problem} (haproxy will not start until it is)", file=sys.stderr)
    line_port, web_port = args.listen
    print(haproxy_config(args.host, line_port, web_port, bind=args.bind, stats_socket=args.stats_socket,
                         tls_cert=args.tls_cert and os.path.abspath(args.tls_cert)), end="")
    return 0


def _revive_haproxy(balancer, limit, how_it_ended) -> str:
    """Start haproxy again, as systemd's Restart= would; CrashLoop past systemd's start limit."""
    from .hosts import CrashLoop

    dead = balancer.proc
    if limit.died(time.monotonic()):
        raise CrashLoop(f"haproxy (pid {dead.pid}) {how_it_ended(dead.returncode)}, its {limit.burst}th death "
                        f"within {limit.interval:g} s: a crash loop, not restarted again. The end of its log "
                        f"{balancer.log_path}:\n{balancer.log_tail()}")
    try:
        balancer.start()
    except Error as exc:
        return f"haproxy (pid {dead.pid}) {how_it_ended(dead.returncode)}; restarting it FAILED: {exc.message}"
    return (f"haproxy (pid {dead.pid}) {how_it_ended(dead.returncode)}; restarted as pid {balancer.proc.pid} "
            "(its clients' connections died with it: they connect again)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def chatctl_command() -> str:
    """How to run this chatctl from any shell: the ``chatctl`` script beside this Python where the
    package is installed (a venv's bin/ need not be on PATH), else this Python on this checkout."""
    script = os.path.join(os.path.dirname(sys.executable), "chatctl")
    if os.access(script, os.X_OK):
        return script
    return f"PYTHONPATH={shlex.quote(SOURCE_ROOT)} {shlex.quote(sys.executable)} -m ctl"


def _cluster_demo(hosts) -> int:
    """ann on the first host and bob on the last chat; the first host's chatd is killed and
    restarted; they chat on, n counting on. Exits 0 only if every line came as it should."""
    from .probe import LineClient

    ann, bob = LineClient(hosts.ports[0], timeout=15), LineClient(hosts.ports[-1], timeout=15)
    ann.send("NICK ann", "PAIR bob")
    bob.send("NICK bob", "PAIR ann")
    expected = [(ann, ["OK NICK ann", "OK PAIR bob", "PAIRED bob"]), (bob, ["OK NICK bob", "OK PAIR ann", "PAIRED ann"])]
    try:
        for client, lines in expected:
            got = client.lines(len(lines))
            assert got == lines, got
        ann.send("MSG hello from h0")
        print("bob got:", bob.line())
        hosts.hosts[0].chatd.send_signal(signal.SIGKILL)
        hosts.hosts[0].chatd.wait(10)
        print("h0's chatd killed (SIGKILL); a new one restores from h0's holderd and journal")
        hosts.restart_chatd(0, wait=True)
        ann.send("MSG still here")
        second = bob.line()
        print("bob got:", second)
        bob.send("MSG welcome back")
        reply = ann.line()
        print("ann got:", reply)
        assert second == "FROM ann 2 still here" and reply == "FROM bob 1 welcome back", (second, reply)
    except (AssertionError, EOFError, OSError) as exc:
        print(f"FAIL: {exc}\n{hosts.logs(nats_tail=1000)}", file=sys.stderr)
        return 1
    print("OK: a pair across two hosts chatted through a crash of one of them")
    return 0


def cmd_shell(args) -> int:
    story = Story()
    print(SHELL_HELP)
    try:
        story.start_chatd()
        story.start_clients()
        actions = {
            "1to2": lambda: story.send("C1", "C2"),
            "2to1": lambda: story.send("C2", "C1"),
            "create": story.create,
            "backup": story.backup,
            "crash": story.crash,
            "restart": lambda: story.start_chatd(restore=True),
            "restore": story.restore,
            "status": lambda: cmd_status(argparse.Namespace(
                control=story.launcher.control_socket, holder=story.launcher.holder_socket, json=False)),
            "help": lambda: print(SHELL_HELP),
        }
        while True:
            try:
                command = input("master> ").strip().lower()
            except EOFError:
                break
            if command in ("exit", "quit"):
                break
            if not command:
                continue
            action = actions.get(command)
            if action is None:
                print(f"unknown instruction {command!r}; type help")
                continue
            try:
                action()
            except Error as exc:
                print(f"error: {exc}")
            except Exception as exc:  # noqa: BLE001 - no instruction may end the console
                print(f"error: {command} failed: {type(exc).__name__}: {exc}")
            time.sleep(0.1)  # let the clients' output land before the next prompt
    except Error as exc:
        print(f"error: {exc}\n{story.logs()}")
        return 1
    finally:
        story.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatctl",
        description="Operate chatd and holderd: see their state, back up, crash and restore chatd, "
        "or play the whole story (demo, shell).",
    )
    parser.add_argument(
        "--control",
        default=control_socket(),
        help="chatd's control socket (default: $CHATD_CONTROL or %(default)s)",
    )
    parser.add_argument(
        "--holder", default=holderd_socket(), help="holderd's socket (default: $HOLDERD_SOCKET or %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text, json_flag=True):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if json_flag:
            sub.add_argument("--json", action="store_true", help="print the reply as JSON")
        sub.set_defaults(func=func)
        return sub

    add("status", cmd_status, "Is chatd serving, how many clients and pairs; with two chatd taking turns "
        "(under systemd: chatd@1, chatd@2), which one serves and which stands by; does holderd answer.")
    add("clients", cmd_clients, "Who is connected, whom they pair with, and whether holderd holds their socket.")
    add("backup", cmd_backup, "Make chatd store every current socket (and its state) in the holders again, in "
        "bulk, and report what each holder then says it keeps. Exits 1 if no holder keeps all of it.")
    add("crash", cmd_crash, "Make chatd die of a real SIGSEGV. Under systemd the standby chatd takes over and "
        "the dead one is restarted as the next standby; by hand, start chatd again: it restores by itself.")
    add("restore", cmd_restore, "Tell a chatd started with --restore --wait to take its sockets back now.")
    add("demo", cmd_demo, "Play the whole story in a scratch directory (no root, no systemd): holderd, chatd, "
        "two clients chat, backup, crash, restart, restore, chat on. Exits 0 only if it all worked.", json_flag=False)
    cluster = add("cluster", cmd_cluster, "Run chatd hosts paired across hosts on this machine, each with its "
                  "own holderd, journal and port, over a NATS JetStream cluster on loopback (needs nats-server "
                  "and nats-py), in a scratch directory, until Ctrl-C. A chatd or NATS node that dies is restarted "
                  "(5 deaths within 10 s stop everything). --demo plays a chat across two hosts "
                  "through a crash of one and exits.", json_flag=False)
    cluster.add_argument("--hosts", type=int, default=3, help="chatd hosts (default %(default)s)")
    cluster.add_argument("--nats-nodes", type=int, default=3, help="NATS servers (default %(default)s: R3)")
    cluster.add_argument("--lease", type=float, default=10.0,
                         help="seconds a lost host keeps its nicks (default %(default)s)")
    cluster.add_argument("--demo", action="store_true", help="play the crash story across hosts and exit")
    cluster.add_argument("--haproxy", type=_port_pair, metavar="PORT,WEBPORT",
                         help="also run HAProxy (Debian's haproxy) on 127.0.0.1 in front of every host: one line "
                         "port and one web port for all clients, a host taken out when its chatd's /healthz "
                         "fails (its config and log in the scratch directory; README: Behind HAProxy)")
    cluster.add_argument("--tls-cert", metavar="PEM",
                         help="with --haproxy: HAProxy's web port speaks https:// and wss://, TLS ending in "
                         "HAProxy with this PEM (certificate, chain and private key in one file; README: The "
                         "web chat over TLS)")
    config = add("haproxy-config", cmd_haproxy_config, "Print the haproxy.cfg to keep for chatd hosts, one or "
                 "many (README: Behind HAProxy): one line port (TCP) and one web port (HTTP and WebSocket, "
                 "over TLS with --tls-cert) for every client, each host checked on chatd's /healthz. "
                 "Write it to /etc/haproxy/haproxy.cfg and `systemctl reload haproxy`.", json_flag=False)
    config.add_argument("--host", type=_host_ports, action="append", required=True, metavar="ADDRESS:LINE,WEB",
                        help="a chatd host: its address, line port and web port, e.g. 10.0.0.11:5001,8080 "
                        "(again for each host)")
    config.add_argument("--listen", type=_port_pair, default=(5000, 8000), metavar="PORT,WEBPORT",
                        help="HAProxy's line port and web port (default 5000,8000; 5000,443 for https)")
    config.add_argument("--bind", default="0.0.0.0", help="HAProxy's address (default %(default)s)")
    config.add_argument("--tls-cert", metavar="PEM",
                        help="end TLS on the web port with this PEM (certificate, chain and private key)")
    config.add_argument("--stats-socket", default="/run/haproxy/chatd.sock",
                        help="HAProxy's admin socket (default %(default)s)")
    secrets = add("nats-secrets", cmd_nats_secrets, "Make what a secured NATS cluster needs in DIR: a CA, each "
                  "node's certificate (routes and clients speak TLS), each chatd host's own key (an nkey) and the "
                  "servers' authorization block, which lets each host do only what chatd needs. Run again to add "
                  "a host (only its key is new) or to revoke one (--revoke), then reload the nodes. A node's "
                  "certificate is kept: remove DIR/nodes/<node>*.pem to make it again with new --names. "
                  "README: Security across hosts.")
    secrets.add_argument("directory", metavar="DIR", help="where the secrets live (kept: made only where missing)")
    secrets.add_argument("--hosts", required=True, metavar="A,B,C",
                         help="every chatd host's --host-id allowed in (each gets a key if it has none)")
    secrets.add_argument("--revoke", metavar="D,E", help="hosts to cut off: their keys removed, their users "
                         "gone from the authorization (a host with a key in neither list is an error)")
    secrets.add_argument("--nodes", default="n0", metavar="N0,N1,N2",
                         help="the NATS nodes' names (default %(default)s), one certificate each")
    secrets.add_argument("--names", metavar="NAME,IP,...",
                         help="the names and addresses chatd hosts and other nodes dial the nodes by, put in "
                         "their certificates (default: localhost,127.0.0.1,::1)")
    add("shell", cmd_shell, "The master console: crash and restore a chatd by hand. It starts its own chatd "
        "and two paired clients in a scratch directory (not a chatd you run), and holderd on `create`; type "
        "1to2, 2to1, create, backup, crash, restart, restore, status, help, exit.", json_flag=False)
    add("drain", cmd_drain, "End every client connection on purpose: each gets BYE, and chatd, holderd and "
        "systemd's fd store forget it. chatd keeps serving new clients. Stopping chatd does not "
        "end connections (holderd keeps them); this does.")
    handover = add("handover", cmd_handover, "Make the serving chatd hand over to its standby (two chatd taking "
                   "turns, chatd --lease): it finishes its loop turn, commits, gives the lease to the standby and "
                   "exits 0; every connection stays. Refused, with chatd still serving, unless a standby waits.")
    handover.add_argument("--timeout", type=float, default=30,
                          help="seconds to wait for the standby to serve (default %(default)s)")
    upgrade = add("upgrade", cmd_upgrade, "Upgrade an installed chatd in place, under systemd, after the new "
                  "release is installed (see README, Upgrading): restart the standby instance (it runs the new "
                  "code), wait until it stands by, make the serving one hand over to it, wait until it serves, "
                  "then start the old instance again: it stands by on the new release. Every connection, pair "
                  "and count stays; a step that fails stops it, with a chatd still serving.")
    upgrade.add_argument("--timeout", type=float, default=60, help="seconds each step may take (default %(default)s)")
    units = add("install-units", cmd_install_units, "Install chatd and holderd under systemd (as root): "
                "create the holderd and chatd users; write holderd.service, chatd@.service (chatd's two "
                "processes, chatd@1 and chatd@2, taking turns) and chatd.service (starts and stops both); "
                "daemon-reload. Start them with: systemctl enable --now chatd.")
    units.add_argument("--prefix", default=sys.prefix,
                       help="where the package is installed, holding bin/chatd (default: this one, %(default)s)")
    units.add_argument("--unit-dir", default="/etc/systemd/system",
                       help="where the unit files go (default %(default)s)")
    units.add_argument("--chatd-options", metavar="OPTIONS",
                       help="write /etc/default/chatd with CHATD_OPTIONS=OPTIONS, e.g. '--host 0.0.0.0'")
    units.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload")
    test = add("selftest", cmd_selftest, "Check a running installation end to end: two probe clients pair and "
               "chat, chatd is crashed (SIGSEGV), a new chatd must take over by itself and the same "
               "connections must chat on. Exits 0 on success.")
    test.add_argument("--host", default="127.0.0.1",
                      help="chatd's address, where the probes connect (default %(default)s)")
    test.add_argument("--port", type=int, default=None,
                      help="chatd's line port (default: the one chatd reports it serves)")
    test.add_argument("--no-crash", action="store_true", help="only chat, do not crash chatd")
    test.add_argument("--timeout", type=float, default=30, help="seconds to wait for the new chatd (default %(default)s)")
    client = add("client", cmd_client, "A line-protocol client: each line typed is a message, a line "
                 "starting with / a command (/who, /pair NAME, /quit, /port: the local port); it prints "
                 "what arrives, numbering messages #1, #2, … The end of input sends QUIT. It keeps a "
                 "session (SESSION, right after connecting): when its connection ends without BYE it says "
                 "'reconnecting…' on stderr, connects again with full-jitter exponential backoff and takes "
                 "the session back (RESUME): the messages go on where they were, none shown twice, and "
                 "what was typed meanwhile is sent once. If chatd no longer has the session (its grace ran "
                 "out) it says so and goes on as a new client (NICK and PAIR again). It exits when chatd "
                 "says BYE, or after --retries tries in a row without taking the session back.",
                 json_flag=False)
    client.epilog = f"exit status: {lineclient.EXIT_STATUS}"
    client.add_argument("--host", default="127.0.0.1", help="chatd's address (default %(default)s)")
    client.add_argument("--port", type=int, default=5001, help="chatd's line port (default %(default)s)")
    client.add_argument("--nick", help="send NICK with this name on connecting")
    client.add_argument("--pair", help="send PAIR with this name on connecting")
    kept = client.add_mutually_exclusive_group()
    kept.add_argument("--no-session", action="store_true",
                      help="ask for no session: a lost connection ends the client (exit 3), as on a chatd "
                      "that keeps none (ERR sessions-off); /session, /resume and /ack are then sent as typed")
    kept.add_argument("--session-file", metavar="FILE",
                      help="keep the session in FILE too (created mode 0600; refused if others may read it): "
                      "the token, the n of the last message shown and the commands not yet handled, so that "
                      "a client started again with this file (within chatd's --session-grace, 120 s by "
                      "default) takes the session back, nick and pairing included, instead of starting anew. "
                      "One client at a time per file; emptied when the session ends (BYE)")
    client.add_argument("--retries", type=int, default=lineclient.RETRIES, metavar="N",
                        help="tries to take the session back before giving up, exit 3 (default %(default)s)")
    client.add_argument("--backoff", type=float, default=lineclient.BACKOFF, metavar="SECONDS",
                        help="try k waits random(0, min(CAP, SECONDS*2^k)), k from 0, and never less than "
                        "an ERR busy <seconds> asked (default %(default)g)")
    client.add_argument("--backoff-cap", type=float, default=lineclient.BACKOFF_CAP, metavar="CAP",
                        help="the most one try waits, before the jitter (default %(default)g)")
    client.add_argument("--dead-after", type=float, default=lineclient.DEAD_AFTER, metavar="SECONDS",
                        help="with a session, give a connection up when chatd sends nothing for this long "
                        "though asked (an ACK after half of it): a half-open connection never ends by "
                        "itself; longer than a crashed chatd's takeover; 0: never (default %(default)g)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Error as exc:
        print(f"chatctl: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
