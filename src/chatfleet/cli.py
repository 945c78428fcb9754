"""The ``chatfleet`` command: serve, engine-sim, config, operator, simulate, bench, kb.

Every command exits with the codes of chatfleet/exits.py (docs/cli.md), and says on failure what
happened and what to type next.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from chatfleet.bench.cli import bench_app
from chatfleet.exits import EXIT_CODES_HELP, ExitCode, fail
from chatfleet.logs import configure_logging
from chatfleet.rag.cli import kb_app
from chatfleet.pod.cpu import auto_workers
from chatfleet.settings import EngineKind, Settings, masked_dump
from chatfleet.sim.cli import simulate_command

if TYPE_CHECKING:
    from chatfleet.routing.kube_pool import PoolRef

__all__ = ["app"]

app = typer.Typer(name="chatfleet", no_args_is_help=True, add_completion=False,
                  help="ChatFleet: a chat gateway that owns a measured queue in front of vLLM.",
                  epilog=EXIT_CODES_HELP)


def _load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with command-line flags (when given) on top; exits 2 with
    each problem named by its variable when they are not valid."""
    try:
        settings = Settings()
        if overrides:
            data = settings.model_dump()
            for dotted, value in overrides.items():
                if value is None:
                    continue
                section, key = dotted.split(".")
                data[section][key] = value
            settings = Settings.model_validate(data)
    except ValidationError as exc:
        fail(_invalid_configuration(exc), ExitCode.USAGE)
    except SettingsError as exc:  # a CHATFLEET_<SECTION> variable that is not a JSON object
        fail(f"invalid configuration, nothing started: {exc}: set each key on its own, e.g. "
             "CHATFLEET_ENGINE__KIND=openai", ExitCode.USAGE)
    return settings


def _invalid_configuration(exc: ValidationError) -> str:
    """One line per problem: the key and its variable, and pydantic's reason (never the value,
    which may be a secret)."""
    lines = ["invalid configuration, nothing started:"]
    for error in exc.errors(include_url=False, include_input=False):
        keys = [part for part in error["loc"] if isinstance(part, str)]
        reason = error["msg"].removeprefix("Value error, ")
        if keys and "CHATFLEET_" not in reason:  # a model validator's message names its variables
            reason = f"{'.'.join(keys)} (CHATFLEET_{'__'.join(keys).upper()}): {reason}"
        lines.append(f"  {reason}")
    lines.append("Fix the CHATFLEET_* variables (or the flags) named above and run again; the "
                 "README's Configuration table and src/chatfleet/settings.py list every key.")
    return "\n".join(lines)


def _listen(host: str, port: int, send_buffer_bytes: int | None, *, env_hint: str = "") -> socket.socket:
    """The listening socket, bound before anything starts; exits 2 saying how to pick another
    address when this one cannot be used. ``env_hint``: the variables that also set it."""
    from chatfleet.server import listening_socket

    try:
        return listening_socket(host, port, send_buffer_bytes)
    except OSError as exc:
        also = f" (or {env_hint})" if env_hint else ""
        if exc.errno == errno.EADDRINUSE:
            fail(f"cannot listen on {host}:{port}: another process listens there: stop it, or "
                 f"pick another port with --port {port + 1}{also}", ExitCode.USAGE)
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        fail(f"cannot listen on {host}:{port} ({why}): pick another address with --host and "
             f"--port{also}", ExitCode.USAGE)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env CHATFLEET_SERVER__HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env CHATFLEET_SERVER__PORT]")] = None,
    workers: Annotated[str | None, typer.Option(
        help="Worker processes on the one port: a number, or auto (the container's CPU limit) "
             "[env CHATFLEET_SERVER__WORKERS; default 1]")] = None,
) -> None:
    """Run the gateway (default engine: the embedded simulated engine)."""
    settings = _load_settings(**{"server.host": host, "server.port": port,
                                 "server.workers": workers})
    count = _worker_count(settings)
    sock = _listen(settings.server.host, settings.server.port, settings.server.send_buffer_bytes,
                   env_hint="CHATFLEET_SERVER__HOST, CHATFLEET_SERVER__PORT")
    configure_logging(settings.server.log_level, settings.log.format)
    if count > 1:
        from chatfleet.pod.launch import run_pod

        raise typer.Exit(run_pod(settings, sock, count))
    from chatfleet.pod.worker import serve_gateway

    serve_gateway(settings, sock)


def _worker_count(settings: Settings) -> int:
    """``server.workers`` as a number (``auto`` resolved); exits 2 when the simulated engine is
    asked to run in more than one process."""
    wanted = settings.server.workers
    simulated = settings.engine.kind is EngineKind.SIMULATED
    if wanted == "auto":
        return 1 if simulated else auto_workers()
    if simulated and wanted > 1:
        fail(f"server.workers is {wanted} but the engine is the embedded simulated one, which "
             "lives in one process: run the engine apart with `chatfleet engine-sim` and set "
             "CHATFLEET_ENGINE__KIND=openai and CHATFLEET_ENGINE__URL=http://127.0.0.1:8001/v1 "
             "(and CHATFLEET_ENGINE__MODEL=chatfleet-sim/tiny-cpu), or use one worker",
             ExitCode.USAGE)
    return wanted


@app.command("engine-sim")
def engine_sim(
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8001,
    profile: Annotated[str, typer.Option(help="Latency profile (engines/profiles/*.json)")] = "tiny-cpu",
    max_num_seqs: Annotated[int | None, typer.Option(
        help="Sequences batched at once, like vLLM's --max-num-seqs (default: the profile's)")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the token text and output lengths")] = 0,
    embedding_model: Annotated[str, typer.Option(
        help="Model name /v1/embeddings accepts besides the served model id (what the gateway's "
             "kb.embeddings.model names)")] = "chatfleet-sim/hashed-embedding",
    embedding_dim: Annotated[int, typer.Option(
        min=1, help="Dimensions of /v1/embeddings' hashed vectors")] = 256,
    log_level: Annotated[str, typer.Option(help="Log level")] = "info",
) -> None:
    """Run the simulated engine as an OpenAI-compatible server with vLLM's metric names."""
    import uvicorn

    from chatfleet.api.engine_sim import create_engine_sim_app
    from chatfleet.engines.engine_model import load_profile
    from chatfleet.server import listen_url

    try:
        loaded = load_profile(profile)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile") from exc
    if max_num_seqs is not None and max_num_seqs < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--max-num-seqs")
    sock = _listen(host, port, None)
    configure_logging(log_level)
    sim = create_engine_sim_app(loaded, seed=seed, max_num_seqs=max_num_seqs,
                                embedding_model=embedding_model, embedding_dim=embedding_dim)
    server = uvicorn.Server(uvicorn.Config(sim, host=host, port=port, log_level=log_level,
                                           access_log=False))
    # uvicorn announces the address only of a socket it bound itself.
    logging.getLogger("chatfleet.engine_sim").info("engine-sim %s listening on %s", loaded.name,
                                                   listen_url(sock))
    server.run(sockets=[sock])


@app.command()
def config() -> None:
    """Print the effective configuration (environment applied, secrets masked) as JSON."""
    typer.echo(json.dumps(masked_dump(_load_settings()), indent=2))


@app.command()
def operator(
    prometheus_url: Annotated[str, typer.Option(help="Prometheus HTTP API base URL")],
    interval: Annotated[float, typer.Option(help="Seconds between ticks of each policy")] = 30.0,
    metrics_host: Annotated[str, typer.Option(help="Bind address of /metrics")] = "0.0.0.0",
    metrics_port: Annotated[int, typer.Option(help="Port of the operator's own /metrics")] = 9090,
    peering: Annotated[str, typer.Option(
        help="kopf ClusterKopfPeering (or KopfPeering with --namespace) that keeps one "
             "instance active")] = "chatfleet-operator",
    standalone: Annotated[bool, typer.Option(
        help="No peering: for one replica, or a cluster without kopf's peering CRD")] = False,
    priority: Annotated[int | None, typer.Option(
        help="Peering priority: the live instance with the highest acts, the others stand by. "
             "Default: random, so that replicas never tie")] = None,
    liveness: Annotated[str | None, typer.Option(
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")] = None,
    namespace: Annotated[list[str] | None, typer.Option(
        help="Namespace to watch (repeat); default: all")] = None,
    log_level: Annotated[str, typer.Option(help="Log level")] = "info",
) -> None:
    """Run the kopf operator that sets the HPA's floor from ChatFleetPolicy resources."""
    from chatfleet.autoscale.operator import OperatorConfig, configure_logging, run

    configure_logging(log_level)
    run(OperatorConfig(prometheus_url=prometheus_url, interval_s=interval,
                       metrics_host=metrics_host, metrics_port=metrics_port,
                       peering_name=None if standalone else peering, priority=priority,
                       liveness_endpoint=liveness, namespaces=tuple(namespace or ())))


@app.command()
def epp(
    endpoints: Annotated[str | None, typer.Option(
        help="A static pool: its gateways, ip:port[,ip:port...] (their GET /load is polled)")] = None,
    pool_name: Annotated[str | None, typer.Option(
        help="In a cluster: the InferencePool whose ready pods are the pool (watched through the "
             "Kubernetes API)")] = None,
    pool_namespace: Annotated[str | None, typer.Option(
        help="The InferencePool's namespace (default: the picker's own)")] = None,
    kube_api: Annotated[str | None, typer.Option(
        help="The Kubernetes API's URL (default: in a pod, the cluster's, with its service account)")] = None,
    kube_token_file: Annotated[str | None, typer.Option(
        help="With --kube-api: a file holding the bearer token (read again for every call)")] = None,
    kube_ca_file: Annotated[str | None, typer.Option(
        help="With an https --kube-api: the CA that signed the API server's certificate "
             "(default: the system's CAs)")] = None,
    host: Annotated[str, typer.Option(help="Bind address of the gRPC ext_proc service")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port of the gRPC ext_proc service")] = 9002,
    metrics_host: Annotated[str, typer.Option(help="Bind address of /metrics")] = "0.0.0.0",
    metrics_port: Annotated[int, typer.Option(help="Port of the picker's own /metrics")] = 9090,
    poll_interval: Annotated[float, typer.Option(help="Seconds between polls of each pod's load")] = 0.05,
    stale_after: Annotated[float, typer.Option(
        help="A pod whose load is older than this many seconds gets no request")] = 2.0,
    forget_pick_after: Annotated[float, typer.Option(
        help="A request sent to a pod counts against it until the pod's load shows it arrived, or "
             "for at most this many seconds (it never reached the pod's admission)")] = 1.0,
    batch_queue_share: Annotated[float, typer.Option(
        help="Batch requests queue on a pod only while its queue is below this share of its bound")] = 0.5,
    engine_metrics_port: Annotated[int | None, typer.Option(
        help="Also read each pod's engine KV-cache usage from its /metrics on this port of the "
             "pod's IP (vLLM: 8001); a fuller cache counts as more load")] = None,
    prefix_chars: Annotated[int, typer.Option(
        help="Prefix affinity: requests whose prompts agree on this many leading characters go to "
             "the same pod while it has room (0: off)")] = 0,
    log_level: Annotated[str, typer.Option(help="Log level")] = "info",
) -> None:
    """Run the endpoint picker (Gateway API Inference Extension, Envoy ext_proc) for a pool of pods."""
    from chatfleet.routing.epp import EppConfig, run
    from chatfleet.routing.scoring import RoutingSpec

    if (endpoints is None) == (pool_name is None):
        raise typer.BadParameter("give exactly one of --endpoints (a static pool) and --pool-name (an "
                                 "InferencePool's pods)", param_hint="--endpoints / --pool-name")
    pool: tuple[str, ...] = ()
    if endpoints is not None:
        pool = tuple(dict.fromkeys(e.strip() for e in endpoints.split(",") if e.strip()))
        bad = [e for e in pool if not _is_endpoint(e)]
        if bad or not pool:
            raise typer.BadParameter(f"not ip:port: {', '.join(bad) or '(empty)'}", param_hint="--endpoints")
    pool_ref = None if pool_name is None else _pool_ref(pool_name, pool_namespace, kube_api, kube_token_file,
                                                        kube_ca_file)
    if not 0.0 <= batch_queue_share <= 1.0:
        raise typer.BadParameter(f"{batch_queue_share} is not in [0, 1]", param_hint="--batch-queue-share")
    if poll_interval <= 0 or stale_after <= 0 or forget_pick_after <= 0 or prefix_chars < 0:
        raise typer.BadParameter("--poll-interval, --stale-after and --forget-pick-after must be "
                                 "positive, --prefix-chars >= 0")
    configure_logging(log_level)
    run(EppConfig(host=host, port=port, metrics_host=metrics_host, metrics_port=metrics_port,
                  endpoints=pool, pool_ref=pool_ref, poll_interval_s=poll_interval, prefix_chars=prefix_chars,
                  engine_metrics_port=engine_metrics_port, forget_pick_after_s=forget_pick_after,
                  spec=RoutingSpec(stale_after_s=stale_after, batch_queue_share=batch_queue_share)))


def _pool_ref(name: str, namespace: str | None, api_url: str | None, token_file: str | None,
              ca_file: str | None) -> PoolRef:
    """The InferencePool ``chatfleet epp --pool-name`` follows, and the API server to ask."""
    from pathlib import Path

    from chatfleet.routing.kube_pool import KubeApi, KubeError, PoolRef, default_namespace

    if api_url is None:
        if token_file is not None or ca_file is not None:
            raise typer.BadParameter("only with --kube-api (in a pod the service account's are used)",
                                     param_hint="--kube-token-file / --kube-ca-file")
        try:
            api = KubeApi.in_cluster()
        except KubeError as exc:
            raise typer.BadParameter(str(exc), param_hint="--kube-api") from exc
    elif not api_url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{api_url!r} is not an http(s) URL", param_hint="--kube-api")
    else:
        for hint, path in (("--kube-token-file", token_file), ("--kube-ca-file", ca_file)):
            if path is not None and not Path(path).is_file():
                raise typer.BadParameter(f"{path} is not a file", param_hint=hint)
        api = KubeApi(api_url, None if token_file is None else Path(token_file),
                      None if ca_file is None else Path(ca_file))
    try:
        api.verify()
    except OSError as exc:  # ssl.SSLError included
        raise typer.BadParameter(f"{api.ca_file} is not a PEM CA certificate: {exc}",
                                 param_hint="--kube-ca-file") from exc
    namespace = namespace or default_namespace()
    if not namespace:
        raise typer.BadParameter("not in a pod, so name the InferencePool's namespace",
                                 param_hint="--pool-namespace")
    return PoolRef(api, namespace, name)


def _is_endpoint(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


app.command("simulate")(simulate_command)
app.add_typer(kb_app, name="kb", help="Manage a running gateway's knowledge bases.")
app.add_typer(bench_app, name="bench", help="Load-test an OpenAI-compatible server.")
