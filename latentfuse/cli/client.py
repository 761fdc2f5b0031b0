"""`latentfuse client`: one client's job against a `latentfuse serve` server."""

from __future__ import annotations

import argparse
import logging

EXAMPLE = (
    "Example: latentfuse client --server https://server:8443 --token-file client-0.token "
    "--data my_images/ --client-id 0 --config configs/deploy.toml --tls-ca cert.pem"
)


def add_client_parser(commands: argparse._SubParsersAction) -> None:
    """Register the `client` sub-command."""
    client = commands.add_parser(
        "client",
        help="encode this client's data, train its denoiser, upload its releases",
        description=EXAMPLE,
    )
    client.add_argument("--server", required=True, help="server URL (https://host:port)")
    client.add_argument("--token-file", required=True, help="this client's token (mode 600)")
    client.add_argument("--data", required=True, help="this client's images (ImageFolder)")
    client.add_argument("--client-id", type=int, required=True)
    client.add_argument("--config", default="configs/deploy.toml", help="the server's config")
    client.add_argument("--work-dir", help="latents, checkpoint, model (default: client-<id>)")
    client.add_argument("--tls-ca", help="CA or self-signed certificate to trust (PEM)")
    client.add_argument("--max-steps", type=int, help="local steps (default: train.max_steps)")
    client.add_argument(
        "--retry-for",
        type=float,
        default=300.0,
        help="seconds to keep retrying an unreachable server",
    )
    client.add_argument("overrides", nargs="*", help="section.key=value overrides")
    client.set_defaults(func=run_client)


def run_client(args: argparse.Namespace) -> int:
    """Run the client's job; print where its model folder is."""
    logging.getLogger("latentfuse").setLevel(logging.INFO)
    from latentfuse.deploy.client.job import ClientJob
    from latentfuse.deploy.client.remote import RemoteError, RemoteServer, RetryPolicy, read_token
    from latentfuse.deploy.config import load_deploy_config

    config, deploy = load_deploy_config(args.config, args.overrides)
    if not 0 <= args.client_id < config.data.num_clients:
        raise ValueError(
            f"--client-id must lie in [0, {config.data.num_clients}), got {args.client_id}"
        )
    remote = RemoteServer(
        args.server,
        read_token(args.token_file),
        args.client_id,
        tls_ca=args.tls_ca,
        retry=RetryPolicy(budget=args.retry_for),
    )
    try:
        remote.health()
        work_dir = args.work_dir or f"client-{args.client_id}"
        job = ClientJob(config, deploy, args.client_id, args.data, work_dir, remote)
        model = job.run(args.max_steps if args.max_steps is not None else config.train.max_steps)
    except RemoteError as error:  # reported like any bad input: a message, exit status 2
        raise ValueError(f"server {args.server}: {error}") from None
    finally:
        remote.close()
    tls_ca = f" --tls-ca {args.tls_ca}" if args.tls_ca else ""
    print(
        f"client {args.client_id}: {job.step} steps, uploads {job.uploaded}; "
        f"model folder {model} (sample with: latentfuse sample --server {args.server}{tls_ca} "
        f"--token-file {args.token_file} --client-dir {model} --client-id {args.client_id})"
    )
    return 0
