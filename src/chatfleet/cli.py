"""The ``chatfleet`` command: serve, engine-sim, config, operator, simulate, bench."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from chatfleet.logs import configure_logging
from chatfleet.rag.cli import kb_app
from chatfleet.settings import Settings, masked_dump
from chatfleet.sim.cli import simulate_command

__all__ = ["app"]

app = typer.Typer(name="chatfleet", no_args_is_help=True, add_completion=False,
                  help="ChatFleet: a chat gateway that owns a measured queue in front of vLLM.")
err = Console(stderr=True)


def _load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with command-line flags (when given) on top."""
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
        err.print(f"[red]invalid configuration:[/red]\n{exc}")
        raise typer.Exit(2) from exc
    return settings


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env CHATFLEET_SERVER__HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env CHATFLEET_SERVER__PORT]")] = None,
) -> None:
    """Run the gateway (default engine: the embedded simulated engine)."""
    from chatfleet.app import create_app, startup_fields
    from chatfleet.server import serve_app

    settings = _load_settings(**{"server.host": host, "server.port": port})
    configure_logging(settings.server.log_level, settings.log.format)
    gateway = create_app(settings)
    serve_app(gateway, host=settings.server.host, port=settings.server.port,
              log_level=settings.server.log_level, drain_timeout_s=settings.server.drain_timeout_s,
              keep_alive_s=settings.server.keep_alive_s, slow_callback_s=settings.server.slow_callback_s,
              send_buffer_bytes=settings.server.send_buffer_bytes,
              describe=startup_fields(gateway))


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

    try:
        loaded = load_profile(profile)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile") from exc
    if max_num_seqs is not None and max_num_seqs < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--max-num-seqs")
    configure_logging(log_level)
    sim = create_engine_sim_app(loaded, seed=seed, max_num_seqs=max_num_seqs,
                                embedding_model=embedding_model, embedding_dim=embedding_dim)
    uvicorn.run(sim, host=host, port=port, log_level=log_level, access_log=False)


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


app.command("simulate")(simulate_command)
app.add_typer(kb_app, name="kb", help="Manage a running gateway's knowledge bases.")


def _mount_bench() -> None:
    try:
        from chatfleet.bench.cli import bench_app
    except ImportError:  # the bench extra (matplotlib, numpy) is not installed
        return
    app.add_typer(bench_app, name="bench", help="Load-test an OpenAI-compatible server.")


_mount_bench()
