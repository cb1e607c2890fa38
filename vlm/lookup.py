"""A name lookup that ends at a VLM query's deadline: a guard, and a leaf (vlm/client.py:GUARDS).

socket.getaddrinfo cannot be interrupted, so a DNS server that never answers would hold the query for
ever. The lookup of a host that is not loopback runs in a daemon thread instead, waited for until the
deadline and left behind when late; a loopback host's is made at once (it asks no DNS server).
"""
import socket
import threading
import time

from vlm.client import QueryError, is_loopback


def create_connection(getaddrinfo, deadline: float, address: tuple[str, int], timeout: float | None = None,
                      source_address=None) -> socket.socket:
    """socket.create_connection(address, ...) with the addresses `getaddrinfo` finds, the lookup and
    the connecting both ended by `deadline` (time.monotonic()); `timeout` is left for the deadline's."""
    host, port = address
    found = [QueryError(f"name lookup for {host} took longer than the deadline")]  # then what the lookup found

    def look_up():
        try:
            found.append(getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as e:  # raised below, in the query's thread
            found.append(e)
    if is_loopback(host):
        look_up()
    else:
        thread = threading.Thread(target=look_up, daemon=True)
        thread.start()
        thread.join(deadline - time.monotonic())
    if isinstance(outcome := found[-1], Exception):  # read once: a late lookup may still append
        raise outcome
    error = QueryError(f"name lookup for {host} found no address")  # or the last address's failure
    for *_, ip in outcome:  # each address in turn, as socket.create_connection does
        try:
            return socket.create_connection(ip[:2], max(0.001, deadline - time.monotonic()), source_address)
        except OSError as e:
            error = e
    raise error
