"""`chatfleet epp` as a process, and a client that speaks to it as Envoy's ext_proc filter does."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import httpx
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.procs import ManagedProcess, free_port, wait_until


@dataclass
class EppServer:
    proc: ManagedProcess
    port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10.0).text

    def health(self, service: str) -> int:
        with grpc.insecure_channel(self.address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5.0)
        return int(answer.status)

    def ask(self, headers: Mapping[str, str], body: bytes | None = None, *,
            subset: Sequence[str] | None = None) -> list[pb.ProcessingResponse]:
        """One request's exchange in the Inference Extension's configuration: the headers
        (end of stream when there is no body), then the buffered body; the picker's answers."""
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            return list(stub.Process(_messages(headers, body, subset), timeout=10.0))


def _messages(headers: Mapping[str, str], body: bytes | None,
              subset: Sequence[str] | None) -> Iterator[pb.ProcessingRequest]:
    header_map = HeaderMap(headers=[HeaderValue(key=k.lower(), raw_value=v.encode()) for k, v in headers.items()])
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map, end_of_stream=body is None))
    if subset is not None:
        hint = Struct()
        hint.get_or_create_list("x-gateway-destination-endpoint-subset").extend(list(subset))
        first.metadata_context.CopyFrom(Metadata(filter_metadata={"envoy.lb.subset_hint": hint}))
    yield first
    if body is not None:
        yield pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))


def start_epp(endpoints: Sequence[str] | None, *, args: Sequence[str] = (), ready: bool = True) -> EppServer:
    """``chatfleet epp`` on ``endpoints`` (None: its pool comes from ``args``), once it is ready
    (``ready=False``: once it is live)."""
    port, metrics_port = free_port(), free_port()
    pool = [] if endpoints is None else ["--endpoints", ",".join(endpoints)]
    proc = ManagedProcess([sys.executable, "-m", "chatfleet", "epp", "--host", "127.0.0.1",
                           "--port", str(port), "--metrics-host", "127.0.0.1",
                           "--metrics-port", str(metrics_port), *pool,
                           "--log-level", "warning", *args], name="epp").start()
    proc.wait_http(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
    server = EppServer(proc, port, metrics_port)
    service = "readiness" if ready else "liveness"
    wait_until(lambda: _serving(server, service), timeout=20, message=f"epp {service}")
    return server


def _serving(server: EppServer, service: str) -> bool:
    """The metrics port opens before the gRPC one: refused is "not yet"."""
    try:
        return server.health(service) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        if server.proc.returncode is not None:
            raise RuntimeError(f"epp exited ({server.proc.returncode}):\n{server.proc.log_tail()}") from None
        return False


def destination(responses: Sequence[pb.ProcessingResponse]) -> str:
    """The endpoint the picker named, checked to be the same in the header and the metadata."""
    final = responses[-1]
    kind = final.WhichOneof("response")
    assert kind in ("request_headers", "request_body"), final
    common = getattr(final, kind).response
    header = [h.header.raw_value.decode() for h in common.header_mutation.set_headers
              if h.header.key == "x-gateway-destination-endpoint"]
    metadata = final.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"]
    assert header == [metadata.string_value], final
    return header[0]
