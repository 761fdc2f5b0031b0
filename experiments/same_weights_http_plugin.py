"""A pytest plugin for comparing the HTTP path's server weights across source trees.

Run `tests/test_flower.py::test_flower_and_http_carry_the_same_bytes_to_the_same_server_weights`
in each tree with it; every `ServerTrainer.publish` appends (step, SHA-256 of the EMA weights)
to $HASH_OUT, and each client's release key is derived from its key file's path (the last two
parts) instead of the CSPRNG, so two trees get the same releases:

    KEY_MODULES=latentfuse.method.release_key TRAINER_MODULES=latentfuse.deploy.server.trainer \
    HASH_OUT=after.txt PYTHONPATH=.:experiments python -m pytest -p same_weights_http_plugin \
        "tests/test_flower.py::test_flower_and_http_carry_the_same_bytes_to_the_same_server_weights"

(an older tree: KEY_MODULES=latentfuse.release_key TRAINER_MODULES=latentfuse.http.trainer).
"""

import hashlib
import importlib
import os


def pytest_configure(config):
    for name in os.environ["TRAINER_MODULES"].split(","):
        try:
            mod = importlib.import_module(name)
            break
        except ImportError:
            continue
    original = mod.ServerTrainer.publish

    def publish(self):
        sd = self.engine.ema_model("server").state_dict()
        h = hashlib.sha256()
        for k in sorted(sd):
            h.update(k.encode())
            h.update(sd[k].detach().cpu().numpy().tobytes())
        with open(os.environ["HASH_OUT"], "a") as f:
            f.write(f"{self.step} {h.hexdigest()}\n")
        return original(self)

    mod.ServerTrainer.publish = publish


def pytest_sessionstart(session):
    import hashlib as _h

    for name in os.environ["KEY_MODULES"].split(","):
        try:
            mod = importlib.import_module(name)
            break
        except ImportError:
            continue
    original = mod.load_or_create_release_key

    def by_path(path):
        from pathlib import Path as P

        tail = "/".join(P(path).parts[-2:])
        mod.new_release_key = lambda: _h.sha256(f"fixed-{tail}".encode()).digest()
        return original(path)

    mod.load_or_create_release_key = by_path
    for name in list(__import__("sys").modules):
        m = __import__("sys").modules[name]
        if (
            name.startswith("latentfuse")
            and getattr(m, "load_or_create_release_key", None) is original
        ):
            m.load_or_create_release_key = by_path
