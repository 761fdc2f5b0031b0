"""latentfuse as a Flower app: the CollaFuse exchange over Flower's Message API, in the layout
`flwr new` writes (`task`: settings and message names; `client_app`; `server_app`).

The messages carry exactly the bytes of latentfuse's HTTP transport (`latentfuse.deploy.wire`):
a client's release chunks (`encode_release`, keyed by the same upload ids), the sampling
request and the server's hand-off (`encode_handoff`), so a run with the same seeds and release
keys gives the same server weights whichever carries them. Both ends run the deployment code:
the client side is `ClientJob` (encode, train the low-noise denoiser, release under its secret
key) with a stand-in for the HTTP connection; the server side is `ServerService` (every check
an HTTP upload gets, the durable release database) and `ServerTrainer` (the engine and the
exact objective of train.py).

One round of the ServerApp: a "train" message to every SuperNode (train to the round's client
step, reply with the releases that are due); the server commits them and trains
`server-steps-per-round` steps. After the last round, sampling: a "query.request" message asks
each client for a sampling request (its seeds and labels), the server runs t >= t_cut, and a
"query.finish" message carries the hand-off back; the client finishes the chain, decodes and
keeps the images (they never leave it). SuperNodes cannot start requests, so interactive
sampling belongs to `latentfuse serve` (docs/flower.md).

Run config (`[tool.flwr.app.config]`, examples/flower/pyproject.toml): config (the run TOML),
deploy-overrides, state-dir, rounds, client-steps-per-round, server-steps-per-round,
sample-images, num-inference-steps. Node config (`flower-supernode --node-config`):
client-id, data, work-dir.
"""
