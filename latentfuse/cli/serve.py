"""`latentfuse serve`: the CollaFuse server over HTTP(S); `--make-tokens` issues client tokens."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

EXAMPLE = (
    "Example: latentfuse serve --make-tokens 0,1,2 --clients deploy/clients.json "
    "--token-dir deploy/tokens\n"
    "         latentfuse serve --config configs/deploy.toml --clients deploy/clients.json "
    "--state-dir deploy/server --host 0.0.0.0 --port 8443 --tls-cert cert.pem --tls-key key.pem"
)


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    """Register the `serve` sub-command."""
    serve = commands.add_parser(
        "serve",
        help="run the CollaFuse server (training + sampling) over HTTP(S)",
        description=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", help="TOML run config with a [deploy] table")
    serve.add_argument("--clients", help="clients.json: the token hashes (required to serve)")
    serve.add_argument("--state-dir", help="releases, checkpoints (survives restarts)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--tls-cert", help="PEM certificate (with --tls-key: serve HTTPS)")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument(
        "--insecure-http",
        action="store_true",
        help="allow plain HTTP on a non-loopback address (tokens travel in clear text)",
    )
    serve.add_argument(
        "--no-train",
        action="store_true",
        help="start no trainer: sample the published weights (run the trainer yourself: "
        "accelerate launch -m latentfuse.deploy.server.train_server --config ... --state-dir ...)",
    )
    serve.add_argument(
        "--trainer-processes",
        type=int,
        default=1,
        metavar="N",
        help="the trainer: its own process group of N processes under `accelerate launch`, "
        "started and watched by this front (DDP over GPUs, or CPU processes without them)",
    )
    serve.add_argument(
        "--trainer-thread",
        action="store_true",
        help="train in a thread of this process instead (one process for everything: "
        "simplest, no Accelerate launcher, no data parallelism)",
    )
    serve.add_argument(
        "--api-docs",
        action="store_true",
        help="serve /docs and /openapi.json (off by default: they describe the API to anyone)",
    )
    serve.add_argument("--init-from", help="model folder whose server_unet weights to start from")
    serve.add_argument(
        "--make-tokens",
        metavar="IDS",
        help="comma-separated client ids: write their tokens to --token-dir, hashes to --clients",
    )
    serve.add_argument("--token-dir", default="tokens", help="where --make-tokens writes tokens")
    serve.add_argument(
        "--declare",
        action="append",
        default=[],
        metavar="ID=NAMES",
        help="with --make-tokens: the classes client ID declares, comma-separated names "
        "(e.g. 0=cat,dog); its releases may carry only these labels "
        "(unless deploy.undeclared_classes = true)",
    )
    serve.add_argument(
        "--remove-releases",
        metavar="ID",
        type=int,
        help="operator command: remove client ID's releases from --state-dir (all, or those "
        "after --after), revoke its token in --clients (unless --keep-token) and exit; a running "
        "trainer drops the releases at its next step and rolls its weights back to the newest "
        "kept checkpoint trained on none of them (deploy.roll_back_checkpoints; a stopped one "
        "at its start), the front answers the token 401 at once",
    )
    serve.add_argument("--after", metavar="UPLOAD_ID", help="with --remove-releases")
    serve.add_argument(
        "--keep-token",
        action="store_true",
        help="with --remove-releases: leave the client's token valid (it can upload again)",
    )
    serve.add_argument("overrides", nargs="*", help="section.key=value overrides")
    serve.set_defaults(func=run_serve)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--make-tokens takes comma-separated ints, got {text!r}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remove_releases(args: argparse.Namespace) -> int:
    """`serve --remove-releases ID [--after UPLOAD_ID] --state-dir DIR`."""
    from latentfuse.deploy.server.store import ReleaseDatabase
    from latentfuse.deploy.server.trainer import DATABASE

    if not args.state_dir:
        raise ValueError("--remove-releases needs --state-dir")
    if not args.keep_token and not args.clients:
        raise ValueError(
            "--remove-releases revokes the client's token: pass --clients (the clients.json the "
            "server reads), or --keep-token to leave it valid"
        )
    database = ReleaseDatabase(Path(args.state_dir) / DATABASE, None)
    gone = database.remove(args.remove_releases, args.after)
    which = f"after upload {args.after!r}" if args.after else "all"
    print(
        f"removed {gone} releases of client {args.remove_releases} ({which}); held now: "
        f"{database.counts()}"
    )
    if gone:
        print(
            "the trainer rolls its weights back to the newest kept checkpoint trained on none of "
            "them at its next step (or its next start)"
        )
    if not args.keep_token:
        from latentfuse.deploy.server.auth import revoke_token

        listed = revoke_token(args.clients, args.remove_releases)
        state = "revoked" if listed else "was not listed"
        print(f"token of client {args.remove_releases} {state} in {args.clients}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Issue tokens (`--make-tokens`), or build the server and serve until interrupted."""
    from latentfuse.deploy.server.auth import TokenBook, issue_tokens

    if args.make_tokens and not args.clients:
        raise ValueError("--make-tokens needs --clients (where to write the token hashes)")
    if args.make_tokens:
        declared = {}
        for text in args.declare:
            key, _, names = text.partition("=")
            ids = _parse_ids(key)
            if len(ids) != 1 or not names:
                raise ValueError(f"--declare takes ID=name,name..., got {text!r}")
            declared[ids[0]] = tuple(n.strip() for n in names.split(",") if n.strip())
        written = issue_tokens(
            args.clients, args.token_dir, _parse_ids(args.make_tokens), declared=declared
        )
        for client_id, path in written.items():
            print(f"client {client_id}: token written to {path}")
        print(f"hashes written to {args.clients}; give each client only its own token file")
        return 0
    if args.remove_releases is not None:
        return remove_releases(args)
    if args.after is not None:
        raise ValueError("--after goes with --remove-releases")
    if not args.clients:
        raise ValueError("serve needs --clients (the clients.json of --make-tokens)")
    if not args.config or not args.state_dir:
        raise ValueError("serve needs --config and --state-dir (or --make-tokens)")
    if not args.tls_cert and not _is_loopback(args.host) and not args.insecure_http:
        raise ValueError(
            f"refusing plain HTTP on {args.host}: tokens would cross the network in clear text; "
            "give --tls-cert and --tls-key (or --insecure-http to accept the risk)"
        )
    logging.getLogger("latentfuse").setLevel(logging.INFO)
    from latentfuse.deploy.config import load_deploy_config
    from latentfuse.deploy.server.app import serve
    from latentfuse.deploy.server.service import ServerService

    config, deploy = load_deploy_config(args.config, args.overrides)
    tokens = TokenBook.load(args.clients)
    mode, command = trainer_mode(args, config.train.mixed_precision)
    service = ServerService(
        config,
        deploy,
        tokens,
        args.state_dir,
        init_from=args.init_from,
        trainer=mode,
        trainer_command=command,
    )
    endpoint = Path(args.state_dir) / "endpoint.json"
    serve(
        service,
        args.host,
        args.port,
        args.tls_cert,
        args.tls_key,
        endpoint_file=endpoint,
        api_docs=args.api_docs,
    )
    return 0


def trainer_mode(args: argparse.Namespace, mixed_precision: str) -> tuple[str, list[str] | None]:
    """("process", the `accelerate launch` command) by default; ("thread", None) with
    --trainer-thread; ("none", None) with --no-train."""
    if args.no_train:
        return "none", None
    if args.trainer_thread:
        return "thread", None
    from latentfuse.deploy.server.train_server import trainer_command

    command = trainer_command(
        args.config,
        args.state_dir,
        args.trainer_processes,
        args.overrides,
        args.init_from,
        mixed_precision,
    )
    return "process", command
