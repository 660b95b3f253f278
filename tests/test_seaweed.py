"""The local S3 server's ports (rayclust.seaweed): ``weed mini`` refuses a port that is another
service's gRPC port (P + 10000), so the ports it is given must be apart."""
from __future__ import annotations

from rayclust import seaweed
from rayclust.seaweed import free_ports_apart


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
