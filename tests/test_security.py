"""TLS, mutual TLS and bearer tokens, end to end with real certificates made at test time.

Relays run the tiny model as one in-process slice: what is under test is the port, not the slices.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOKEN = "s3cret-token-for-tests"
SLICE_OPTIONS = dict(shards=1, use_ray=False, max_context=256, max_new_tokens_cap=64)


# ------------------------------------------------------------------------------------------ certificates


@dataclass
class Issued:
    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(folder: Path, name: str, *, issuer: Issued | None, ca: bool = False, server: bool = False) -> Issued:
    """A certificate for `name`, signed by `issuer` (self-signed when None), written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    if issuer is None:
        issuer_name, signing_key = subject, key
    else:
        issuer_cert = x509.load_pem_x509_certificate(issuer.cert)
        issuer_name, signing_key = issuer_cert.subject, serialization.load_pem_private_key(issuer.key, None)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    elif server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(signing_key, hashes.SHA256())
    cert_pem, key_pem = cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return Issued(cert_pem, key_pem, cert_path, key_path)


@dataclass
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    other_client: Issued  # signed by other_ca: the server must not accept it


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue(folder, "test-ca", issuer=None, ca=True)
    other_ca = _issue(folder, "other-ca", issuer=None, ca=True)
    return Pki(ca=ca, server=_issue(folder, "server", issuer=ca, server=True),
               client=_issue(folder, "client", issuer=ca), other_ca=other_ca,
               other_client=_issue(folder, "intruder", issuer=other_ca))


# ------------------------------------------------------------------------------------------------ relays


def _options(tiny_model: Path, **security):
    from qwen_relay.server.app import ServeOptions

    return ServeOptions(model=str(tiny_model), **SLICE_OPTIONS, **security)


def _client(relay, **kwargs):
    from qwen_relay.client import RelayClient

    return RelayClient(f"127.0.0.1:{relay.port}", timeout=30, **kwargs)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_tls_serves_and_refuses_plaintext(relay_factory, tiny_model, pki):
    relay = relay_factory(_options(tiny_model, tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path)))
    with _client(relay, root_certificates=pki.ca.cert) as client:
        assert client.secure
        assert client.health() == "SERVING"
        assert client.generate("hello", max_new_tokens=3, ignore_eos=True).completion_tokens == 3
    with _client(relay, root_certificates=pki.ca.cert, server_name_override="localhost") as client:
        assert client.tokenize("hello").count > 0
    with _client(relay) as plaintext:
        assert _code(plaintext.health) == grpc.StatusCode.UNAVAILABLE
    with _client(relay, root_certificates=pki.other_ca.cert) as untrusting:  # a server it cannot verify
        assert _code(untrusting.health) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_missing_and_foreign_client_certificates(relay_factory, tiny_model, pki):
    relay = relay_factory(_options(tiny_model, tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path),
                                   tls_client_ca=str(pki.ca.cert_path)))
    with _client(relay, root_certificates=pki.ca.cert, certificate_chain=pki.client.cert,
                 private_key=pki.client.key) as client:
        assert client.health() == "SERVING"
        assert client.generate("hello", max_new_tokens=2, ignore_eos=True).completion_tokens == 2
    with _client(relay, root_certificates=pki.ca.cert) as anonymous:
        assert _code(lambda: anonymous.generate("hello", max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
    with _client(relay, root_certificates=pki.ca.cert, certificate_chain=pki.other_client.cert,
                 private_key=pki.other_client.key) as intruder:
        assert _code(lambda: intruder.generate("hello", max_new_tokens=2)) == grpc.StatusCode.UNAVAILABLE
    with _client(relay) as plaintext:
        assert _code(plaintext.health) == grpc.StatusCode.UNAVAILABLE


def test_bearer_token(relay_factory, tiny_model, caplog):
    caplog.set_level(logging.DEBUG)
    relay = relay_factory(_options(tiny_model, auth_token=TOKEN))
    refused_generate = {"method": "qwen_relay.v1.TextGeneration/Generate", "code": "UNAUTHENTICATED"}
    refused_before = relay.metrics.registry.get_sample_value("qwen_relay_requests_total", refused_generate) or 0
    with _client(relay, auth_token=TOKEN) as client:
        assert client.generate("hello", max_new_tokens=2, ignore_eos=True).completion_tokens == 2
        assert [c.finish_reason for c in client.stream("hi", max_new_tokens=2, ignore_eos=True)][-1] == "length"
        assert client.model_info().slices[0].healthy
    with _client(relay) as anonymous:
        assert anonymous.health() == "SERVING"  # probes need no secret
        assert _code(lambda: anonymous.generate("hello", max_new_tokens=2)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(anonymous.model_info) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: _reflection_services(anonymous)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: _list_adapters(anonymous)) == grpc.StatusCode.UNAUTHENTICATED  # admin above all
    with _client(relay, auth_token=TOKEN) as client:
        assert _list_adapters(client) is not None
    for wrong in (TOKEN + "x", TOKEN[:-1], "", "Bearer"):
        with _client(relay, metadata=[("authorization", f"Bearer {wrong}")]) as impostor:
            assert _code(lambda c=impostor: c.tokenize("hello")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda c=impostor: list(c.stream("hello", max_new_tokens=2))) == \
                grpc.StatusCode.UNAUTHENTICATED
    with _client(relay, metadata=[("authorization", f"Basic {TOKEN}")]) as wrong_scheme:
        assert _code(lambda: wrong_scheme.tokenize("hello")) == grpc.StatusCode.UNAUTHENTICATED
    refused = relay.metrics.registry.get_sample_value("qwen_relay_requests_total", refused_generate)
    assert refused - refused_before == 1  # the metrics interceptor runs first, so it sees refusals
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(relay.options)


def _reflection_services(client) -> list[str]:
    """Lists services over reflection with the client's channel and metadata (reflection needs the token too)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          **client._call_kwargs(None))
    return [s.name for r in responses for s in r.list_services_response.service]


def _list_adapters(client):
    from qwen_relay.v1 import relay_pb2, relay_pb2_grpc

    return relay_pb2_grpc.AdapterAdminStub(client.channel).ListAdapters(relay_pb2.ListAdaptersRequest(),
                                                                        **client._call_kwargs(None))


def test_admin_token_guards_adapter_admin_alone(relay_factory, tiny_model, monkeypatch):
    from qwen_relay.server.cli import build_parser, serve_options
    from qwen_relay.server.security import ADMIN_TOKEN_ENV

    admin_token = "admin-" + TOKEN
    monkeypatch.setenv(ADMIN_TOKEN_ENV, admin_token + "\n")
    assert serve_options(build_parser().parse_args(["serve", "--model", "m"])).admin_token == admin_token
    relay = relay_factory(_options(tiny_model, auth_token=TOKEN, admin_token=admin_token))
    with _client(relay, auth_token=TOKEN) as user:
        assert user.generate("hello", max_new_tokens=2, ignore_eos=True).completion_tokens == 2
        assert _code(lambda: _list_adapters(user)) == grpc.StatusCode.UNAUTHENTICATED  # generating is not enough
    with _client(relay, auth_token=admin_token) as admin:
        assert list(_list_adapters(admin).adapters) == []
        assert _code(lambda: admin.generate("hello", max_new_tokens=2)) == grpc.StatusCode.UNAUTHENTICATED


def test_reflection_with_token(relay_factory, tiny_model):
    relay = relay_factory(_options(tiny_model, auth_token=TOKEN))
    with _client(relay, auth_token=TOKEN) as client:
        assert "qwen_relay.v1.TextGeneration" in _reflection_services(client)


# -------------------------------------------------------------------------------------- no relay needed


def test_half_configured_tls_is_refused(pki):
    from qwen_relay.server.security import server_credentials

    assert server_credentials(None, None) is None
    with pytest.raises(ValueError, match="tls-client-ca"):
        server_credentials(None, None, str(pki.ca.cert_path))
    with pytest.raises(ValueError, match="together"):
        server_credentials(str(pki.server.cert_path), None)
    assert server_credentials(str(pki.server.cert_path), str(pki.server.key_path), str(pki.ca.cert_path))


def test_relay_refuses_client_ca_without_certificate(loop_thread, tiny_model, pki):
    from qwen_relay.server.app import Relay

    with pytest.raises(ValueError, match="tls-client-ca"):
        loop_thread.run(Relay.start(_options(tiny_model, port=0, tls_client_ca=str(pki.ca.cert_path))))


def test_exposed_bind_warns(caplog):
    from qwen_relay.server.security import is_loopback, warn_if_exposed

    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "[::]", "10.0.0.5", "relay.example.com"]))
    with caplog.at_level(logging.WARNING, logger="qwen_relay.server.security"):
        warn_if_exposed("127.0.0.1", tls=False, token=False)
        assert not caplog.records
        warn_if_exposed("0.0.0.0", tls=True, token=True)
        assert not caplog.records
        warn_if_exposed("0.0.0.0", tls=False, token=False)
        assert len(caplog.records) == 2


def test_cli_takes_security_flags_and_token_from_environment(monkeypatch, pki):
    from qwen_relay.server.cli import build_parser, serve_options

    monkeypatch.setenv("QWEN_RELAY_AUTH_TOKEN", TOKEN)
    args = build_parser().parse_args(["serve", "--model", "m", "--tls-cert", "c.pem", "--tls-key", "k.pem",
                                      "--tls-client-ca", "ca.pem", "--metrics-port", "9100"])
    options = serve_options(args)
    assert (options.tls_cert, options.tls_key, options.tls_client_ca, options.metrics_port) == \
        ("c.pem", "k.pem", "ca.pem", 9100)
    assert options.auth_token == TOKEN and TOKEN not in repr(options)
    explicit = serve_options(build_parser().parse_args(["serve", "--model", "m", "--auth-token", "other"]))
    assert explicit.auth_token == "other"
    monkeypatch.delenv("QWEN_RELAY_AUTH_TOKEN")
    assert serve_options(build_parser().parse_args(["serve", "--model", "m"])).auth_token is None


def test_loadtest_reaches_a_secured_relay(relay_factory, tiny_model, pki):
    """`qwen-relay loadtest --target` speaks TLS and sends the token, as the client CLI does."""
    import asyncio

    from qwen_relay.bench.loadgen import LoadConfig, endpoint_from_args, make_requests, run_load
    from qwen_relay.server.cli import build_parser

    relay = relay_factory(_options(tiny_model, tls_cert=str(pki.server.cert_path),
                                   tls_key=str(pki.server.key_path), auth_token=TOKEN))
    flags = ["loadtest", "--target", f"localhost:{relay.port}", "--ca-cert", str(pki.ca.cert_path)]
    config = LoadConfig(requests=4, concurrency=2, distinct=2, max_new_tokens=(2, 3), seed=1)
    requests = make_requests(config, vocab_size=relay.config.vocab_size)
    secured = endpoint_from_args(build_parser().parse_args([*flags, "--auth-token", TOKEN]))
    report = asyncio.run(run_load(secured, requests, config))
    assert [r.code for r in report.results] == ["OK"] * 4
    anonymous = endpoint_from_args(build_parser().parse_args(flags))
    report = asyncio.run(run_load(anonymous, requests, config))
    assert {r.code for r in report.results} == {"UNAUTHENTICATED"}
