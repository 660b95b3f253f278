"""The local S3 server's ports (rayclust.seaweed): ``weed mini`` refuses a port that is another
service's gRPC port (P + 10000), so the ports it is given must be apart; and they are drawn again at
each start, since a stopped server's ports are anyone's."""
from __future__ import annotations

import socket

import pytest

from rayclust import seaweed
from rayclust.seaweed import SeaweedS3, free_port_pair, free_ports_apart


def test_ports_drawn_free_are_kept_apart_from_each_others_grpc_ports(monkeypatch):
    """The suite's one such failure, replayed: S3 on 36301, and 46301 (its gRPC port, free) drawn next."""
    draws = iter([46301, 20000, 20000, 30000, 40000, 50000])
    monkeypatch.setattr(seaweed, "free_port_pair", lambda: next(draws))
    assert free_ports_apart(2, taken=[36301]) == [20000, 40000]  # 30000 is 20000's gRPC port; 20000 is taken


def test_real_draws_are_distinct_free_and_apart():
    for _ in range(20):
        s3_port = seaweed.free_port_pair()
        ports = free_ports_apart(5, taken=[s3_port])
        every = [s3_port, *ports]
        twins = {port + 10000 for port in every}
        assert len(set(every)) == 6 and not twins & set(every)


@pytest.mark.slow
def test_a_restart_draws_new_ports_where_another_process_took_the_old_ones(s3_env, tmp_path):
    """An outage test stops the server for seconds; any process may bind its old ports meanwhile (one
    suite run lost its store that way: the metrics port, reused, was taken). Only the S3 port, which
    clients know, stays. (``s3_env``: the credentials the server takes as its identity.)"""
    server = SeaweedS3(tmp_path, free_port_pair(), "restarted")
    server.start()
    try:
        server.filesystem().pipe("restarted/kept", b"data")
        server.stop()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", server.metrics_port))
            squatter.listen()
            server.start()
            assert server.metrics_port != squatter.getsockname()[1]
            assert server.filesystem().cat("restarted/kept") == b"data"
    finally:
        server.stop()
