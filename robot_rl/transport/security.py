"""Loopback-by-default binding and CURVE authentication for the transport sockets.

Key layout (see docs/protocol.md, "CURVE"):
  learner:  <dir>/server.key, <dir>/server.key_secret, <dir>/authorized_clients/<robot>.key
  robot:    <dir>/client.key, <dir>/client.key_secret, plus a copy of the learner's server.key
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
import os
import time
import threading
from dataclasses import dataclass

import zmq
import zmq.auth
import zmq.utils.z85


@dataclass(frozen=True)
class CurveServerKeys:
    public: bytes
    secret: bytes
    # Directory of authorized client public keys (*.key); None accepts any client holding the server key.
    authorized_clients_dir: str | None = None


@dataclass(frozen=True)
class CurveClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, localhost or ::1."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    hostport = endpoint[len("tcp://") :]
    if ";" in hostport:  # "source;destination" form: judge the destination
        hostport = hostport.split(";", 1)[1]
    if hostport.startswith("["):
        host = hostport[1 : hostport.find("]")] if "]" in hostport else ""
    else:
        host = hostport.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(endpoint: str, curve: CurveServerKeys | None) -> None:
    """Refuse to bind a network-reachable address without CURVE keys."""
    if curve is None and not is_loopback(endpoint):
        raise ValueError(
            f"refusing to bind {endpoint} without CURVE authentication: run `robot-rl keys` (or "
            "robot_rl.transport.generate_keys) and pass CurveServerKeys, or bind to 127.0.0.1 / an ipc:// path"
        )


def generate_keys(directory: str, name: str = "server") -> tuple[str, str]:
    """Create `<directory>/<name>.key` (public, share it) and `<name>.key_secret` (keep it); returns both paths."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def fleet_keys(directory: str, robots: int) -> dict[str, str]:
    """CURVE keys for a learner and `robots` robots, each robot with its own key pair (revoke one by deleting its
    public key from the learner's authorized_clients/). Refuses to overwrite: robots may already hold the keys.

        <directory>/learner/server.key, server.key_secret, authorized_clients/robot<k>.key   the learner machine
        <directory>/robot<k>/client.key, client.key_secret, server.key                      robot k's machine
    Returns {"learner": dir, "robot<k>": dir, ...}."""
    import shutil

    root = os.path.abspath(directory)
    learner = os.path.join(root, "learner")
    if os.path.exists(os.path.join(learner, "server.key_secret")):
        raise FileExistsError(f"{learner} already holds server keys: use another directory or delete it first")
    os.makedirs(os.path.join(learner, "authorized_clients"), exist_ok=True)
    server_public, _ = generate_keys(learner, "server")
    out = {"learner": learner}
    for k in range(int(robots)):
        robot = os.path.join(root, f"robot{k}")
        public, _ = generate_keys(robot, "client")
        shutil.copy(server_public, os.path.join(robot, "server.key"))
        shutil.copy(public, os.path.join(learner, "authorized_clients", f"robot{k}.key"))
        out[f"robot{k}"] = robot
    return out


def load_server_keys(directory: str, name: str = "server") -> CurveServerKeys:
    """Server keys from `<directory>/<name>.key_secret`; clients allowed: `<directory>/authorized_clients/*.key`."""
    public, secret = _load_secret(directory, name)
    auth_dir = os.path.join(directory, "authorized_clients")
    return CurveServerKeys(public, secret, auth_dir if os.path.isdir(auth_dir) else None)


def load_client_keys(directory: str, server_public_file: str, name: str = "client") -> CurveClientKeys:
    """Client keys from `<directory>/<name>.key_secret` plus the server's public key file."""
    public, secret = _load_secret(directory, name)
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    return CurveClientKeys(public, secret, server_public)


def _load_secret(directory: str, name: str) -> tuple[bytes, bytes]:
    path = os.path.join(directory, f"{name}.key_secret")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no CURVE secret key at {path}: create one with `robot-rl keys` / generate_keys")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


# One ThreadAuthenticator per zmq context, shared by every CURVE server socket in it. Each server socket gets its
# own ZAP domain, so a receiver and a publisher in one process can authorize different client key sets.
_auth_lock = threading.Lock()
_auths: dict[int, list] = {}  # id(context) -> [authenticator, users]
_domain_ids = itertools.count()
# ZAP domain -> (peer address, client public key as Z85) of the latest refused CURVE clients: libzmq's socket monitor
# reports a failed handshake without the peer, so a receiver names the refused client from here.
_denials: dict[str, collections.deque] = {}


def zap_denials(sock: zmq.Socket) -> list[tuple[str, str]]:
    """(address, client key) of clients the ZAP handler refused on this server socket, oldest first; consumed."""
    domain = (sock.zap_domain or b"").decode()
    with _auth_lock:
        q = _denials.get(domain)
        out = list(q) if q else []
        if q:
            q.clear()
    return out


def _record_denials(auth) -> None:
    """Wrap the authenticator so each refusal is remembered with the peer's address and key."""
    handle, reply, current = auth.handle_zap_message, auth._send_zap_reply, {}

    async def handle_zap_message(msg):
        current["msg"] = msg
        try:
            return await handle(msg)
        finally:
            current.clear()

    def send_zap_reply(request_id, status_code, status_text, user_id="anonymous"):
        msg = current.get("msg")
        if status_code != b"200" and msg is not None and len(msg) >= 6:
            domain, address = msg[2].decode(errors="replace"), msg[3].decode(errors="replace")
            key = (
                zmq.utils.z85.encode(msg[6]).decode()
                if msg[5] == b"CURVE" and len(msg) > 6 and len(msg[6]) == 32
                else "?"
            )
            with _auth_lock:
                _denials.setdefault(domain, collections.deque(maxlen=100)).append((address, key))
        return reply(request_id, status_code, status_text, user_id)

    auth.handle_zap_message, auth._send_zap_reply = handle_zap_message, send_zap_reply


ZAP_REBIND_WAIT_S = 5.0  # how long a new ZAP handler waits for a just-stopped one's inproc endpoint to be released


def _start_authenticator(ctx: zmq.Context):
    """The context's ZAP handler. A handler stopped a moment ago on the same context releases its inproc endpoint
    only when zmq's reaper closes its socket (later on a busy machine): wait for it rather than fail."""
    from zmq.auth.thread import ThreadAuthenticator

    deadline = time.monotonic() + ZAP_REBIND_WAIT_S
    while True:
        auth = ThreadAuthenticator(ctx)
        _record_denials(auth)
        try:
            auth.start()
            return auth
        except zmq.ZMQError as e:
            if getattr(auth, "zap_socket", None) is not None:
                auth.zap_socket.close(linger=0)
            if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def setup_server_socket(sock: zmq.Socket, curve: CurveServerKeys | None) -> None:
    if curve is None:
        return
    ctx = sock.context
    with _auth_lock:
        entry = _auths.get(id(ctx))
        if entry is None:
            entry = _auths[id(ctx)] = [_start_authenticator(ctx), 0]
        entry[1] += 1
        domain = f"robot_rl-{os.getpid()}-{next(_domain_ids)}"
        location = curve.authorized_clients_dir or zmq.auth.CURVE_ALLOW_ANY
        entry[0].configure_curve(domain=domain, location=location)
    sock.zap_domain = domain.encode()
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_server = True


def release_server_socket(sock: zmq.Socket, curve: CurveServerKeys | None) -> None:
    if curve is None:
        return
    with _auth_lock:
        entry = _auths.get(id(sock.context))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].stop()
            del _auths[id(sock.context)]


def setup_client_socket(sock: zmq.Socket, curve: CurveClientKeys | None) -> None:
    if curve is None:
        return
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_serverkey = curve.server_public
